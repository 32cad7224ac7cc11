"""Every operator rule pins, or handles exactly, each dimension its operator reduces over.

The probe: a (N, C, L) tensor whose channel dim C and length dim L both come from linear
layers, so both are prunable unless a rule pins them, and both are consumed by parameter
contractions (which keep them prunable). One operator sits in between. The pruned model
must compute what its masked model computes, in eval and in training mode (batch statistics):
an operator that averages, normalises, slides a window or accumulates along a dim whose
channels get removed changes the result, unless its rule pinned that dim.
"""

from __future__ import annotations

import pytest
import spruce
import torch
import torch.nn.functional as F
from helpers import randomize, relative_error
from torch import nn

C, L = 8, 12

# operator name -> (modules and parameters it needs, its function of the probe and T (N, C, L))
OPS = {
    "F.batch_norm training": ({}, lambda p, t: F.batch_norm(t, None, None, training=True)),
    "F.batch_norm on the (C, L) plane": ({}, lambda p, t: F.batch_norm(
        t.transpose(1, 2), None, None, training=True).transpose(1, 2)),
    "BatchNorm1d": ({"norm": lambda: nn.BatchNorm1d(C)}, lambda p, t: p.norm(t)),
    "BatchNorm1d over L": ({"norm": lambda: nn.BatchNorm1d(L)}, lambda p, t: p.norm(t.transpose(1, 2)).transpose(1, 2)),
    "InstanceNorm1d": ({"norm": lambda: nn.InstanceNorm1d(C, affine=True)}, lambda p, t: p.norm(t)),
    "F.instance_norm": ({}, lambda p, t: F.instance_norm(t)),
    "GroupNorm": ({"norm": lambda: nn.GroupNorm(2, C)}, lambda p, t: p.norm(t)),
    "F.group_norm": ({}, lambda p, t: F.group_norm(t, 2)),
    "LayerNorm over L": ({"norm": lambda: nn.LayerNorm(L)}, lambda p, t: p.norm(t)),
    "F.layer_norm over (C, L)": ({}, lambda p, t: F.layer_norm(t, (C, L))),
    "LocalResponseNorm": ({"norm": lambda: nn.LocalResponseNorm(3)}, lambda p, t: p.norm(t)),
    "softmax over C": ({}, lambda p, t: torch.softmax(t, 1)),
    "log_softmax over L": ({}, lambda p, t: F.log_softmax(t, dim=-1)),
    "nn.Softmax over L": ({"norm": lambda: nn.Softmax(dim=2)}, lambda p, t: p.norm(t)),
    "cumsum over L": ({}, lambda p, t: t.cumsum(2)),
    "F.normalize over C": ({}, lambda p, t: F.normalize(t, dim=1)),
    "minus the mean over C": ({}, lambda p, t: t - t.mean(1, keepdim=True)),
    "over the std over L": ({}, lambda p, t: t / (t.std(2, True, True) + 1.0)),
    "minus logsumexp over C": ({}, lambda p, t: t - torch.logsumexp(t, 1, keepdim=True)),
    "times amax over L": ({}, lambda p, t: t * t.amax(-1, keepdim=True)),
    "avg_pool1d window": ({}, lambda p, t: F.avg_pool1d(t, 3, 1, 1)),
    "max_pool1d window": ({}, lambda p, t: F.max_pool1d(t, 3, 1, 1)),
    "nn.AvgPool1d window": ({"norm": lambda: nn.AvgPool1d(3, 1, 1)}, lambda p, t: p.norm(t)),
    "minus adaptive_avg_pool1d": ({}, lambda p, t: t - F.adaptive_avg_pool1d(t, 1)),
    "interpolate linear": ({}, lambda p, t: F.interpolate(t, size=L, mode="linear")),
    "Conv1d window": ({"norm": lambda: nn.Conv1d(C, C, 3, padding=1)}, lambda p, t: p.norm(t)),
    "depthwise Conv1d window": ({"norm": lambda: nn.Conv1d(C, C, 3, padding=1, groups=C)}, lambda p, t: p.norm(t)),
    "F.conv1d window": ({"kernel": lambda: nn.Parameter(torch.randn(C, C, 3))},
                        lambda p, t: F.conv1d(t, p.kernel, padding=1)),
    "roll over L": ({}, lambda p, t: torch.roll(t, 1, 2)),
    "flip over L": ({}, lambda p, t: torch.flip(t, [2])),
    "sdpa causal over L (query rows)": ({"keys": lambda: nn.Parameter(torch.randn(L, C)),
                                         "values": lambda: nn.Parameter(torch.randn(L, C))},
                                        lambda p, t: F.scaled_dot_product_attention(
                                            t.transpose(1, 2), p.keys, p.values, is_causal=True).transpose(1, 2)),
    "sdpa causal, positional": ({"keys": lambda: nn.Parameter(torch.randn(L, C)),
                                 "values": lambda: nn.Parameter(torch.randn(L, C))},
                                lambda p, t: F.scaled_dot_product_attention(
                                    t.transpose(1, 2), p.keys, p.values, None, 0.0, True).transpose(1, 2)),
    "identity (control)": ({}, lambda p, t: t),
}


class Probe(nn.Module):
    """x (N, 5) -> T[n, c, l] = a[n, c] * b[n, l] (a, b from linear layers) -> op -> T' @ W_l
    -> transpose -> @ W_c: C and L are each one prunable group unless the op pins them."""

    def __init__(self, op_name: str):
        super().__init__()
        self.to_c = nn.Linear(5, C)
        self.to_l = nn.Linear(5, L)
        self.w_l = nn.Parameter(torch.randn(L, 3))
        self.w_c = nn.Parameter(torch.randn(C, 2))
        parts, self.fn = OPS[op_name]
        for name, make in parts.items():
            setattr(self, name, make())

    def forward(self, x):
        t = F.relu(self.to_c(x))[:, :, None] * torch.tanh(self.to_l(x))[:, None, :]
        t = self.fn(self, t)
        return (t @ self.w_l).transpose(1, 2) @ self.w_c


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_rules_pin_the_dims_their_operator_reduces_over(op_name):
    torch.manual_seed(0)
    model = randomize(Probe(op_name)).eval()
    x = torch.randn(4, 5)
    result = spruce.prune(model, x, ratio=0.5)
    assert result.kept or not any(g.prunable for g in result.groups)
    for mode in ("eval", "train"):
        compact, masked = result.model.train(mode == "train"), result.masked.train(mode == "train")
        with torch.no_grad():
            err = relative_error(masked(x), compact(x))
        assert err < 1e-5, f"{op_name}: compact differs from masked by {err:.2e} in {mode} mode"


def test_the_probe_has_teeth():
    """Without an operator in between, both C and L are prunable and pruned."""
    model = randomize(Probe("identity (control)")).eval()
    result = spruce.prune(model, torch.randn(4, 5), ratio=0.5)
    pruned = {(m.name, m.dim) for g in result.groups if g.id in result.kept for m in g.members}
    assert ("to_c.weight", 0) in pruned and ("to_l.weight", 0) in pruned


class WSConvNet(nn.Module):
    """Weight standardisation as NF-ResNet / BiT write it: the conv weight normalised per output
    channel by F.batch_norm on its (1, out, in * k * k) view (#13: the compact model differed
    from the masked one by 0.99 of the output scale)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    @staticmethod
    def standardised(conv: nn.Conv2d) -> torch.Tensor:
        w = conv.weight
        return F.batch_norm(w.reshape(1, conv.out_channels, -1), None, None, training=True, momentum=0.0,
                            eps=1e-5).reshape_as(w)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.standardised(self.a), self.a.bias, padding=1))
        x = F.relu(F.conv2d(x, self.standardised(self.b), self.b.bias, padding=1))
        return self.fc(x.mean((2, 3)))


def test_weight_standardisation_through_batch_norm_is_exact():
    torch.manual_seed(0)
    model = WSConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    result = spruce.prune(model, x, ratio=0.5)
    with torch.no_grad():
        err = relative_error(result.masked(x), result.model(x))
    assert err < 1e-5, f"compact differs from masked by {err:.2e} (relative)"
    groups = {(m.name, m.dim): g for g in result.groups for m in g.members}
    # the standardised weights' input channels are averaged over, and the weight the conv
    # contracts with is computed in the graph: pinned, with a reason saying which
    assert not groups[("b.weight", 1)].prunable
    assert any(why in groups[("b.weight", 1)].reason for why in ("averages over this dim", "contraction between "
                                                                 "activations at node 'conv2d_1'"))
    assert "averages over this dim" in groups[("b.weight", 3)].reason
    assert groups[("b.weight", 0)].prunable  # each output channel is standardised on its own
