"""The eager recording run: a small model runs on one intra-op thread and the caller's thread
count comes back after, also when the forward raises; a model above the threshold keeps the
caller's threads."""

from __future__ import annotations

import pytest
import torch
from spruce.capture import record
from spruce.capture.record import record_calls
from torch import nn


class ThreadSpy(nn.Module):
    """A linear layer that notes the intra-op thread count it runs on, and can raise."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fail = fail
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        if self.fail:
            raise RuntimeError("boom")
        return self.fc(x)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_a_small_model_records_on_one_thread_and_restores_the_count(two_threads):
    model = ThreadSpy()
    rec = record_calls(model, (torch.randn(3, 4),), {}, keep=lambda p, m: p == "fc")
    assert model.seen == [1]
    assert torch.get_num_threads() == two_threads
    assert len(rec.calls["fc"]) == 1 and rec.calls["fc"][0].output.shape == (3, 4)


def test_the_thread_count_is_restored_when_the_forward_raises(two_threads):
    with pytest.raises(RuntimeError, match="boom"):
        record_calls(ThreadSpy(fail=True), (torch.randn(3, 4),), {}, keep=lambda p, m: False)
    assert torch.get_num_threads() == two_threads


def test_a_model_above_the_threshold_keeps_the_callers_threads(two_threads, monkeypatch):
    monkeypatch.setattr(record, "SINGLE_THREAD_MAX_PARAMS", 10)  # the spy has 20 parameters
    model = ThreadSpy()
    record_calls(model, (torch.randn(3, 4),), {}, keep=lambda p, m: False)
    assert model.seen == [two_threads]
