"""Recurrent layers prune exactly: LSTM / GRU hidden sizes (and an LSTM's projected size) are
channel groups, and the compact model computes what the masked model does (random, non-degenerate
weights; bidirectional, two layers, batch_first both ways, proj_size, a Linear head on the
outputs). A packed sequence keeps every size, with a reason."""

from __future__ import annotations

import pytest
import spruce
import torch
from helpers import randomize, relative_error
from spruce.capture.capture import capture
from spruce.passes.analysis import solve
from spruce.passes.rules.recurrent import recurrent
from spruce.passes.rules.registry import Call
from spruce.passes.spaces import Analyzer
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.nn.utils.rnn import PackedSequence


class Recurrent(nn.Module):
    """A recurrent layer on (batch, time, features) inputs followed by a Linear head on every step."""

    def __init__(self, kind: str, batch_first: bool, bidirectional: bool = True, layers: int = 2, proj: int = 0,
                 with_state: bool = False):
        super().__init__()
        options = {"proj_size": proj} if proj else {}
        self.rnn = getattr(nn, kind)(5, 12, num_layers=layers, batch_first=batch_first,
                                     bidirectional=bidirectional, **options)
        self.batch_first = batch_first
        width = (proj or 12) * (2 if bidirectional else 1)
        self.head = nn.Linear(width, 3)
        self.with_state = with_state
        if with_state:  # the initial state computed from the input by a Linear layer
            self.h0 = nn.Linear(5, proj or 12)

    def forward(self, x):
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.with_state:
            h0 = self.h0(x.mean(1)).unsqueeze(0).expand(self.rnn.num_layers * 2, -1, -1).contiguous()
            out, _ = self.rnn(seq, h0)
        else:
            out, _ = self.rnn(seq)
        return self.head(out)


CASES = {
    "lstm_bidirectional_2_layers": dict(kind="LSTM", batch_first=True),
    "lstm_time_major": dict(kind="LSTM", batch_first=False),
    "lstm_proj": dict(kind="LSTM", batch_first=True, proj=7),
    "lstm_proj_time_major": dict(kind="LSTM", batch_first=False, proj=7),
    "lstm_one_direction": dict(kind="LSTM", batch_first=True, bidirectional=False, layers=3),
    "gru_bidirectional_2_layers": dict(kind="GRU", batch_first=True),
    "gru_time_major": dict(kind="GRU", batch_first=False),
    "gru_initial_state": dict(kind="GRU", batch_first=True, with_state=True),
    "rnn_tanh": dict(kind="RNN", batch_first=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compact_equals_masked(case):
    model = randomize(Recurrent(**CASES[case])).eval()
    x = torch.randn(2, 6, 5)
    result = spruce.prune(model, x, ratio=0.5)
    groups = [g for g in result.groups if any(m.name.startswith("rnn.weight_hh") for m in g.members)]
    assert groups and all(g.prunable for g in groups), [g.reason for g in groups]
    rnn = result.model.get_submodule("rnn")
    assert rnn.hidden_size < 12
    if CASES[case].get("proj"):
        assert rnn.proj_size < 7
    with torch.no_grad():
        masked, compact, original = result.masked(x), result.model(x), model(x)
    assert relative_error(masked, compact) <= 1e-5
    assert relative_error(original, masked) > 1e-4
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())


def test_hidden_units_go_from_every_gate_layer_and_direction():
    model = randomize(Recurrent("LSTM", batch_first=True, proj=7)).eval()
    result = spruce.prune(model, torch.randn(2, 6, 5), ratio=0.5)
    hidden = next(g for g in result.groups if any(m.name == "rnn.weight_ih_l0" and m.dim == 0 for m in g.members))
    names = {(m.name, m.dim) for m in hidden.members}
    for layer in (0, 1):
        for suffix in ("", "_reverse"):
            for name, dim in (("weight_ih", 0), ("weight_hh", 0), ("bias_ih", 0), ("bias_hh", 0), ("weight_hr", 1)):
                assert (f"rnn.{name}_l{layer}{suffix}", dim) in names
    assert hidden.member("rnn.weight_ih_l0", 0).index.shape[1] == 4  # one row per gate
    projected = next(g for g in result.groups if any(m.name == "rnn.weight_hr_l0" and m.dim == 0 for m in g.members))
    names = {(m.name, m.dim) for m in projected.members}
    assert {("rnn.weight_hh_l0", 1), ("rnn.weight_ih_l1", 1), ("head.weight", 1)} <= names
    assert projected.member("rnn.weight_ih_l1", 1).index.shape[1] == 2  # both directions of layer 0


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


def test_a_packed_sequence_keeps_every_size_with_a_reason():
    """The rule refuses a packed input (every dim it touches pinned, the reason naming it) ..."""
    lstm = nn.LSTM(5, 12)
    an = Analyzer(lstm)
    node = fx.Graph().create_node("call_module", "rnn", name="rnn")
    data, sizes = an.new_dims((12, 5), "data"), an.new_dims((6,), "batch_sizes")
    packed = tuple.__new__(PackedSequence, (data, sizes, None, None))  # as the analysis sees one
    meta = (TensorMetadata(torch.Size([12, 12]), torch.float32, False, (12, 1), torch.contiguous_format, False, {}),)
    an.current = node
    recurrent(an, Call(node, (packed,), {}, meta, lstm))
    assert any("packed sequence" in reason for reason in an.reasons), an.reasons
    hidden = [g for g in solve(an).groups if any(m.name.startswith("weight_hh") for m in g.members)]
    assert hidden and not any(g.prunable for g in hidden)
    assert all("packed sequence" in g.reason for g in hidden), [g.reason for g in hidden]
    # ... and a model packing its input leaves its LSTM eager and whole, saying why
    model = randomize(Packed()).eval()
    x = torch.randn(2, 6, 5)
    assert any("'rnn'" in note for note in capture(model, (x,)).notes)
    result = spruce.prune(model, x, ratio=0.5)
    assert result.model.get_submodule("rnn").hidden_size == 12
