"""Deployment of a model whose ``forward`` takes ``*args, **kwargs`` (as a compact model that
switches between its train and eval graphs does): the ``.pt2`` binds the user's input names,
so the shape guards torch.export records reload and run in a fresh process."""

from __future__ import annotations

import inspect

import torch
from spruce.compiler import deploy
from torch import nn


class Pair(nn.Module):
    """Sizes computed from two inputs' batches: torch.export records guards naming both."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, tokens: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        h = self.lin(tokens)
        return h.reshape(other.shape[0], -1, 8).sum(1) * (tokens.shape[0] // other.shape[0])


class Forwarding(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _part() -> deploy.Part:
    torch.manual_seed(0)
    model = Forwarding(Pair()).eval()
    first = {"tokens": torch.randn(2, 3, 8), "other": torch.randn(2, 5)}
    second = {"tokens": torch.randn(3, 3, 8), "other": torch.randn(3, 5)}
    return deploy.Part("model", model, ((), first), ((), second))


def test_call_signature_names_the_inputs_of_a_forwarding_model():
    part = _part()
    signature = deploy.call_signature(part.module, *part.inputs)
    assert list(signature.parameters) == ["tokens", "other"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in signature.parameters.values())
    positional = deploy.call_signature(part.module, (torch.zeros(1), torch.zeros(2)), {})
    assert list(positional.parameters) == ["args_0", "args_1"]
    plain = deploy.call_signature(Pair(), (torch.zeros(2, 3, 8),), {"other": torch.zeros(2, 5)})
    assert plain == inspect.signature(Pair().forward)  # a forward without *args/**kwargs keeps its own


def test_guarded_pt2_of_a_forwarding_model_reloads_in_a_fresh_process(tmp_path):
    part = _part()
    path = deploy.save_pt2(part, tmp_path / "model.pt2")
    guards = torch.export.load(path)._guards_code
    assert guards and all("L['kwargs']" not in g for g in guards), guards
    errors = deploy.check_pt2_in_fresh_process([(path, part)])
    assert len(errors) == 1 and errors[0] <= 1e-5, errors
