"""Causal language models in compile (#29), the cheap pieces: the ``lm`` output kind recognised
from a transformers causal LM (never generic class scores), its floor, the chunked next-token
KL (equal to the plain one, pads skipped), the perplexity ratio and next-token agreement
against hand-computed values, the recovery token budget, and uniform counts (one count per
role in every layer) with the exact-enumeration oracle on a tiny Llama."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import analyze_model
from spruce.compiler.fidelity import measure_outputs
from spruce.compiler.kinds import KINDS, OutputDeclaration
from spruce.compiler.lm import causal_lm_reason, lm_kl, lm_loss, next_token_nll, recovery_tokens
from spruce.compiler.outputs import distill_loss, plan_outputs
from spruce.passes.sparsity.knapsack import build_cost_model, select_channels
from spruce.passes.sparsity.uniform import tie_problem, uniform_classes, untie

T = pytest.importorskip("transformers")

PAD = 0


def _llama(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           pad_token_id=PAD, use_cache=False)
    return T.LlamaForCausalLM(config).eval()


def _tokens(n: int = 3, length: int = 9, padded: int = 3) -> torch.Tensor:
    ids = torch.randint(1, 48, (n, length), generator=torch.Generator().manual_seed(1))
    ids[0, -padded:] = PAD  # a right-padded sequence
    return ids


def test_a_causal_lm_is_recognised_and_its_logits_are_of_kind_lm():
    model = _llama()
    assert "LlamaForCausalLM" in causal_lm_reason(model)
    assert causal_lm_reason(torch.nn.Linear(2, 2)) is None
    outputs = model(_tokens())
    recognised = {"output['logits']": (OutputDeclaration(kind="lm", pad=PAD), causal_lm_reason(model))}
    plan = plan_outputs(outputs, batch={"output['logits']": 0}, recognised=recognised)
    (spec,) = plan.outputs
    assert (spec.kind, spec.loss, spec.pad, spec.class_dim) == ("lm", "lm_kl", PAD, 2)
    assert plan.warnings() == [] and plan.record()[0]["kind_from"].startswith("recognised")
    # without the model's word the same layout is generic class scores (what #29 forbids for an LM)
    assert plan_outputs(outputs, batch={"output['logits']": 0}).outputs[0].kind == "scores"
    assert KINDS["lm"].floor.text() == "perplexity_ratio<=1.25"


def test_chunked_kl_equals_the_plain_kl_and_skips_pads():
    student, teacher = torch.randn(3, 9, 48, requires_grad=True), torch.randn(3, 9, 48)
    tokens = _tokens()
    keep = tokens[:, 1:] != PAD
    plain = F.kl_div(F.log_softmax(student[:, :-1][keep] / 2, -1), F.log_softmax(teacher[:, :-1][keep] / 2, -1),
                     log_target=True, reduction="batchmean") * 4
    for chunk in (1, 3, 256):
        got = lm_kl(student, teacher, tokens, PAD, temperature=2.0, chunk=chunk)
        assert torch.allclose(got, plain, atol=1e-5), chunk
    grad = torch.autograd.grad(lm_kl(student, teacher, tokens, PAD, chunk=2), student)[0]
    assert grad[0, -4:].abs().sum() == 0  # positions whose next token is a pad (and the last) get no gradient
    assert grad[1, :-1].abs().sum() > 0
    changed = teacher.clone()
    changed[0, -3:] += 5.0  # logits at pad-predicting positions do not count
    assert torch.allclose(lm_kl(student, changed, tokens, PAD), lm_kl(student, teacher, tokens, PAD))


def test_perplexity_ratio_and_agreement_are_the_hand_computed_values():
    model = _llama()
    tokens = _tokens()
    recognised = {"output['logits']": (OutputDeclaration(kind="lm", pad=PAD), "test")}
    with torch.no_grad():
        dense, compiled = model(tokens), {"logits": model(tokens).logits + torch.randn(3, 9, 48)}
    plan = plan_outputs(dense, batch={"output['logits']": 0}, recognised=recognised)
    got = measure_outputs([(compiled, dense, tokens)], plan)["output['logits']"]
    keep = tokens[:, 1:] != PAD
    nll = [F.cross_entropy(x[:, :-1][keep], tokens[:, 1:][keep]) for x in (compiled["logits"], dense.logits)]
    assert math.isclose(got["perplexity_ratio"], math.exp(nll[0] - nll[1]), rel_tol=1e-4)
    same = (compiled["logits"][:, :-1].argmax(-1) == dense.logits[:, :-1].argmax(-1))[keep].float().mean()
    assert math.isclose(got["next_token_agreement"], float(same), rel_tol=1e-6)
    # the built-in LM loss is transformers' own loss with labels (pads as -100)
    labels = tokens.masked_fill(tokens == PAD, -100)
    assert torch.allclose(lm_loss(dense, {"input_ids": tokens}, PAD), model(tokens, labels=labels).loss, atol=1e-5)
    total, count = next_token_nll(dense.logits, tokens, PAD)
    assert count == int(keep.sum())
    # distill_loss of the plan is the chunked KL with the plan's pad
    assert torch.allclose(distill_loss(compiled, dense, plan, tokens), lm_kl(compiled["logits"], dense.logits, tokens,
                                                                              PAD))


def test_recovery_tokens_default_to_a_tenth_of_the_training_tokens(tmp_path):
    assert recovery_tokens(123, tmp_path) == (123, "recover_tokens")
    assert recovery_tokens(None, tmp_path)[0] is None
    (tmp_path / "training.json").write_text(json.dumps({"tokens": 50_000}))
    assert recovery_tokens(None, tmp_path)[0] == 5_000
    (tmp_path / "training.json").write_text(json.dumps({"tokens_trained": 301_628, "steps": 149}))  # examples/lm
    assert recovery_tokens(None, tmp_path)[0] == 30_162
    (tmp_path / "training.json").write_text("{}")
    with pytest.raises(ValueError, match="recover_tokens"):
        recovery_tokens(None, tmp_path)


def test_uniform_counts_are_the_best_equal_counts_under_the_budget():
    """Tied selection keeps one count per role in every layer, and is the most important
    such choice within the budget (exhaustive over the equal-count configurations)."""
    model = _llama(layers=3)
    analysis = analyze_model(model, (_tokens(1, 8, 0),))
    ties = uniform_classes(analysis.groups)
    assert sorted(len(c) for c in ties.classes) == [3, 3]  # query heads per GQA group, MLP width
    cost = build_cost_model("params", model, analysis)
    rng = np.random.default_rng(0)
    importance = {g: rng.random(size) for g, size in cost.sizes.items()}
    tied_cost, tied_importance, _ = tie_problem(cost, importance, ties)
    budget = 0.8 * cost.dense()
    chosen = untie(select_channels(tied_cost, tied_importance, budget), importance, ties, sorted(cost.sizes))
    for members in ties.classes:
        assert len({chosen.counts[g] for g in members}) == 1
    assert cost.cost(chosen.counts) <= budget

    def value(counts):
        return sum(np.sort(importance[g])[::-1][:counts[g]].sum() for g in cost.sizes)

    best = 0.0
    sizes = [cost.sizes[members[0]] for members in ties.classes]
    for picks in itertools.product(*(range(1, s + 1) for s in sizes)):
        counts = {g: k for members, k in zip(ties.classes, picks) for g in members}
        if cost.cost(counts) <= budget:
            best = max(best, value(counts))
    assert value(chosen.counts) >= best - 1e-9
    for g, kept in chosen.kept.items():  # each group keeps its own most important channels
        assert set(kept) == set(np.argsort(-importance[g])[:chosen.counts[g]])


def test_uneven_counts_write_no_hf_folder_and_name_the_field(tmp_path):
    """Without uniform counts, write-back refuses naming the config field; the .pt2 stays."""
    from spruce.capture.trace import capture
    from spruce.compiler.lm_artifacts import lm_artifacts, sequence_dims
    from spruce.passes.analysis import analyze
    from spruce.passes.export import remove_channels

    model = _llama()
    example = _tokens(1, 8, 0)
    graph = capture(model, (example,), dynamic_shapes=sequence_dims(model, example))
    analysis = analyze(graph)
    mlp = [g for g in analysis.groups if g.prunable and g.size == 48]
    kept = {g.id: np.arange(8 * (i + 1)) for i, g in enumerate(mlp)}  # 8 in layer 0, 16 in layer 1
    record = lm_artifacts(remove_channels(analysis, model, kept), model, graph, tmp_path, None)
    assert record["hf"].startswith("not written") and "intermediate_size differs" in record["hf"]
    assert record["pt2"] == "model.pt2" and (tmp_path / "model.pt2").is_file() and not (tmp_path / "hf").exists()


def test_activation_importance_ranks_a_silent_channel_last():
    """An MLP channel whose up-projection row is zero never carries an activation into
    down_proj: its calibration score is 0 and every other channel's is positive."""
    from spruce.compiler.activation_importance import activation_importance

    model = _llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5] = 0.0
    analysis = analyze_model(model, (_tokens(1, 8, 0),))
    scores, line = activation_importance(model, analysis.groups, [_tokens(), _tokens(2, 9, 0)])
    (mlp,) = [g for g in analysis.groups if g.prunable and any(m.name == "model.layers.0.mlp.down_proj.weight"
                                                                 for m in g.members)]
    assert scores[mlp.id][5] == 0.0 and (np.delete(scores[mlp.id], 5) > 0).all()
    assert f"for {len(scores)} of {len(scores)} groups" in line  # heads (o_proj) and MLP widths alike
