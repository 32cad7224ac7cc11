"""Heads that other graphs hide: Phi-3's fused ``qkv_proj`` cut by literal slices that tile its
output (query, key, value) under grouped-query attention and partial rotary, and HF Swin's
window attention, whose heads also index the relative-position-bias table (heads on dim 1,
read at a position index) and meet the shifted windows' attention mask. prune(ratio=0.5)
removes heads in every layer and stage, equals the masked model at two batch sizes x two
sequence lengths (images: two draws), keeps at most 0.66 of the parameters, and leaves every
parameter in a group or in a refusal with a reason.

Tiny random configs, biases N(0, 0.1), norm weights U(0.5, 1.5). Each model is pruned once."""

from __future__ import annotations

import functools

import pytest
import spruce
import torch
from helpers import assert_every_parameter_placed, randomise_transformer
from spruce.api import checks

T = pytest.importorskip("transformers")

VOCAB = 64


def _phi3():
    return T.Phi3ForCausalLM(T.Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))


def _swin():
    return T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=3))


def inputs(name: str, batch: int, seq: int) -> dict:
    gen = torch.Generator().manual_seed(1000 * batch + seq)
    if name == "swin":  # no sequence length: seq picks the draw
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}


@functools.cache
def pruned(name: str):
    torch.manual_seed(0)
    model = randomise_transformer(_phi3() if name == "phi3" else _swin())
    dims = {"input_ids": {1: torch.export.Dim("seq", min=2, max=64)}} if name == "phi3" else None
    return model, spruce.prune(model, inputs(name, 2, 8), ratio=0.5, dynamic_shapes=dims)


def own_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's state under the source's names (a compact model whose training graph differs
    holds both graphs: the eval graph's)."""
    state = model.state_dict()
    if any(k.startswith("eval_graph.") for k in state):
        state = {k.removeprefix("eval_graph."): v for k, v in state.items() if k.startswith("eval_graph.")}
    return state


def heads(name: str, model: torch.nn.Module) -> list[int]:
    """Query heads per layer (Phi-3) or per block (Swin), read from the output projections."""
    state = own_names(model)
    if name == "phi3":
        return [state[f"model.layers.{i}.self_attn.o_proj.weight"].shape[1] // 8 for i in range(2)]
    return [state[f"swin.encoder.layers.{s}.blocks.{b}.attention.o_proj.weight"].shape[1] // 8
            for s in range(2) for b in range(2)]


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", ["phi3", "swin"])
def test_heads_prune_exactly_in_every_layer(name):
    model, result = pruned(name)
    before, after = heads(name, model), heads(name, result.model)
    assert after == [h // 2 for h in before], (before, after)
    for batch in (1, 3):
        for seq in (5, 11):
            ids = inputs(name, batch, seq)
            assert checks.relative_error(logits(result.masked, ids), logits(result.model, ids)) <= 1e-5, (batch, seq)
    assert checks.relative_error(logits(model, inputs(name, 1, 5)), logits(result.masked, inputs(name, 1, 5))) > 1e-3
    share = sum(p.numel() for p in result.model.parameters()) / sum(p.numel() for p in model.parameters())
    assert share <= 0.66, share


def test_phi3_keeps_its_key_value_heads_and_fused_layout():
    """query_heads: the same query heads leave each key/value group; qkv_proj stays one fused
    projection, now (2 + 2 x 2) heads of 8 rows."""
    _, result = pruned("phi3")
    state = own_names(result.model)
    assert state["model.layers.0.self_attn.qkv_proj.weight"].shape == (48, 32)


def test_swin_relative_position_bias_table_loses_the_heads():
    model, result = pruned("swin")
    name = "swin.encoder.layers.1.blocks.1.attention.relative_position_bias.relative_position_bias_table"
    table = dict(model.named_parameters())[name]
    assert own_names(result.model)[name].shape == (table.shape[0], table.shape[1] // 2)


@pytest.mark.parametrize("name", ["phi3", "swin"])
def test_every_parameter_is_in_a_group_or_refused_with_a_reason(name):
    model, result = pruned(name)
    assert_every_parameter_placed(model, result.groups)


def test_phi3_comes_back_as_its_own_class():
    from spruce.api.transformers import to_transformers

    model, result = pruned("phi3")
    own = to_transformers(result.model, model)
    assert (own.config.num_attention_heads, own.config.num_key_value_heads) == (2, 2)
    ids = inputs("phi3", 2, 7)
    assert checks.relative_error(logits(result.model, ids), logits(own, ids)) <= 1e-5
