"""Write-back to stock transformers (spruce.to_transformers) for each family in its
registry: Qwen2 (q/k/v biases), Mistral (sliding window), Qwen3 (per-head q/k norms, head_dim
!= hidden / heads, tied), Gemma (embed_scale from hidden_size, tied), Mixtral (3-D expert
weights: its query heads, experts and expert width prune), Phi-3 (fused qkv_proj / gate_up_proj,
partial rotary), GPT-2 (Conv1D, fused c_attn), BERT, ViT, T5 (its MLP width), Swin (per-stage
heads with the relative-position-bias table, embed_dim, mlp_ratio; SwinModel also without a
block: depths), and Llama, Qwen3, Phi-3, Mixtral, ViT and Gemma after the residual width was pruned.

Tiny random configs with biases N(0, 0.1) and norm weights U(0.5, 1.5), so a mishandled bias
or norm shows. Each family's compact model equals its masked model at two batch sizes x two
sequence lengths, and every parameter is in a channel group or in a refusal with a reason.
Each written-back model is the user's own class with a rewritten config; ``save_pretrained`` ->
``from_pretrained`` in one fresh process that never imports spruce gives the compact model's
logits within 1e-5, and cached ``generate`` gives the compact model's greedy tokens (causal
LMs; T5 from a two-token decoder prefix). Each model is pruned once per test session."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import spruce
import torch
from helpers import assert_every_parameter_placed
from helpers import randomise_transformer as randomise
from spruce.api import checks
from spruce.api.depth import remove_blocks
from spruce.api.prune import remove_channels
from spruce.api.transformers import to_transformers

T = pytest.importorskip("transformers")

VOCAB = 64


@dataclass
class Case:
    """A model to prune, how (``prune`` keywords; GPT-2, BERT, T5 and SwinModel keep their heads,
    and BERT its pooler width, which their configs cannot hold pruned: T5's decoder
    cross-attention heads stay whole while one num_heads serves every attention) and the inputs
    it is checked on."""

    build: object
    prune: dict
    causal: bool = True
    image: int = 0  # an image model: pixel_values this many pixels square
    decoder: bool = False  # an encoder-decoder: decoder_input_ids too
    remove: tuple[str, ...] = ()  # blocks removed after pruning (spruce.api.depth.remove_blocks)


def _llm(config_cls, **fields):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=None,
                pad_token_id=None)
    return config_cls(**{**base, **fields})


def _swin_config():
    return T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                        num_labels=3)


CASES = {
    "qwen2": Case(lambda: T.Qwen2ForCausalLM(_llm(T.Qwen2Config)), {}),  # q/k/v biases
    "mistral": Case(lambda: T.MistralForCausalLM(_llm(T.MistralConfig, head_dim=8, sliding_window=4)), {}),
    "qwen3": Case(lambda: T.Qwen3ForCausalLM(_llm(T.Qwen3Config, head_dim=16, attention_bias=True,
                                                  tie_word_embeddings=True)), {}),
    "gemma": Case(lambda: T.GemmaForCausalLM(_llm(T.GemmaConfig, head_dim=8, attention_bias=True,
                                                  tie_word_embeddings=True)), {}),
    "mixtral": Case(lambda: T.MixtralForCausalLM(_llm(T.MixtralConfig, head_dim=8, num_local_experts=4,
                                                      num_experts_per_tok=2)), {}),
    "phi3": Case(lambda: T.Phi3ForCausalLM(_llm(T.Phi3Config, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})), {}),
    "gpt2": Case(lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                        n_positions=64, bos_token_id=0, eos_token_id=None)),
                 {"ignore": [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]}),
    "bert": Case(lambda: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3)), {"ignore": [
        *(f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(2)), "bert.pooler.dense.weight"]},
        causal=False),
    "vit": Case(lambda: T.ViTForImageClassification(T.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3)), {}, causal=False, image=16),
    "t5": Case(lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        eos_token_id=None)),
        {"ignore": [f"{stack}.block.{i}.layer.{j}.{attn}.q.weight" for stack, j, attn in (
            ("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention"), ("decoder", 1, "EncDecAttention"))
            for i in range(2)]}, causal=False, decoder=True),
    # Swin derives each stage's head dim as width // heads: heads write back with the width alike.
    # SwinModel's last stage is its output, so its widths (and with them its heads) stay
    "swin": Case(lambda: T.SwinForImageClassification(_swin_config()), {"normalised_widths": True}, causal=False,
                 image=32),
    "swin_model": Case(lambda: T.SwinModel(_swin_config()), {"ignore": [
        f"encoder.layers.{s}.blocks.{i}.attention.q_proj.weight" for s in range(2) for i in range(2)]},
        causal=False, image=32, remove=("encoder.layers.0.blocks.1",)),
    "llama_hidden": Case(lambda: T.LlamaForCausalLM(_llm(T.LlamaConfig, num_attention_heads=8, attention_bias=True,
                                                         mlp_bias=True)), {"normalised_widths": True}),
    "qwen3_hidden": Case(lambda: T.Qwen3ForCausalLM(_llm(T.Qwen3Config, head_dim=16, attention_bias=True,
                                                         tie_word_embeddings=True)), {"normalised_widths": True}),
    "phi3_hidden": Case(lambda: T.Phi3ForCausalLM(_llm(T.Phi3Config, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})), {"normalised_widths": True}),
    "mixtral_hidden": Case(lambda: T.MixtralForCausalLM(_llm(T.MixtralConfig, head_dim=8, num_local_experts=4,
                                                             num_experts_per_tok=2)), {"normalised_widths": True}),
    "vit_hidden": Case(lambda: T.ViTForImageClassification(T.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3)), {"normalised_widths": True}, causal=False, image=16),
    "gemma_hidden": Case(lambda: T.GemmaForCausalLM(_llm(T.GemmaConfig, head_dim=8, attention_bias=True,
                                                         tie_word_embeddings=False)), {"normalised_widths": True}),
}


def inputs(case: Case, batch: int, seq: int) -> dict:
    gen = torch.Generator().manual_seed(1000 * batch + seq)
    if case.image:
        return {"pixel_values": torch.randn(batch, 3, case.image, case.image, generator=gen)}
    out = {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}
    if case.decoder:
        out["decoder_input_ids"] = torch.randint(0, VOCAB, (batch, max(2, seq - 3)), generator=gen)
    return out


@functools.cache
def pruned(name: str):
    case = CASES[name]
    torch.manual_seed(0)
    model = randomise(case.build())
    options = dict(case.prune)
    example = inputs(case, 2, 8)
    dims = None if case.image else {name: {1: torch.export.Dim(f"seq_{name}", min=2, max=64)} for name in example}
    result = spruce.prune(model, example, ratio=0.5, dynamic_shapes=dims, **options)
    if case.remove:
        result = dataclasses.replace(result, model=remove_blocks(result.model, case.remove))
    return model, result


def logits(output: object) -> torch.Tensor:
    """Class or token scores (a base model without a head: its last hidden state)."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(output, name):
            return getattr(output, name)
        if isinstance(output, dict) and name in output:
            return output[name]
    raise KeyError(f"no logits in {type(output).__name__}")


def greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the model runs on the whole sequence at every length."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, logits(model(input_ids=ids))[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def greedy_decoder(model: torch.nn.Module, ids: torch.Tensor, decoded: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding of an encoder-decoder without a cache, from the decoder tokens ``decoded``."""
    with torch.no_grad():
        for _ in range(steps):
            step = logits(model(input_ids=ids, decoder_input_ids=decoded))[:, -1].argmax(-1, keepdim=True)
            decoded = torch.cat([decoded, step], dim=1)
    return decoded


EXACT = list(CASES)


@pytest.mark.parametrize("name", [n for n in CASES if not CASES[n].remove])
def test_compact_equals_masked_at_two_batch_sizes_and_lengths(name):
    """Image models: the second length is a second draw."""
    source, result = pruned(name)
    for batch in (1, 3):
        for seq in (5, 11):
            batch_inputs = inputs(CASES[name], batch, seq)
            with torch.no_grad():
                want, got = logits(result.masked(**batch_inputs)), logits(result.model(**batch_inputs))
            assert checks.relative_error(want, got) <= 1e-5, (batch, seq)
    with torch.no_grad():  # the pruning changed what the model computes: a check that can fail
        assert checks.relative_error(logits(source(**batch_inputs)), logits(result.masked(**batch_inputs))) > 1e-3


@pytest.mark.parametrize("name", [n for n in CASES if not CASES[n].remove])
def test_every_parameter_is_in_a_group_or_refused_with_a_reason(name):
    source, result = pruned(name)
    assert_every_parameter_placed(source, result.groups)


RELOAD = textwrap.dedent("""
    import json, sys, torch, transformers
    out = {}
    for folder in sys.argv[1:]:
        config = transformers.AutoConfig.from_pretrained(folder)
        model = getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()
        checks = torch.load(folder + "/checks.pt")
        with torch.no_grad():
            output = model(**checks["inputs"])
            result = {"logits": getattr(output, "logits", None)}
            if result["logits"] is None:
                result["logits"] = output.last_hidden_state
            if "prompt" in checks:
                more = {"decoder_input_ids": checks["decoder_prompt"]} if "decoder_prompt" in checks else {}
                result["tokens"] = model.generate(checks["prompt"], max_new_tokens=8, do_sample=False, use_cache=True,
                                                  **more)
        tied = getattr(model, "get_output_embeddings", lambda: None)()
        result["tied"] = tied is not None and tied.weight is model.get_input_embeddings().weight
        result["dtype"] = str(next(model.parameters()).dtype)
        torch.save(result, folder + "/reloaded.pt")
    print(json.dumps({"spruce_imported": any(m.split(".")[0] == "spruce" for m in sys.modules)}))
""")


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every exact family written back, saved, and reloaded in one fresh process without spruce:
    name -> (compact model, written-back model, the fresh process's results, folder)."""
    folders, written = [], {}
    for name in EXACT:
        source, result = pruned(name)
        own = to_transformers(result.model, source)
        folder = tmp_path_factory.mktemp(name)
        own.save_pretrained(folder)
        case = CASES[name]
        check = {"inputs": inputs(case, 2, 7)}
        if case.causal or case.decoder:
            prompt = inputs(case, 1, 5)
            check["prompt"] = prompt["input_ids"]
            if case.decoder:  # the start token, then one more: the compact decoder runs from 2 tokens on
                check["decoder_prompt"] = torch.cat([torch.full((1, 1), source.config.decoder_start_token_id),
                                                     prompt["decoder_input_ids"][:, :1]], dim=1)
        torch.save(check, folder / "checks.pt")
        folders.append(str(folder))
        written[name] = (result.model, own, check, folder)
    run = subprocess.run([sys.executable, "-c", RELOAD, *folders], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"spruce_imported": False}
    return {name: (compact, own, check, torch.load(folder / "reloaded.pt"), folder)
            for name, (compact, own, check, folder) in written.items()}


@pytest.mark.parametrize("name", EXACT)
def test_reload_without_spruce_equals_the_compact_model(name, reloaded):
    source, _ = pruned(name)
    compact, own, check, back, folder = reloaded[name]
    assert type(own) is type(source)
    with torch.no_grad():
        want = logits(compact(**check["inputs"]))
        assert checks.relative_error(want, logits(own(**check["inputs"]))) <= 1e-5
    assert checks.relative_error(want, back["logits"]) <= 1e-5
    assert sum(p.numel() for p in own.parameters()) < sum(p.numel() for p in source.parameters())
    assert back["dtype"] == "torch.float32" and (folder / "model.safetensors").exists()
    if "decoder_prompt" in check:
        assert torch.equal(back["tokens"], greedy_decoder(compact, check["prompt"], check["decoder_prompt"], 8))
    elif "prompt" in check:
        assert torch.equal(back["tokens"], greedy(compact, check["prompt"], 8))
        assert (folder / "generation_config.json").exists()
    tied = bool(getattr(source.config, "tie_word_embeddings", False)) and source.get_output_embeddings() is not None
    assert back["tied"] == tied
    if tied:
        assert own.get_output_embeddings().weight is own.get_input_embeddings().weight


def test_configs_hold_the_pruned_widths():
    """Head counts, MLP widths, the residual width and head_dim as the compact model has them."""
    want = {"qwen2": dict(num_attention_heads=2, num_key_value_heads=2, intermediate_size=32),
            "mistral": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=8, sliding_window=4),
            "qwen3": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=16, intermediate_size=32),
            "phi3": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=8, intermediate_size=32),
            "gpt2": dict(n_head=4, n_inner=64),
            "vit": dict(num_attention_heads=2, head_dim=8, intermediate_size=32),
            "llama_hidden": dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4),
            "qwen3_hidden": dict(hidden_size=16, num_attention_heads=2, head_dim=16, tie_word_embeddings=True),
            "mixtral": dict(num_attention_heads=2, num_key_value_heads=2, num_local_experts=2, intermediate_size=32),
            "t5": dict(num_heads=4, d_ff=32, d_kv=8),
            "vit_hidden": dict(hidden_size=16, num_attention_heads=2, head_dim=8, intermediate_size=32),
            "phi3_hidden": dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32),
            "mixtral_hidden": dict(hidden_size=16, num_local_experts=2, intermediate_size=32),
            "swin": dict(embed_dim=8, num_heads=[1, 2], mlp_ratio=4.0, depths=[2, 2], hidden_size=16),
            "swin_model": dict(embed_dim=16, num_heads=[2, 4], mlp_ratio=2.0, depths=[1, 2], hidden_size=32)}
    for name, fields in want.items():
        source, result = pruned(name)
        config = to_transformers(result.model, source).config
        assert {k: getattr(config, k) for k in fields} == fields, name
        assert config.num_hidden_layers == 2


def test_gemma_embed_scale_survives_a_pruned_residual_width():
    """Gemma rebuilds embed_scale = sqrt(hidden_size) on load: written back after the residual
    width shrank 32 -> 16, the reload must still scale as the compact model (sqrt(32) in all),
    not silently by sqrt(16)."""
    source, result = pruned("gemma_hidden")
    own = to_transformers(result.model, source)
    assert own.config.hidden_size == 16
    assert float(own.get_input_embeddings().embed_scale) == pytest.approx(16**0.5)
    ids = inputs(CASES["gemma_hidden"], 2, 6)
    with torch.no_grad():
        assert checks.relative_error(logits(result.model(**ids)), logits(own(**ids))) <= 1e-5


def test_gemma_tied_embeddings_with_a_pruned_residual_width_are_refused():
    model = randomise(T.GemmaForCausalLM(_llm(T.GemmaConfig, head_dim=8, tie_word_embeddings=True)))
    example = {"input_ids": torch.randint(0, VOCAB, (2, 8))}
    result = spruce.prune(model, example, ratio=0.5, normalised_widths=True)
    with pytest.raises(ValueError, match="embed_scale"):
        to_transformers(result.model, model)


def test_heads_a_config_derives_from_the_hidden_width_are_refused():
    """GPT-2 computes head_dim = n_embd // n_head: pruned heads have no config to go to."""
    model = randomise(T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                     n_positions=64)))
    result = spruce.prune(model, {"input_ids": torch.randint(0, VOCAB, (2, 8))}, ratio=0.5)
    with pytest.raises(ValueError, match="num_attention_heads: GPT2LMHeadModel derives the head dim"):
        to_transformers(result.model, model)


def test_per_layer_counts_are_refused_naming_the_first_field():
    source, result = pruned("qwen3")
    kept = dict(result.kept)
    query = next(g.id for g in result.groups if g.prunable and any(
        m.name == "model.layers.0.self_attn.q_proj.weight" and m.dim == 0 for m in g.members))
    kept[query] = np.arange(2)  # layer 0 keeps its 4 query heads, layer 1 has 2
    uneven = remove_channels(result.analysis, source, kept)
    with pytest.raises(ValueError, match=r"num_attention_heads differs across layers \(\[4, 2\]\)"):
        to_transformers(uneven, source)


def test_phi3_fused_qkv_reads_query_and_key_value_heads():
    """Phi-3's qkv_proj holds query heads, then key and value heads: a compact model with 2 query
    heads and 1 key/value head (a smaller Phi-3 with the same parameter names; head_dim 8, not
    hidden / heads = 16, under partial rotary) comes back with those counts and its outputs."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    source = randomise(T.Phi3ForCausalLM(_llm(T.Phi3Config, rope_parameters=rope)))
    small = randomise(T.Phi3ForCausalLM(_llm(T.Phi3Config, rope_parameters=rope, num_attention_heads=2,
                                             num_key_value_heads=1, head_dim=8, intermediate_size=24)), seed=1)
    own = to_transformers(small, source)
    config = own.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert config.intermediate_size == 24
    ids = inputs(CASES["phi3"], 2, 6)
    with torch.no_grad():
        assert checks.relative_error(logits(small(**ids)), logits(own(**ids))) <= 1e-6


def _swin_edited(edit) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An unpruned Swin and a copy whose tensors ``edit(stages)`` reshaped as a compact model
    would hold them (write-back reads only the compact model's tensors)."""
    source = randomise(T.SwinForImageClassification(_swin_config()))
    compact = randomise(T.SwinForImageClassification(_swin_config()))
    edit(compact.swin.encoder.layers)
    return source, compact


def _heads_alone(stages):  # stage 0: 1 head of 8 in a 16-wide stage
    attention = stages[0].blocks[0].attention
    attention.q_proj = torch.nn.Linear(16, 8)
    table = attention.relative_position_bias.relative_position_bias_table
    attention.relative_position_bias.relative_position_bias_table = torch.nn.Parameter(table[:, :1])


def _first_block_removed(stages):  # the tensors of stage 0's block 1 alone, under its own index
    kept = torch.nn.Module()
    kept.add_module("1", stages[0].blocks[1])
    stages[0].blocks = kept


def _stage_widths_alike(stages):  # stage 1 as wide as stage 0
    for block in stages[1].blocks:
        block.layernorm_before = torch.nn.LayerNorm(16)
        block.attention.q_proj = torch.nn.Linear(16, 16)
        bias = block.attention.relative_position_bias
        bias.relative_position_bias_table = torch.nn.Parameter(bias.relative_position_bias_table[:, :2])
        block.mlp.fc1 = torch.nn.Linear(16, 64)


def _mlp_ratio_per_stage(stages):  # stage 0's MLP 3 x its width, stage 1's 4 x
    for block in stages[0].blocks:
        block.mlp.fc1 = torch.nn.Linear(16, 48)


def _mlp_per_block(stages):
    stages[0].blocks[1].mlp.fc1 = torch.nn.Linear(16, 48)


@pytest.mark.parametrize("edit, match", [
    (_heads_alone, r"num_heads: SwinForImageClassification derives the head dim as the stage width // num_heads .*"
                   r"1 heads of 8 in the 16-wide stage 0"),
    (_first_block_removed, r"depths: stage 0 of SwinForImageClassification keeps blocks \[1\] of 2"),
    (_stage_widths_alike, r"embed_dim: stage widths \[16, 16\] are not embed_dim x 2\*\*stage"),
    (_mlp_ratio_per_stage, r"mlp_ratio: MLP widths \[48, 128\] are not int\(mlp_ratio x stage width\)"),
    (_mlp_per_block, r"mlp_ratio differs across the blocks of stage 0"),
])
def test_swin_fields_it_cannot_hold_are_refused_by_name(edit, match):
    """What a Swin config cannot hold: heads without the stage width (head_dim = width // heads),
    a removed block whose successor's window shift would change, stage widths that are not
    embed_dim x 2**stage, MLP widths that are not one mlp_ratio, and per-block counts."""
    source, compact = _swin_edited(edit)
    with pytest.raises(ValueError, match=match):
        to_transformers(compact, source)


def test_write_back_keeps_the_dtype(tmp_path):
    """A bfloat16 model comes back in bfloat16 (config.json's dtype, the safetensors, the reload)."""
    source, result = pruned("qwen2")
    half_source = copy.deepcopy(source).to(torch.bfloat16)
    own = to_transformers(copy.deepcopy(result.model).to(torch.bfloat16), half_source)
    own.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    back = T.Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert back.config.num_attention_heads == 2


def test_a_residual_width_the_config_refuses_is_refused_and_the_rule_moves_it():
    """A stock LlamaConfig takes hidden_size only as a multiple of num_attention_heads: 15 beside
    4 kept heads is refused by name (``from_pretrained`` would refuse the saved folder), and
    hidden_width_rule moves it to 12 (fewer first), which writes back equal to the compact model.
    Qwen3's config takes any residual width beside its explicit head_dim: its rule moves nothing."""
    from spruce.api.transformers import hidden_width_rule
    from spruce.passes.sparsity.count_rules import fit_kept

    source, result = pruned("llama_hidden")
    rule = hidden_width_rule(source, result.groups)
    hidden = next(g for g in result.groups if g.id == rule.group)
    assert any(m.name == "model.embed_tokens.weight" and m.dim == 1 for m in hidden.members)
    kept = {**result.kept, rule.group: np.arange(15)}
    with pytest.raises(ValueError, match=r"LlamaConfig refuses .*hidden size \(15\) is not a multiple"):
        to_transformers(remove_channels(result.analysis, source, kept), source)
    importance = {g.id: -np.arange(g.size, dtype=float) for g in result.groups if g.prunable}
    fitted = fit_kept(kept, {g.id: g.size for g in result.groups if g.prunable}, rule, importance)
    assert fitted[rule.group].tolist() == list(range(12))
    compact = remove_channels(result.analysis, source, fitted)
    own = to_transformers(compact, source)
    assert (own.config.hidden_size, own.config.num_attention_heads) == (12, 4)
    ids = inputs(CASES["llama_hidden"], 2, 6)
    with torch.no_grad():
        assert checks.relative_error(logits(compact(**ids)), logits(own(**ids))) <= 1e-5

    source, result = pruned("qwen3_hidden")
    rule = hidden_width_rule(source, result.groups)
    counts = {g.id: len(result.kept.get(g.id, range(g.size))) for g in result.groups if g.prunable}
    assert rule.holds({**counts, rule.group: 15})


def test_prune_keeps_a_residual_width_the_config_takes():
    """spruce.prune at ratio 0.3 keeps 23 of 32 residual channels and 3 of 4 query heads per
    key-value group (6 heads): a LlamaConfig refuses 23 beside 6 heads, so the residual width
    moves to 18 (fewer first) and the result writes back."""
    model = randomise(T.LlamaForCausalLM(_llm(T.LlamaConfig, num_attention_heads=8)))
    result = spruce.prune(model, {"input_ids": torch.randint(0, VOCAB, (2, 8))}, ratio=0.3, normalised_widths=True)
    own = to_transformers(result.model, model)
    assert (own.config.hidden_size, own.config.num_attention_heads) == (18, 6)
