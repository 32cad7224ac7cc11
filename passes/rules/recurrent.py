"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): the hidden size, and an LSTM's
projected size, are channel groups.

A recurrent module keeps one ``hidden_size`` (and one ``proj_size``) for every layer and
direction, so a hidden unit goes from all of them together: its row in each gate block (LSTM:
i, f, g, o; GRU: r, z, n) of ``weight_ih_l{k}``, ``weight_hh_l{k}`` and both biases, its column
of ``weight_hh_l{k}`` (or of ``weight_hr_l{k}`` with projections), and through each layer's
output (the directions' outputs side by side) the next layer's ``weight_ih`` columns and the
features of the module's output. With ``proj_size`` the projected units (rows of
``weight_hr_l{k}``, columns of ``weight_hh_l{k}``, the outputs) are a group of their own.

Exact (the compact model computes what the masked one does): a hidden unit whose gate rows and
biases are zero has, from a zero initial state, a zero cell and a zero output at every step
(LSTM: i = f = o = 1/2 and g = 0, so c = 0 and h = o tanh(c) = 0; GRU: n = 0 and z = 1/2, so h
stays 0; RNN: tanh(0) = relu(0) = 0); a projected unit whose ``weight_hr`` row is zero outputs
zero. Time steps are mixed (pinned); batch rows are independent. A packed sequence (or any
input the rule cannot read as a tensor) keeps every size, with the reason.
"""

from __future__ import annotations

from torch import nn

from ..spaces import Analyzer, Space, TensorDims
from .common import contract, is_multi, pin_new, unknown
from .registry import Call, module_fixer, module_rule

__all__ = ["GATES", "recurrent"]

# gate blocks per hidden unit in the weights' rows, by RNNBase.mode
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _blocks(an: Analyzer, whole: Space, part: Space, copies: int) -> None:
    """``whole`` is ``copies`` blocks of ``part`` one after the other (a weight's gate blocks,
    the directions' outputs of a layer side by side)."""
    for k in range(copies):
        an.slice_same(whole, k * part.size, part, 0, part.size)


def _state(an: Analyzer, call: Call, value: object, batch: Space | None, features: Space, what: str) -> bool:
    """Relate an initial state (layers x directions, [batch,] features) with the module's
    spaces; False where ``value`` is not such a tensor."""
    if not isinstance(value, TensorDims) or len(value) not in (2, 3) or value[-1].size != features.size:
        return False
    an.pin(value[0], f"layers and directions of {what} at node '{call.node.name}'")
    if batch is not None and len(value) == 3:
        an.same(value[1], batch)
    an.same(value[-1], features)
    return True


def _final_state(an: Analyzer, call: Call, layers: int, batch: Space | None, features: Space, label: str) -> TensorDims:
    """The final state (layers x directions, [batch,] features) the module returns."""
    first = pin_new(an, an.new_space(layers, f"{call.node.name}.{label}[0]"), "layers and directions of a state")
    return TensorDims([first, features] if batch is None else [first, batch, features])


def _weights(an: Analyzer, call: Call, hidden: Space, out: Space, inputs: Space | None) -> None:
    """Relate every layer's and direction's weights with the ``hidden`` and ``out`` (projected,
    or ``hidden`` itself) spaces, the first layer's input columns with ``inputs`` (pinned when
    None: an input the rule does not read)."""
    m = call.module
    gates, directions = GATES[m.mode], 2 if m.bidirectional else 1
    for layer in range(m.num_layers):
        for suffix in ("", "_reverse")[:directions]:
            w_ih, w_hh = (an.tensor_dims(getattr(m, f"{name}_l{layer}{suffix}")) for name in ("weight_ih", "weight_hh"))
            _blocks(an, w_ih[0], hidden, gates)
            _blocks(an, w_hh[0], hidden, gates)
            if m.bias:
                for name in ("bias_ih", "bias_hh"):
                    _blocks(an, an.tensor_dims(getattr(m, f"{name}_l{layer}{suffix}"))[0], hidden, gates)
            an.same(w_hh[1], out)
            if out is not hidden:
                w_hr = an.tensor_dims(getattr(m, f"weight_hr_l{layer}{suffix}"))
                an.same(w_hr[0], out)
                an.same(w_hr[1], hidden)
            if layer > 0:
                _blocks(an, w_ih[1], out, directions)
            elif inputs is not None:
                contract(an, call, inputs, w_ih[1])
            else:
                an.pin(w_ih[1], f"input features of a recurrent layer at node '{call.node.name}'")


@module_rule(nn.LSTM, nn.GRU, nn.RNN)
def recurrent(an: Analyzer, call: Call) -> object:
    """The hidden (and projected) units of every layer and direction are one space each; the
    output's features are the last layer's directions side by side."""
    m = call.module
    x, hx = call.arg(0, "input"), call.arg(1, "hx")
    what = f"{type(m).__name__} '{call.node.target}'"
    proj = getattr(m, "proj_size", 0)
    hidden = an.new_space(m.hidden_size, f"{call.node.name}.hidden")
    out = an.new_space(proj, f"{call.node.name}.projected") if proj else hidden
    if not isinstance(x, TensorDims) or len(x) not in (2, 3) or not is_multi(call.meta):
        reason = (f"{what} at node '{call.node.name}' reads a packed sequence or an input it does not take as a "
                  "tensor: its sizes are kept")
        _weights(an, call, hidden, out, None)
        an.pin(hidden, reason)
        an.pin(out, reason)
        return unknown(an, call, reason)
    directions = 2 if m.bidirectional else 1
    batched = len(x) == 3
    time = (1 if m.batch_first else 0) if batched else 0
    batch = x[1 - time] if batched else None
    an.pin(x[time], f"time steps of {what} at node '{call.node.name}'")
    _weights(an, call, hidden, out, x[-1])
    features = an.new_space(directions * out.size, f"{call.node.name}[-1]")
    _blocks(an, features, out, directions)
    output = TensorDims(list(x[:-1]) + [features])
    states = directions * m.num_layers
    h_n = _final_state(an, call, states, batch, out, "h_n")
    lstm = m.mode == "LSTM"
    if hx is not None:
        h0, c0 = (hx if isinstance(hx, (tuple, list)) and len(hx) == 2 else (None, None)) if lstm else (hx, None)
        if not _state(an, call, h0, batch, out, what) or (lstm and not _state(an, call, c0, batch, hidden, what)):
            reason = f"initial state of {what} at node '{call.node.name}' not understood"
            an.pin_value(hx, reason)
            an.pin(hidden, reason)
            an.pin(out, reason)
    if lstm:
        return (output, (h_n, _final_state(an, call, states, batch, hidden, "c_n")))
    return (output, h_n)


@module_fixer(nn.LSTM, nn.GRU, nn.RNN)
def _fix_recurrent(new: nn.Module, old: nn.Module) -> None:
    new.hidden_size = new.weight_hh_l0.shape[0] // GATES[old.mode]
    new.input_size = new.weight_ih_l0.shape[1]
    if getattr(old, "proj_size", 0):
        new.proj_size = new.weight_hr_l0.shape[0]
