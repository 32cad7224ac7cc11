"""Mixture-of-experts as transformers 5 writes it (3-D expert weights): Mixtral (top-k
renormalised), Qwen2-MoE (a gated shared expert, no renormalisation) and Qwen3-MoE (no
renormalisation). prune(ratio=0.5) removes whole experts with their router rows and half the
experts' intermediate width in every layer, and the compact model equals the masked model at
two batch sizes x two sequence lengths; the masked model sets removed experts' router logits
to -inf (a zeroed router row alone leaves logit 0 in the softmax: measurably wrong without
renormalisation); at least top_k experts stay; every parameter is in a group or in a refusal
with a reason; the captured operator computes what transformers computes.

Tiny random configs, biases N(0, 0.1), norm weights U(0.5, 1.5). Each model is pruned once."""

from __future__ import annotations

import functools

import pytest
import spruce
import torch
from helpers import assert_every_parameter_placed, randomise_transformer
from spruce.api import checks
from spruce.capture.transformers import capture_settings, moe_blocks
from spruce.passes.export import mask_channels

T = pytest.importorskip("transformers")

VOCAB = 64


def _config(cls, **fields):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=0, eos_token_id=None,
                pad_token_id=None, num_experts_per_tok=2)
    return cls(**{**base, **fields})


BUILD = {
    "mixtral": lambda: T.MixtralForCausalLM(_config(T.MixtralConfig, num_local_experts=4)),
    "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(_config(
        T.Qwen2MoeConfig, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False, qkv_bias=True)),
    "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(_config(T.Qwen3MoeConfig, num_experts=6, moe_intermediate_size=32,
                                                         norm_topk_prob=False, num_experts_per_tok=3)),
}
EXPERTS = {"mixtral": 4, "qwen2_moe": 4, "qwen3_moe": 6}


def inputs(batch: int, seq: int) -> dict:
    gen = torch.Generator().manual_seed(1000 * batch + seq)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}


@functools.cache
def pruned(name: str, ratio: float = 0.5):
    torch.manual_seed(0)
    model = randomise_transformer(BUILD[name]())
    dims = {"input_ids": {1: torch.export.Dim("seq", min=2, max=64)}}
    return model, spruce.prune(model, inputs(2, 8), ratio=ratio, dynamic_shapes=dims)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids).logits


def experts_of(model: torch.nn.Module, layers: int = 2) -> list[tuple[int, int]]:
    """(experts, intermediate width) per layer, read from the parameters (a compact graph's too)."""
    state = model.state_dict()
    out = []
    for i in range(layers):
        down = state[f"model.layers.{i}.mlp.experts.down_proj"]
        router = state[f"model.layers.{i}.mlp.gate.weight"]
        assert router.shape[0] == down.shape[0]
        out.append((down.shape[0], down.shape[2]))
    return out


@pytest.mark.parametrize("name", list(BUILD))
def test_the_captured_operator_computes_what_transformers_computes(name):
    torch.manual_seed(0)
    model = randomise_transformer(BUILD[name]())
    ids = inputs(2, 7)
    want = logits(model, ids)
    with capture_settings(model):
        assert len(moe_blocks(model)) == 2
        got = logits(model, ids)
    assert checks.relative_error(want, got) <= 1e-5
    assert "forward" not in vars(model.model.layers[0].mlp)  # restored


@pytest.mark.parametrize("name", list(BUILD))
def test_experts_prune_exactly_in_every_layer(name):
    model, result = pruned(name)
    before, after = experts_of(model), experts_of(result.model)
    for (e0, w0), (e1, w1) in zip(before, after):
        assert (e1, w1) == (max(e0 // 2, model.config.num_experts_per_tok), w0 // 2), (before, after)
    for batch in (1, 3):
        for seq in (5, 11):
            ids = inputs(batch, seq)
            assert checks.relative_error(logits(result.masked, ids), logits(result.model, ids)) <= 1e-5, (batch, seq)
    assert checks.relative_error(logits(model, inputs(1, 5)), logits(result.masked, inputs(1, 5))) > 1e-3


def test_removed_experts_need_minus_infinity_logits():
    """Without top-k renormalisation a zeroed router row still takes a share of the softmax
    (logit 0): the masked model with zeroed weights only differs from the compact model."""
    model, result = pruned("qwen2_moe")
    zeroed_only = mask_channels(result.analysis, model, result.kept)
    ids = inputs(2, 9)
    assert checks.relative_error(logits(result.model, ids), logits(zeroed_only, ids)) > 1e-3
    assert checks.relative_error(logits(result.model, ids), logits(result.masked, ids)) <= 1e-5


def test_at_least_top_k_experts_stay():
    model, result = pruned("qwen3_moe", 0.9)
    assert [e for e, _ in experts_of(result.model)] == [3, 3]
    ids = inputs(2, 6)
    assert checks.relative_error(logits(result.masked, ids), logits(result.model, ids)) <= 1e-5


@pytest.mark.parametrize("name", list(BUILD))
def test_every_parameter_is_in_a_group_or_refused_with_a_reason(name):
    model, result = pruned(name)
    assert_every_parameter_placed(model, result.groups)


def test_kept_parameter_share_of_mixtral():
    model, result = pruned("mixtral")
    share = sum(p.numel() for p in result.model.parameters()) / sum(p.numel() for p in model.parameters())
    assert share <= 0.66, share


def test_compact_moe_model_trains():
    _, result = pruned("qwen2_moe")
    compact = result.model.train()
    compact.zero_grad()
    loss = compact(**inputs(2, 6)).logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in compact.named_parameters() if "experts" in n or "mlp.gate.weight" in n}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values()), list(grads)
    compact.eval()


def test_mixtral_comes_back_with_fewer_experts(tmp_path):
    from spruce.api.transformers import to_transformers

    model, result = pruned("mixtral")
    own = to_transformers(result.model, model)
    assert (own.config.num_local_experts, own.config.intermediate_size) == (2, 32)
    ids = inputs(2, 7)
    assert checks.relative_error(logits(result.model, ids), logits(own, ids)) <= 1e-5
    own.save_pretrained(tmp_path)
    back = T.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert checks.relative_error(logits(result.model, ids), logits(back, ids)) <= 1e-5
