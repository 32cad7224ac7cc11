"""The public acceptance set of transformers models: tiny configs, random weights, no
download. Each is built with its example inputs (batch 2, sequence 8), the dynamic
sequence length it declares, and ``inputs(batch, seq)`` for checks at other sizes. The
tests (``tests/api/test_prune_transformers.py``) and the coverage bench use the same builders.

transformers is imported only when a builder runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["HF_EXAMPLES", "LLMS", "HFExample", "build"]

VOCAB = 64


@dataclass
class HFExample:
    """A transformers model at an example input. ``dynamic_shapes`` declares the sequence
    length dynamic (torch.export's format); ``inputs(batch, seq)`` gives fresh inputs;
    ``attention`` names each layer's query/key projection weights (``{i}``: the layer) and
    the head dim, so head counts can be read from a model's parameters."""

    name: str
    model: nn.Module
    example: dict
    dynamic_shapes: dict | None
    inputs: Callable[[int, int], dict]
    layers: int
    query: str
    key: str
    head_dim: int
    heads_dim: int = 0  # the weight dim that carries the heads (1 for GPT-2's Conv1D)


def _text_inputs(mask: bool, decoder: bool = False) -> Callable[[int, int], dict]:
    def inputs(batch: int, seq: int) -> dict:
        gen = torch.Generator().manual_seed(1000 * batch + seq)
        out = {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}
        if mask:
            attention = torch.ones(batch, seq, dtype=torch.long)
            attention[-1, seq - 2:] = 0  # a padded last row: the mask is really used
            out["attention_mask"] = attention
        if decoder:
            out["decoder_input_ids"] = torch.randint(0, VOCAB, (batch, max(2, seq - 3)), generator=gen)
        return out

    return inputs


def _seq_dims(example: dict) -> dict:
    seq = torch.export.Dim("seq", min=2, max=64)
    dims = {name: {1: seq} for name in ("input_ids", "attention_mask") if name in example}
    if "decoder_input_ids" in example:
        dims["decoder_input_ids"] = {1: torch.export.Dim("decoder_seq", min=2, max=64)}
    return dims


def _text(name: str, model: nn.Module, mask: bool, layers: int, query: str, key: str, head_dim: int,
          decoder: bool = False, heads_dim: int = 0) -> HFExample:
    inputs = _text_inputs(mask, decoder)
    example = inputs(2, 8)
    return HFExample(name, model, example, _seq_dims(example), inputs, layers, query, key, head_dim, heads_dim)


def _bert() -> HFExample:
    import transformers as T
    config = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return _text("BertForSequenceClassification", T.BertForSequenceClassification(config), True, 2,
                 "bert.encoder.layer.{i}.attention.self.query.weight",
                 "bert.encoder.layer.{i}.attention.self.key.weight", 8)


def _distilbert() -> HFExample:
    import transformers as T
    config = T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                max_position_embeddings=64)
    return _text("DistilBertModel", T.DistilBertModel(config), True, 2,
                 "transformer.layer.{i}.attention.q_lin.weight", "transformer.layer.{i}.attention.k_lin.weight", 8)


def _gpt2() -> HFExample:
    import transformers as T
    config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          bos_token_id=0, eos_token_id=0)
    # Conv1D: c_attn's weight is (in, 3 * width): q, k and v side by side along dim 1
    return _text("GPT2LMHeadModel", T.GPT2LMHeadModel(config), False, 2,
                 "transformer.h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_attn.weight", 8, heads_dim=1)


def _llama_like(cls_name: str, config_name: str) -> Callable[[], HFExample]:
    def build() -> HFExample:
        import transformers as T
        config = getattr(T, config_name)(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=0, eos_token_id=None, pad_token_id=None)
        return _text(cls_name, getattr(T, cls_name)(config), False, 2, "model.layers.{i}.self_attn.q_proj.weight",
                     "model.layers.{i}.self_attn.k_proj.weight", 4)

    return build


def _vit() -> HFExample:
    import transformers as T
    config = T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, num_labels=3)

    def inputs(batch: int, seq: int) -> dict:  # images have no sequence length: seq picks the data
        gen = torch.Generator().manual_seed(1000 * batch + seq)
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}

    return HFExample("ViTForImageClassification", T.ViTForImageClassification(config), inputs(2, 8), None, inputs, 2,
                     "vit.layers.{i}.attention.q_proj.weight", "vit.layers.{i}.attention.k_proj.weight", 8)


def _t5() -> HFExample:
    import transformers as T
    config = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        decoder_start_token_id=0)
    return _text("T5ForConditionalGeneration", T.T5ForConditionalGeneration(config), True, 2,
                 "encoder.block.{i}.layer.0.SelfAttention.q.weight", "encoder.block.{i}.layer.0.SelfAttention.k.weight",
                 8, decoder=True)


HF_EXAMPLES: dict[str, Callable[[], HFExample]] = {
    "BertForSequenceClassification": _bert,
    "DistilBertModel": _distilbert,
    "GPT2LMHeadModel": _gpt2,
    "ViTForImageClassification": _vit,
    "T5ForConditionalGeneration": _t5,
    "LlamaForCausalLM": _llama_like("LlamaForCausalLM", "LlamaConfig"),
    "Qwen2ForCausalLM": _llama_like("Qwen2ForCausalLM", "Qwen2Config"),
}
LLMS = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def build(name: str, seed: int = 0) -> HFExample:
    """Build example ``name`` with non-degenerate random weights (eval mode)."""
    from ..api.checks import make_nondegenerate

    torch.manual_seed(seed)
    example = HF_EXAMPLES[name]()
    make_nondegenerate(example.model, example.example, seed=seed)
    return example
