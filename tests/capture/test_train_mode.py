"""One trace where training mode changes nothing: capture traces the eval-mode graph, and the
train-mode graph only where training mode changes it (BatchNorm, dropout with p > 0, a branch on
``self.training``). ``torch.export`` calls are counted, and so are the fake-tensor runs that
compare the two modes' operators (none where each read of ``self.training`` cannot change what a
module computes: transformers' attention dropout of 0.0); a batch-1 example reaches BatchNorm
after global pooling in training mode at a batch of two instead of failing."""

from __future__ import annotations

import pytest
import torch
from spruce.capture import modes
from spruce.capture.capture import capture
from spruce.zoo.transformers import HF_EXAMPLES
from torch import nn


@pytest.fixture
def exports(monkeypatch) -> list:
    """The ``torch.export.export`` calls made while the test runs (one entry per call)."""
    calls = []
    real = torch.export.export

    def counting(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


@pytest.fixture
def mode_runs(monkeypatch) -> list:
    """The fake-tensor runs comparing the two modes' operators (one entry, the mode, per run)."""
    runs = []
    real = modes._ops_in_mode

    def counting(module, args, kwargs, training):
        runs.append(training)
        return real(module, args, kwargs, training)

    monkeypatch.setattr(modes, "_ops_in_mode", counting)
    return runs


class ShapeBranch(nn.Module):
    """A branch on a shape: plain fx cannot trace it, so capture goes through torch.export."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        if x.shape[-1] > 1:
            x = self.body(x)
        return x


def cnn_with_batchnorm_after_pooling() -> nn.Module:
    return ShapeBranch(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.BatchNorm1d(8), nn.Linear(8, 4))


def test_a_transformers_decoder_is_exported_once(exports, mode_runs):
    example = HF_EXAMPLES["LlamaForCausalLM"]()  # reads self.training only to pick attention dropout 0.0
    captured = capture(example.model, example.example, dynamic_shapes=example.dynamic_shapes)
    assert captured.method == "export" and captured.whole
    assert exports == ["LlamaForCausalLM"] and mode_runs == []  # its reads of self.training, read, not run
    assert captured.train is None and captured.graph_for(True) is captured.eval


def test_a_transformers_decoder_with_attention_dropout_is_exported_twice(exports, mode_runs):
    example = HF_EXAMPLES["LlamaForCausalLM"]()
    for layer in example.model.model.layers:
        layer.self_attn.attention_dropout = 0.1  # training mode now picks another dropout
    captured = capture(example.model, example.example, dynamic_shapes=example.dynamic_shapes)
    assert mode_runs == [False, True]
    assert exports == ["LlamaForCausalLM", "LlamaForCausalLM"] and captured.train is not None


class PicksDropout(nn.Module):
    """Reads ``self.training`` only to pick its dropout, as transformers' attention does."""

    def __init__(self, p: float):
        super().__init__()
        self.linear, self.p = nn.Linear(6, 6), p

    def forward(self, x):
        if x.shape[-1] > 1:  # plain fx cannot trace it: capture goes through torch.export
            x = self.linear(x)
        return nn.functional.dropout(x, 0.0 if not self.training else self.p, True)


@pytest.mark.parametrize("p, runs, traced", [(0.0, [], 1), (0.5, [False, True], 2)])
def test_a_read_of_training_that_picks_equal_values_needs_no_run(exports, mode_runs, p, runs, traced):
    captured = capture(PicksDropout(p).eval(), torch.randn(2, 6))
    assert mode_runs == runs and len(exports) == traced
    assert (captured.train is None) == (traced == 1)


@pytest.mark.parametrize("dropout", [nn.Identity(), nn.Dropout(0.0)], ids=["plain", "dropout_p0"])
def test_a_linear_relu_net_is_exported_once(exports, dropout):
    model = ShapeBranch(nn.Linear(6, 8), nn.ReLU(), dropout, nn.Linear(8, 3)).eval()
    captured = capture(model, torch.randn(1, 6))
    assert captured.method == "export"
    assert exports == ["ShapeBranch"] and captured.train is None


def test_a_model_whose_train_graph_differs_is_exported_twice(exports):
    torch.manual_seed(0)
    model = ShapeBranch(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    example = torch.randn(2, 6)
    rng = torch.get_rng_state()
    captured = capture(model, example)
    assert torch.equal(torch.get_rng_state(), rng)  # the training-mode runs drew from a forked generator
    assert exports == ["ShapeBranch", "ShapeBranch"]
    assert captured.train is not None and captured.train.code != captured.eval.code
    assert not model.training  # the model's mode is left as it was
    x = torch.randn(4, 6)
    assert torch.equal(captured.eval(x), model(x))
    torch.manual_seed(1)
    dropped = captured.train(x)
    torch.manual_seed(1)
    assert torch.equal(dropped, model.train()(x))  # the train graph drops what the model drops


def test_batchnorm_after_global_pooling_at_batch_one_is_exported_in_training_mode_at_a_batch_of_two(exports):
    torch.manual_seed(0)
    model = cnn_with_batchnorm_after_pooling().eval()
    before = {name: b.clone() for name, b in model.named_buffers()}
    captured = capture(model, torch.randn(1, 3, 16, 16))
    assert exports == ["ShapeBranch", "ShapeBranch"]
    assert captured.train is not None
    assert all("tensor_meta" in n.meta for n in captured.train.graph.nodes if n.op not in ("output",))
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())  # statistics untouched
    x = torch.randn(3, 3, 16, 16)
    expected = model.train()(x)
    model.load_state_dict({**model.state_dict(), **before})
    assert torch.allclose(captured.train(x), expected, atol=1e-6)


class CountsSaturated(nn.Module):
    """A CNN with BatchNorm1d after global pooling whose training-mode forward adds a count read
    from the data: meta and fake tensors cannot propagate it, so the train graph's shapes need a
    real run, which at a batch of one fails in BatchNorm1d (one value per channel)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn1 = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)
        if self.training:
            x = x + (x > 10).nonzero().shape[0]
        return self.fc(self.bn1(x))


def test_a_traced_train_graph_with_batchnorm_after_pooling_propagates_at_a_batch_of_two(exports):
    model = CountsSaturated().eval()
    captured = capture(model, torch.randn(1, 3, 16, 16))  # failed: "example inputs ... do not fit the model"
    assert captured.method == "fx" and exports == []
    assert captured.train is not None and "nonzero" in captured.train.code
    shapes = {n.name: n.meta["tensor_meta"].shape for n in captured.train.graph.nodes if "tensor_meta" in n.meta}
    assert shapes["bn1"] == (2, 8) and shapes["fc"] == (2, 4)
    assert captured.eval.graph.find_nodes(op="call_module", target="fc")[0].meta["tensor_meta"].shape == (1, 4)
