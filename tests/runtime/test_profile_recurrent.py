"""Recurrent layers (LSTM, GRU, RNN) in the latency table: timed over (input features, hidden
size) on a real ONNX Runtime target, so a latency budget sees what their hidden units cost."""

from __future__ import annotations

import pytest
import torch
from helpers import analyze_model, profile
from spruce.passes.export import remove_channels
from spruce.passes.sparsity.knapsack import build_cost_model
from spruce.runtime.layers import find_layers
from spruce.runtime.measure import layer_case
from spruce.runtime.table import model_widths
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from torch import nn


class Crnn(nn.Module):
    """A 1-D convolution over (N, F, T), a bidirectional 2-layer LSTM over its steps, a per-step head:
    the shape of a CTC recogniser."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 32, 3, padding=1)
        self.rnn = nn.LSTM(32, 64, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, _ = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
        return self.head(steps)


@pytest.fixture(scope="module")
def crnn(tmp_path_factory):
    torch.manual_seed(0)
    model, inputs = Crnn().eval(), (torch.randn(1, 8, 40),)
    table = profile(model, inputs, OnnxRuntimeCPU(threads=1), step=16, coarse=2, edges=False, warmup=1, repeats=4,
                    calibration_random=1, retries=0, progress=False, cache_dir=tmp_path_factory.mktemp("cache"))
    return model, inputs, table


def test_an_lstm_is_profiled_over_its_input_and_hidden_size(crnn):
    model, inputs, table = crnn
    entry = table.layers["rnn"]
    assert (entry.gates, entry.directions, entry.stacked) == (4, 2, 2) and entry.recurrent
    assert (entry.in_channels, entry.out_channels) == (32, 64) and entry.in_varies and entry.out_varies
    assert entry.out_coarse == (16, 64) and "LSTM(layers=2,bidirectional=True" in entry.signature
    # the weights it streams: 4 gates x 2 directions x (input + hidden matrices, and the second layer's)
    assert entry.weight_elements(32, 64) == sum(p.numel() for n, p in model.rnn.named_parameters() if "weight" in n)
    # a quarter of the hidden units is measurably cheaper (8 x fewer recurrent MACs)
    assert table.isolated_ms("rnn", 32, 16) < 0.8 * table.isolated_ms("rnn", 32, 64)


def test_the_latency_cost_model_prices_hidden_units_by_the_table(crnn):
    model, inputs, table = crnn
    analysis = analyze_model(model, inputs)
    cost = build_cost_model("latency", model, analysis, latency_table=table)
    assert "rnn" in {term.name for term in cost.terms}
    hidden = next(g for g in analysis.groups if g.prunable and any(m.name == "rnn.weight_hh_l0" for m in g.members))
    kept = {g.id: g.size for g in analysis.groups if g.prunable}
    full = cost.cost(kept)
    assert full == pytest.approx(table.dense_ms())
    cost_small = cost.cost({**kept, hidden.id: 16})
    assert cost_small == pytest.approx(full - table.layer_ms("rnn", 32, 64) + table.layer_ms("rnn", 32, 16)
                                       - table.layer_ms("head", 128, 10) + table.layer_ms("head", 32, 10))
    # a compact model's widths are read back from its LSTM
    compact = remove_channels(analysis, model, {hidden.id: torch.arange(16)})
    assert model_widths(compact, table.layers)["rnn"] == (32, 16)
    assert table.predict_model(compact) == pytest.approx(cost_small)


def test_time_major_and_projected_layers():
    """A time-major GRU is timed with its batch at dim 1; an LSTM with ``proj_size`` is not profiled
    (its time stays in the calibration's overhead)."""
    gru = nn.GRU(6, 10, bidirectional=True)
    resized, example = layer_case(gru, (7, 2, 6), 4, 5, batch_size=3)
    assert example.shape == (7, 3, 4) and resized(example).shape == (7, 3, 10)
    projected = nn.Sequential(nn.Linear(6, 6), nn.LSTM(6, 10, proj_size=4, batch_first=True))
    found = find_layers(projected, (torch.randn(2, 5, 6),))
    assert list(found) == ["0"]
