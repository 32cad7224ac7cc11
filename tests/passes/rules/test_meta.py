"""The shape rules that stand in for slow meta kernels (spruce.passes.rules.meta) agree with the
real kernels: on an input that fits, the same output shape and dtype; on one that does not
(a module or operand that lost channels), both raise. Every registered rule has a case here:
adding a rule means adding a case."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from spruce.passes.rules.meta import MetaRun, runs_on_meta
from spruce.passes.rules.registry import FUNCTION_SHAPES, MODULE_SHAPES
from torch import fx, nn

C = 6


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)


# module type -> (module with C channels, fitting input, misfitting input or None)
MODULE_CASES: dict[type, tuple] = {
    nn.BatchNorm1d: (nn.BatchNorm1d(C), _x(2, C, 5), _x(2, C - 1, 5)),
    nn.BatchNorm2d: (nn.BatchNorm2d(C), _x(2, C, 5, 4), _x(2, C - 1, 5, 4)),
    nn.BatchNorm3d: (nn.BatchNorm3d(C), _x(2, C, 3, 4, 2), _x(2, C, 4, 2)),
    nn.LayerNorm: (nn.LayerNorm(C), _x(2, 5, C), _x(2, C, 5)),
    nn.GroupNorm: (nn.GroupNorm(3, C), _x(2, C, 5, 4), _x(2, C - 2, 5, 4)),
    nn.Linear: (nn.Linear(C, 4), _x(2, 3, C), _x(2, 3, C - 1)),
    nn.AdaptiveAvgPool1d: (nn.AdaptiveAvgPool1d(2), _x(2, C, 7), None),
    nn.AdaptiveAvgPool2d: (nn.AdaptiveAvgPool2d((1, None)), _x(2, C, 5, 4), None),
    nn.AdaptiveAvgPool3d: (nn.AdaptiveAvgPool3d(1), _x(2, C, 3, 4, 2), None),
}
for _free in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
              nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
    MODULE_CASES[_free] = (_free(), _x(2, C, 5, 4) if _free is not nn.Dropout1d else _x(2, C, 5), None)

# function or method name -> (args that fit, args that do not or None)
FUNCTION_CASES: dict[object, tuple] = {
    operator.add: ((_x(2, C, 5, 4), _x(C, 1, 1)), (_x(2, C, 5, 4), _x(C - 1, 1, 1))),
    operator.sub: ((_x(2, C, 5, 4), 2.0), (_x(2, C, 5), _x(2, C - 1, 5))),
    operator.mul: ((3, _x(2, C, 5, 4, dtype=torch.int64)), (_x(C, 5), _x(5, C))),
    operator.truediv: ((_x(2, C, 5, 4, dtype=torch.int64), 2), (_x(C), _x(C + 1))),
    torch.add: ((_x(2, 1, 4), _x(3, 1)), (_x(2, 3), _x(3, 2))),
    torch.sub: ((_x(2, C), _x(C, dtype=torch.float64)), (_x(2, C), _x(2))),
    torch.mul: ((_x(C, 1, 1), _x(2, C, 5, 4)), (_x(C, 1, 1), _x(2, C - 1, 5, 4))),
    torch.div: ((_x(2, C), True), (_x(2, C), _x(3, 1))),
    "add": ((_x(2, C, 5), _x(5)), (_x(2, C, 5), _x(C))),
    "sub": ((_x(2, C, 5), _x(C, 1)), (_x(2, C, 5), _x(C))),
    "mul": ((_x(2, C), 0.5), (_x(2, C), _x(C - 1))),
    "div": ((_x(2, C), _x(1)), (_x(2, C), _x(2, C, 2))),
    F.layer_norm: ((_x(2, 5, C), (C,), _x(C), _x(C)), (_x(2, 5, C - 1), (C,), _x(C), _x(C))),
    F.adaptive_avg_pool1d: ((_x(2, C, 7), 3), None),
    F.adaptive_avg_pool2d: ((_x(2, C, 5, 4), (2, 1)), None),
    F.adaptive_avg_pool3d: ((_x(C, 3, 4, 2), 1), None),
}
for _unary in (F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, torch.relu,
               torch.sigmoid, torch.tanh, "relu", "sigmoid", "tanh", "contiguous", "clone", "detach"):
    FUNCTION_CASES[_unary] = ((_x(2, C, 5).permute(0, 2, 1),), None)
for _dropout in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
    FUNCTION_CASES[_dropout] = ((_x(2, C, 5, 4) if _dropout is not F.dropout1d else _x(2, C, 5), 0.2), None)


def _meta(value: object) -> object:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _real(target: object, args: tuple) -> torch.Tensor:
    return getattr(args[0], target)(*args[1:]) if isinstance(target, str) else target(*args)


def test_every_rule_has_a_case():
    assert set(MODULE_SHAPES) == set(MODULE_CASES)
    assert set(FUNCTION_SHAPES) == set(FUNCTION_CASES)


@pytest.mark.parametrize("kind", list(MODULE_CASES), ids=lambda t: t.__name__)
def test_module_rule_agrees_with_the_kernel(kind):
    module, fits, misfits = MODULE_CASES[kind]
    module.eval()
    with torch.no_grad():
        want = module(fits)
    got = MODULE_SHAPES[kind](module, fits.to("meta"))
    assert got.device.type == "meta" and (got.shape, got.dtype) == (want.shape, want.dtype)
    if misfits is not None:
        with pytest.raises((RuntimeError, ValueError)), torch.no_grad():
            module(misfits)
        with pytest.raises((RuntimeError, ValueError)):
            MODULE_SHAPES[kind](module, misfits.to("meta"))


@pytest.mark.parametrize("target", list(FUNCTION_CASES), ids=lambda t: t if isinstance(t, str) else t.__name__)
def test_function_rule_agrees_with_the_kernel(target):
    fits, misfits = FUNCTION_CASES[target]
    want = _real(target, fits)
    got = FUNCTION_SHAPES[target](tuple(_meta(a) for a in fits), {})
    assert got.device.type == "meta" and (got.shape, got.dtype) == (want.shape, want.dtype)
    if misfits is not None:
        with pytest.raises(RuntimeError):
            _real(target, misfits)
        with pytest.raises(RuntimeError):
            FUNCTION_SHAPES[target](tuple(_meta(a) for a in misfits), {})


def test_calls_a_rule_does_not_cover_run_their_kernel():
    """Options a rule does not model (an add's ``alpha``, an in-place flag) leave the call to
    the kernel: the rule answers None."""
    x = _x(2, C).to("meta")
    assert FUNCTION_SHAPES[torch.add]((x, x), {"alpha": 2}) is None
    assert FUNCTION_SHAPES[F.relu]((x,), {"inplace": True}) is None
    assert FUNCTION_SHAPES[operator.add]((2, 3), {}) is None  # sizes, not tensors


class _Block(nn.Module):
    def __init__(self, width: int = C, norm_width: int = C):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(norm_width)
        self.scale = nn.Parameter(torch.ones(norm_width, 1, 1))
        self.fc = nn.Linear(norm_width, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))) * self.scale
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_meta_run_matches_the_real_run_and_fails_where_it_does():
    x = _x(2, 3, 8, 8)
    gm = fx.symbolic_trace(_Block())
    meta_out = MetaRun(gm).run(x.to("meta"))
    assert meta_out.shape == gm(x).shape and meta_out.device.type == "meta"
    assert runs_on_meta(gm, (x,))
    broken = fx.symbolic_trace(_Block(width=C - 2))  # the conv lost channels the BatchNorm still counts
    with pytest.raises(RuntimeError):
        broken(x)
    assert not runs_on_meta(broken, (x,))
    assert next(broken.parameters()).device.type == "cpu"  # the graph keeps its real tensors
