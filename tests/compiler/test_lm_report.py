"""The language-model section of the compile report: dense and compiled side by side on held-out
token batches (perplexity, agreement, footprint, removed structures, decode at batch 1 and 8)."""

from __future__ import annotations

import json

import pytest
import spruce
import torch
from spruce.compiler.lm_report import lm_lines, lm_section
from spruce.zoo.transformers import VOCAB, build


@pytest.fixture(scope="module")
def models():
    example = build("LlamaForCausalLM")
    dense = example.model.eval()
    compact = spruce.prune(dense, example.example, ratio=0.5, dynamic_shapes=example.dynamic_shapes).model.eval()
    return dense, compact


def _held_out() -> list[dict]:
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0  # too short for a prompt of 8
    ids = ids.masked_fill(mask == 0, 0)
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]


def test_the_section_puts_dense_and_compiled_side_by_side(models):
    dense, compact = models
    section = lm_section(dense, compact, _held_out(), sequence_length=16, new_tokens=3, rounds=2,
                         user_metrics={"dense": {"acc": 0.5}, "compiled": {"acc": 0.25}})
    json.dumps(section)  # JSON-ready
    evaluation = section["evaluation"]
    assert evaluation["compiled"]["parameters"] < evaluation["dense"]["parameters"]
    assert evaluation["removed"]["config"]["intermediate_size"][0] == 64
    assert evaluation["continuations"]["prompts"] == 3 and section["prompt_tokens"] == 8  # rows with 8 real tokens
    assert [(r["which"], r["batch_size"]) for r in section["decode"]] == [
        ("dense", 1), ("compiled", 1), ("dense", 8), ("compiled", 8)]
    assert set(section["decode_ratio"]) == {"1", "8"}
    text = "\n".join(lm_lines(section))
    for needle in ("## Language model", "Perplexity ratio", "next-token top-1 agreement", "intermediate_size 64 →",
                   "| 8 |", "`--evaluate` (compiled): acc 0.2500"):
        assert needle in text, needle
    assert lm_lines(None) == []


def test_a_compiled_model_that_cannot_decode_says_why(models):
    dense, _ = models
    other = build("Qwen2ForCausalLM").model.eval()  # not a compact graph of dense, and of another class

    class Logits(torch.nn.Module):
        def forward(self, input_ids):
            return other(input_ids=input_ids, use_cache=False).logits

    section = lm_section(dense, Logits(), _held_out(), sequence_length=16, new_tokens=2, rounds=1)
    assert "decode" not in section and "to_transformers" in section["decode_note"]
    assert "Decode not timed" in "\n".join(lm_lines(section))
