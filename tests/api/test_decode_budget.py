"""A decode budget in the measured budget loop: the decode timer stands where a target goes,
turns compact graphs back into transformers decoders, and times them per decoded token."""

from __future__ import annotations

import numpy as np
import pytest
import spruce
import torch
from spruce.api.budget import decode_timer, meet_budget
from spruce.passes.importance import importance_scores, param_table
from spruce.passes.sparsity.knapsack import InfeasibleBudget, build_cost_model
from spruce.runtime.budget import BAND_HIGH, meet_latency_budget
from spruce.zoo.transformers import build


@pytest.fixture(scope="module")
def llama():
    example = build("LlamaForCausalLM")
    return example, spruce.prune(example.model.eval(), example.example, ratio=0.5,
                                 dynamic_shapes=example.dynamic_shapes)


def test_the_decode_timer_writes_a_compact_graph_back_and_times_it_per_token(llama):
    example, pruned = llama
    timer = decode_timer(example.model, new_tokens=3)
    ids = example.example["input_ids"][:1]
    dense, compact = timer.measure_models([(example.model, (ids,)), (pruned.model, (ids,))], warmup=1, rounds=3)
    assert dense.robust_ms() > 0 and compact.robust_ms() > 0
    assert timer.as_decoder(pruned.model).config.intermediate_size == 32  # written back: a cache to decode with


def test_the_measured_loop_takes_a_decode_budget(llama):
    example, pruned = llama
    model, analysis = example.model, pruned.analysis
    params = param_table(model)
    importance = {g.id: importance_scores("l1", g, params, np.random.default_rng(0))
                  for g in analysis.groups if g.prunable}
    ids = example.example["input_ids"][:1]
    # a budget of 1.0 keeps every channel: dense against its written-back twin, the same work; on a
    # loaded machine their per-token ratio can still leave the band, and the loop then says so by name
    try:
        chosen = meet_latency_budget(analysis, model, None, decode_timer(model, new_tokens=3), 1.0, importance,
                                     (ids,), cost_model=build_cost_model("flops", model, analysis), timing_rounds=5,
                                     warmup=1, rounds=2)
    except InfeasibleBudget as exc:
        assert "on target 'decode' at batch 1" in str(exc) and exc.minimum > 0
        return
    assert chosen.attempts and chosen.measured_ms > 0 and chosen.measured_dense_ms > 0
    whole = all(chosen.counts[g.id] == g.size for g in analysis.groups if g.id in chosen.counts)
    # or the twin (the first attempt keeps every channel) measured above the band, and the loop's
    # fallback shrank every group by measurement instead of refusing (issue 30)
    assert whole or chosen.attempts[0].ratio > BAND_HIGH, [a.ratio for a in chosen.attempts]


def test_meet_budget_refuses_a_decode_budget_without_the_decode_timer():
    with pytest.raises(ValueError, match="decode_timer"):
        meet_budget(object(), torch.zeros(1, 4, dtype=torch.long), "onnxruntime", {"decode": 0.5})
