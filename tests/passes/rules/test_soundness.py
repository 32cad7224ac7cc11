"""Every registered operator rule is sound: for each rule (module type, function, method name
or ATen operator in spruce.passes.rules.registry's tables), one call of the operator is
analysed on its own (nothing pinned at the graph boundary), and for every channel the
analysis leaves free, the outputs outside that channel must not change when the
channel's elements (of the inputs and parameters) go from zero to arbitrary values.
That is exactly what removing the channel needs; an operator that reduces or mixes over
a dim its rule leaves free (BatchNorm statistics over a conv weight) fails it.

A registered rule without a sample here fails too: adding a rule means adding a sample."""

from __future__ import annotations

import builtins
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from spruce.capture.shapes import propagate
from spruce.passes.analysis import TensorDims, analyze, leaves
from spruce.passes.graph import CapturedGraph, Piece
from spruce.passes.rules.registry import FUNCTION_RULES, METHOD_RULES, MODULE_RULES
from torch import fx, nn

aten = torch.ops.aten


def t(*shape, seed=0, low=None):
    gen = torch.Generator().manual_seed(seed + sum(shape))
    value = torch.randn(*shape, generator=gen)
    return value.abs() + 0.5 if low == "positive" else value


X4 = (2, 6, 5, 4)


class _Probe(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        if isinstance(fn, nn.Module) and not isinstance(fn, WithParams):
            self.inner = fn  # a module whose rule is under test: one call_module node


class WithParams(nn.Module):
    """``fn(x, *params)`` with the given tensors as parameters of the model (traced through)."""

    def __init__(self, fn, *tensors):
        super().__init__()
        self.f = fn
        self.params = nn.ParameterList([nn.Parameter(t) for t in tensors])

    def forward(self, x):
        return self.f(x, *self.params)


def with_params(fn, x, *tensors):
    return WithParams(fn, *tensors), (x,)


def Probe(fn, arity: int) -> nn.Module:  # noqa: N802 - a class per arity
    """A module calling ``fn`` on its inputs (one placeholder per input: fx cannot trace ``*args``)."""
    names = ", ".join(f"x{i}" for i in range(arity))
    scope: dict = {}
    exec(f"def forward(self, {names}):\n    return self.fn({names})", scope)  # noqa: S102
    return type(f"Probe{arity}", (_Probe,), {"forward": scope["forward"]})(fn)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, name):
        return name == "inner" or super().is_leaf_module(m, name)


def analysed(fn, inputs):
    probe = Probe(fn, len(inputs)).eval()
    graph = _Tracer().trace(probe)
    gm = fx.GraphModule(probe, graph)
    propagate(gm, list(inputs))
    captured = CapturedGraph([Piece("", gm, None, "fx", tuple(inputs))], probe, tuple(inputs))
    return probe, gm, analyze(captured, pin_boundary=False)


def _in_atom(dims, labels, atom, shape):
    hit = torch.zeros(shape, dtype=torch.bool)
    for d, space in enumerate(dims):
        lab = torch.as_tensor(labels[space.start : space.start + space.size] == atom)
        view = [1] * len(shape)
        view[d] = space.size
        hit = hit | lab.view(view)
    return hit


def _tensor_leaves(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensor_leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    return []


def _run(probe, inputs, input_dims, params, param_dims, labels, atom, random_acts, random_weights):
    """Outputs with the channel's activations and parameters zero, or random."""
    torch.manual_seed(0)  # dropout and random fills draw the same in every run
    gen = torch.Generator().manual_seed(1234 + atom)
    args = []
    for x, dims in zip(inputs, input_dims):
        if isinstance(x, torch.Tensor) and isinstance(dims, TensorDims) and x.is_floating_point():
            mask = _in_atom(dims, labels, atom, x.shape)
            x = torch.where(mask, torch.randn(x.shape, generator=gen) if random_acts else torch.zeros(x.shape), x)
        args.append(x)
    saved = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, dims in param_dims.items():
            p = params[name]
            if p.is_floating_point():
                mask = _in_atom(dims, labels, atom, p.shape)
                fill = torch.randn(p.shape, generator=gen) if random_weights else torch.zeros(p.shape)
                p.copy_(torch.where(mask, fill, p))
        out = _tensor_leaves(probe(*args))
        for name, p in params.items():
            p.copy_(saved[name])
    return out


def check_sound(fn, inputs, variants=((True, False), (False, True))):
    """Zero vs random values of each free channel must leave every other output alone
    (``variants``: which of its activations / its parameters go random, one at a time)."""
    probe, gm, analysis = analysed(fn, inputs)
    an = analysis.analyzer
    labels, pinned = analysis.labels, analysis.pinned
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_dims = [an.values[(0, p)] for p in placeholders]
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    output_dims = leaves(fx.node.map_arg(output_node.args[0], lambda n: an.values.get((0, n))))
    params = {name: p for name, p in list(probe.named_parameters()) + list(probe.named_buffers())}
    param_dims = {}
    for name, p in params.items():
        spaces = [an.param_spaces.get((id(p), d)) for d in range(p.dim())]
        if all(s is not None for s in spaces):
            param_dims[name] = TensorDims(spaces)
    atoms = set()  # channels: components holding activations (kernel dims are parameters only)
    for dims in list(input_dims) + list(output_dims):
        if isinstance(dims, TensorDims):
            for space in dims:
                for atom in set(labels[space.start : space.start + space.size].tolist()):
                    if pinned[atom] < 0:
                        atoms.add(atom)
    checked = 0
    atoms = sorted(atoms)
    if len(atoms) > 8:  # a spread of channels: first, last and evenly in between
        atoms = [atoms[round(i * (len(atoms) - 1) / 7)] for i in range(8)]
    for atom in atoms:
        # the masked model: the channel's parameters are zero; its activations may hold
        # anything (base: zero). Outputs outside the channel must not notice either.
        base = _run(probe, inputs, input_dims, params, param_dims, labels, atom, False, False)
        for acts, weights in variants:
            other = _run(probe, inputs, input_dims, params, param_dims, labels, atom, acts, weights)
            assert len(base) == len(other)
            for o0, o1, dims in zip(base, other, output_dims):
                if not isinstance(dims, TensorDims) or not o0.is_floating_point():
                    continue
                outside = ~_in_atom(dims, labels, atom, o0.shape)
                a, b = o0[outside].double(), o1[outside].double()
                same = (a == b) | (torch.isnan(a) & torch.isnan(b))
                diff = torch.where(same, torch.zeros_like(a), (a - b).abs().nan_to_num(nan=math.inf))
                finite = a[torch.isfinite(a)]
                scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
                what = "activations" if acts else "parameters"
                assert diff.numel() == 0 or float(diff.max()) <= 1e-4 * scale, (
                    f"the {what} of channel {atom} leak into other outputs by {float(diff.max()):.3g}")
                checked += 1
    return checked


# ---------------------------------------------------------------------------
# samples: key -> (callable, inputs)
# ---------------------------------------------------------------------------


def binary(fn):
    return fn, (t(*X4), t(1, 6, 1, 4, seed=1))


def unary(fn, positive=False):
    return fn, (t(*X4, low="positive" if positive else None),)


POSITIVE = {"log", "log_", "log2", "log10", "log1p", "sqrt", "sqrt_", "rsqrt", "reciprocal", "erfinv", "acos",
            "asin", "pow_", "xlogy"}


def _name(key):
    return getattr(key, "__name__", str(key)).split(".")[-2 if isinstance(key, torch._ops.OpOverload) else -1]


SCALAR = object()  # a rule over Python numbers (sizes): no tensor channels to check

MODULES = {
    nn.Conv1d: lambda: (nn.Conv1d(6, 8, 3, padding=1, groups=2), (t(2, 6, 7),)),
    nn.Conv2d: lambda: (nn.Conv2d(6, 8, 3, padding=1, groups=2), (t(*X4),)),
    nn.Conv3d: lambda: (nn.Conv3d(6, 6, 3, padding=1, groups=6), (t(2, 6, 3, 4, 4),)),
    nn.ConvTranspose1d: lambda: (nn.ConvTranspose1d(6, 4, 3), (t(2, 6, 7),)),
    nn.ConvTranspose2d: lambda: (nn.ConvTranspose2d(6, 4, 3, groups=2), (t(*X4),)),
    nn.ConvTranspose3d: lambda: (nn.ConvTranspose3d(6, 4, 3), (t(2, 6, 3, 4, 4),)),
    nn.Linear: lambda: (nn.Linear(4, 5), (t(*X4),)),
    nn.LazyLinear: lambda: (_materialised(nn.LazyLinear(5), t(*X4)), (t(*X4),)),
    nn.BatchNorm1d: lambda: (_stats(nn.BatchNorm1d(6)), (t(2, 6, 7),)),
    nn.BatchNorm2d: lambda: (_stats(nn.BatchNorm2d(6)), (t(*X4),)),
    nn.BatchNorm3d: lambda: (_stats(nn.BatchNorm3d(6)), (t(2, 6, 3, 4, 4),)),
    nn.SyncBatchNorm: lambda: (_stats(nn.SyncBatchNorm(6)), (t(*X4),)),
    nn.InstanceNorm1d: lambda: (nn.InstanceNorm1d(6, affine=True), (t(2, 6, 7),)),
    nn.InstanceNorm2d: lambda: (nn.InstanceNorm2d(6, affine=True), (t(*X4),)),
    nn.InstanceNorm3d: lambda: (nn.InstanceNorm3d(6, affine=True), (t(2, 6, 3, 4, 4),)),
    nn.LayerNorm: lambda: (nn.LayerNorm(4), (t(*X4),)),
    nn.RMSNorm: lambda: (nn.RMSNorm(4), (t(*X4),)),
    nn.GroupNorm: lambda: (nn.GroupNorm(3, 6), (t(*X4),)),
    nn.LocalResponseNorm: lambda: (nn.LocalResponseNorm(2), (t(*X4),)),
    nn.CrossMapLRN2d: lambda: (nn.CrossMapLRN2d(3), (t(*X4),)),
    nn.Embedding: lambda: (nn.Embedding(10, 6), (torch.tensor([[1, 2, 3], [4, 5, 9]]),)),
    nn.PReLU: lambda: (nn.PReLU(6), (t(*X4),)),
    nn.MultiheadAttention: lambda: (nn.MultiheadAttention(8, 2, batch_first=True), (t(2, 5, 8), t(2, 5, 8, seed=1),
                                                                                     t(2, 5, 8, seed=2))),
    nn.LSTM: lambda: (nn.LSTM(6, 4, num_layers=2, bidirectional=True, proj_size=3, batch_first=True), (t(2, 5, 6),)),
    nn.GRU: lambda: (nn.GRU(6, 4, num_layers=2, bidirectional=True), (t(5, 2, 6),)),
    nn.RNN: lambda: (nn.RNN(6, 4, batch_first=True), (t(2, 5, 6),)),
    nn.Flatten: lambda: (nn.Flatten(), (t(*X4),)),
    nn.Unflatten: lambda: (nn.Unflatten(1, (2, 3)), (t(*X4),)),
    nn.ChannelShuffle: lambda: (nn.ChannelShuffle(2), (t(*X4),)),
    nn.PixelShuffle: lambda: (nn.PixelShuffle(2), (t(2, 8, 3, 3),)),
    nn.PixelUnshuffle: lambda: (nn.PixelUnshuffle(2), (t(2, 2, 4, 4),)),
    nn.Softmax: lambda: (nn.Softmax(dim=1), (t(*X4),)),
    nn.LogSoftmax: lambda: (nn.LogSoftmax(dim=-1), (t(*X4),)),
    nn.Softmin: lambda: (nn.Softmin(dim=2), (t(*X4),)),
    nn.Upsample: lambda: (nn.Upsample(scale_factor=2), (t(*X4),)),
    nn.UpsamplingNearest2d: lambda: (nn.UpsamplingNearest2d(scale_factor=2), (t(*X4),)),
    nn.UpsamplingBilinear2d: lambda: (nn.UpsamplingBilinear2d(scale_factor=2), (t(*X4),)),
    nn.LPPool1d: lambda: (nn.LPPool1d(2, 2), (t(2, 6, 6, low="positive"),)),
    nn.LPPool2d: lambda: (nn.LPPool2d(2, 2), (t(*X4, low="positive"),)),
    nn.CircularPad2d: lambda: (nn.CircularPad2d(1), (t(*X4),)),
}


def _stats(m):
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 1.5)
    return m


def _materialised(m, x):
    m(x)
    return m


def _torchvision_modules():
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:
        return {}

    class Training(StochasticDepth):  # the probe runs in eval mode, where the module is the identity
        def train(self, mode=True):
            return super().train(True)

    return {StochasticDepth: lambda: (Training(0.5, "row"), (t(*X4),))}


def module_sample(cls):
    if cls in MODULES:
        return MODULES[cls]()
    if cls in _torchvision_modules():
        return _torchvision_modules()[cls]()
    name = cls.__name__
    x3 = t(2, 6, 8)
    x5 = t(2, 6, 4, 4, 4)
    for n, shape in (("1d", x3), ("2d", t(*X4)), ("3d", x5)):
        if name.endswith(n):
            if "Adaptive" in name:
                return cls(2), (shape,)
            if "Pool" in name:
                return cls(2), (shape,)
            if "Pad" in name:
                return cls(1) if "Constant" not in name else cls(1, 0.5), (shape,)
            if "Dropout" in name:
                return cls(0.3), (shape,)
    if "Dropout" in name:
        return cls(0.3), (t(*X4),)
    if name == "Threshold":
        return cls(0.1, 0.0), (t(*X4),)
    return cls(), (t(*X4),)  # activations


METHODS_EXTRA = {
    "view": (lambda x: x.view(2, 6, 20)), "reshape": (lambda x: x.reshape(2, 3, 2, 20)),
    "flatten": (lambda x: x.flatten(1)), "squeeze": (lambda x: x[:, :, :1].squeeze(2)),
    "unsqueeze": (lambda x: x.unsqueeze(1)), "view_as": (lambda x: x.view_as(x)),
    "reshape_as": (lambda x: x.reshape_as(x)), "permute": (lambda x: x.permute(0, 2, 1, 3)),
    "transpose": (lambda x: x.transpose(1, 3)), "swapaxes": (lambda x: x.swapaxes(1, 2)),
    "swapdims": (lambda x: x.swapdims(1, 2)), "t": (lambda x: x[0, 0].t()), "movedim": (lambda x: x.movedim(1, -1)),
    "moveaxis": (lambda x: x.moveaxis(1, -1)),
    "split": (lambda x: x.split([2, 4], 1)), "chunk": (lambda x: x.chunk(2, 1)),
    "tensor_split": (lambda x: x.tensor_split(2, 1)), "unbind": (lambda x: x.unbind(2)),
    "split_with_sizes": (lambda x: x.split_with_sizes([2, 4], 1)),
    "size": (lambda x: x.view(x.size(0), -1)), "dim": (lambda x: x * x.dim()),
    "ndimension": (lambda x: x * x.ndimension()), "is_contiguous": (lambda x: x * x.is_contiguous()),
    "is_floating_point": (lambda x: x * x.is_floating_point()), "get_device": (lambda x: x + x.get_device()),
    "numel": (lambda x: x.view(x.numel())), "nelement": (lambda x: x.view(x.nelement())),
    "expand": (lambda x: x[:, :, :1].expand(2, 6, 3, 4)), "expand_as": (lambda x: x[:, :1].expand_as(x)),
    "repeat": (lambda x: x.repeat(1, 2, 1, 1)), "softmax": (lambda x: x.softmax(1)),
    "log_softmax": (lambda x: x.log_softmax(-1)), "cumsum": (lambda x: x.cumsum(2)),
    "cumprod": (lambda x: x.cumprod(2)), "roll": (lambda x: x.roll(1, 2)), "flip": (lambda x: x.flip(3)),
    "to": (lambda x: x.to(torch.float64)), "type": (lambda x: x.type(torch.float64)),
    "masked_fill": (lambda x: x.masked_fill(x > 0, 1.0)),
    "masked_fill_": (lambda x: x.clone().masked_fill_(x > 0, 1.0)),
    "where": (lambda x: x.where(x > 0, -x)), "type_as": (lambda x: x.type_as(x)),
    "copy_": (lambda x: torch.zeros_like(x).copy_(x)), "fill_": (lambda x: x.clone().fill_(2.0)),
    "zero_": (lambda x: x.clone().zero_()), "requires_grad_": (lambda x: x.clone().requires_grad_(False)),
    "new_zeros_like": None, "addcmul": (lambda x: x.addcmul(x, x)), "lerp": (lambda x: x.lerp(-x, 0.3)),
    "clamp": (lambda x: x.clamp(-0.5, 0.5)), "clamp_": (lambda x: x.clone().clamp_(-0.5, 0.5)),
    "clamp_min": (lambda x: x.clamp_min(0.1)), "clamp_max": (lambda x: x.clamp_max(0.1)),
    "clip": (lambda x: x.clip(-0.5, 0.5)), "pow": (lambda x: x.pow(2)), "norm": (lambda x: x.norm()),
    "max": (lambda x: x.max(1)), "min": (lambda x: x.min(1)), "argmax": (lambda x: x.argmax(1).float()),
    "argmin": (lambda x: x.argmin(1).float()), "median": (lambda x: x.median(1)),
    "std": (lambda x: x.std(1)), "var": (lambda x: x.var(1)), "all": (lambda x: (x > -9).all(1).float()),
    "any": (lambda x: (x > 0).any(1).float()), "hardtanh_": (lambda x: F.hardtanh_(x.clone())),
    "cpu": (lambda x: x.cpu()), "cuda": None, "half": (lambda x: x.half().float()),
    "bfloat16": (lambda x: x.bfloat16().float()), "nan_to_num": (lambda x: x.nan_to_num()),
    "floor_divide": (lambda x: x.floor_divide(0.3)), "maximum": (lambda x: x.maximum(-x)),
    "minimum": (lambda x: x.minimum(-x)), "matmul": (lambda x: x.matmul(x.transpose(-1, -2))),
    "bmm": (lambda x: x[0].bmm(x[0].transpose(-1, -2))), "mm": (lambda x: x[0, 0].mm(x[0, 0].t())),
    "__matmul__": (lambda x: x.__matmul__(x.transpose(-1, -2))),
}


def method_sample(name):
    if name in METHODS_EXTRA:
        fn = METHODS_EXTRA[name]
        return None if fn is None else (fn, (t(*X4),))
    rule = METHOD_RULES[name].__name__
    if rule == "broadcast":
        return (lambda x, y, name=name: getattr(x.clone(), name)(y)), (t(*X4), t(1, 6, 1, 4, seed=1))
    if rule == "same_shape":
        positive = name in POSITIVE or name in ("log", "sqrt", "rsqrt", "reciprocal")
        return (lambda x, name=name: getattr(x.clone(), name)()), (t(*X4, low="positive" if positive else None),)
    if rule == "reduce_rule":
        return (lambda x, name=name: getattr(x, name)(1)), (t(*X4, low="positive"),)
    return (lambda x, name=name: getattr(x, name)()), (t(*X4),)


def _torchvision_functions():
    try:
        from torchvision.ops.stochastic_depth import stochastic_depth
    except ImportError:
        return {}
    return {stochastic_depth: (lambda x: stochastic_depth(x, 0.5, "row", True), (t(*X4),))}


FUNCTIONS = {
    torch.reshape: (lambda x: torch.reshape(x, (2, 3, 2, 20)), (t(*X4),)),
    torch.flatten: (lambda x: torch.flatten(x, 1), (t(*X4),)),
    torch.squeeze: (lambda x: torch.squeeze(x[:, :, :1], 2), (t(*X4),)),
    torch.unsqueeze: (lambda x: torch.unsqueeze(x, 1), (t(*X4),)),
    torch.permute: (lambda x: torch.permute(x, (0, 3, 1, 2)), (t(*X4),)),
    torch.transpose: (lambda x: torch.transpose(x, 1, 3), (t(*X4),)),
    torch.swapaxes: (lambda x: torch.swapaxes(x, 1, 2), (t(*X4),)),
    torch.swapdims: (lambda x: torch.swapdims(x, 1, 2), (t(*X4),)),
    torch.t: (lambda x: torch.t(x[0, 0]), (t(*X4),)),
    torch.movedim: (lambda x: torch.movedim(x, 1, 3), (t(*X4),)),
    torch.moveaxis: (lambda x: torch.moveaxis(x, 1, 3), (t(*X4),)),
    torch.cat: (lambda x, y: torch.cat([x, y], 1), (t(*X4), t(2, 3, 5, 4, seed=1))),
    torch.concat: (lambda x, y: torch.concat([x, y], 1), (t(*X4), t(2, 3, 5, 4, seed=1))),
    torch.concatenate: (lambda x, y: torch.concatenate([x, y], 1), (t(*X4), t(2, 3, 5, 4, seed=1))),
    torch.stack: (lambda x, y: torch.stack([x, y], 2), (t(*X4), t(*X4, seed=1))),
    torch.split: (lambda x: torch.split(x, [2, 4], 1), (t(*X4),)),
    torch.chunk: (lambda x: torch.chunk(x, 3, 1), (t(*X4),)),
    torch.tensor_split: (lambda x: torch.tensor_split(x, 2, 1), (t(*X4),)),
    torch.unbind: (lambda x: torch.unbind(x, 3), (t(*X4),)),
    operator.getitem: (lambda x: x[:, 1:3, None, ..., 0], (t(*X4),)),
    builtins.getattr: (lambda x: x.mT, (t(*X4),)),
    torch.numel: (lambda x: x.view(torch.numel(x)), (t(*X4),)),
    torch._assert: (lambda x: x + torch._assert(x.size(1) == 6, "six") if False else x.relu(), (t(*X4),)),
    torch.where: (lambda x, y: torch.where(x > 0, x, y), (t(*X4), t(1, 6, 1, 4, seed=1))),
    torch.addcmul: (lambda x, y: torch.addcmul(x, x, y), (t(*X4), t(1, 6, 1, 4, seed=1))),
    torch.addcdiv: (lambda x, y: torch.addcdiv(x, x, y.abs() + 1), (t(*X4), t(1, 6, 1, 4, seed=1))),
    torch.lerp: (lambda x, y: torch.lerp(x, y, 0.3), (t(*X4), t(1, 6, 1, 4, seed=1))),
    operator.neg: (lambda x: -x, (t(*X4),)), operator.pos: (lambda x: +x, (t(*X4),)),
    operator.abs: (lambda x: abs(x), (t(*X4),)),
    operator.invert: (lambda x: (~(x > 0)).float(), (t(*X4),)),
    torch.clamp: (lambda x: torch.clamp(x, -0.5, 0.5), (t(*X4),)),
    torch.clip: (lambda x: torch.clip(x, -0.5, 0.5), (t(*X4),)),
    torch.clamp_min: (lambda x: torch.clamp_min(x, 0.1), (t(*X4),)),
    torch.clamp_max: (lambda x: torch.clamp_max(x, 0.1), (t(*X4),)),
    torch.full_like: (lambda x: torch.full_like(x, 2.0), (t(*X4),)),
    F.leaky_relu: (lambda x: F.leaky_relu(x, 0.2), (t(*X4),)),
    F.threshold: (lambda x: F.threshold(x, 0.1, 0.0), (t(*X4),)),
    F.softmax: (lambda x: F.softmax(x, 1), (t(*X4),)),
    F.log_softmax: (lambda x: F.log_softmax(x, -1), (t(*X4),)),
    F.softmin: (lambda x: F.softmin(x, 2), (t(*X4),)),
    torch.softmax: (lambda x: torch.softmax(x, 1), (t(*X4),)),
    torch.log_softmax: (lambda x: torch.log_softmax(x, -1), (t(*X4),)),
    torch.cumsum: (lambda x: torch.cumsum(x, 2), (t(*X4),)),
    torch.cumprod: (lambda x: torch.cumprod(x, 2), (t(*X4),)),
    F.normalize: (lambda x: F.normalize(x, dim=1), (t(*X4),)),
    F.glu: (lambda x: F.glu(x, 1), (t(*X4),)),
    torch.roll: (lambda x: torch.roll(x, 1, 2), (t(*X4),)),
    torch.flip: (lambda x: torch.flip(x, (3,)), (t(*X4),)),
    F.conv1d: with_params(lambda x, w: F.conv1d(x, w, groups=2), t(2, 6, 7), t(4, 3, 3, seed=1)),
    F.conv2d: with_params(lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=6), t(*X4), t(6, 1, 3, 3, seed=1),
                          t(6, seed=2)),
    F.conv3d: with_params(lambda x, w: F.conv3d(x, w), t(2, 6, 3, 4, 4), t(4, 6, 3, 3, 3, seed=1)),
    F.conv_transpose1d: with_params(lambda x, w: F.conv_transpose1d(x, w), t(2, 6, 7), t(6, 4, 3, seed=1)),
    F.conv_transpose2d: with_params(lambda x, w: F.conv_transpose2d(x, w, groups=2), t(*X4), t(6, 2, 3, 3, seed=1)),
    F.conv_transpose3d: with_params(lambda x, w: F.conv_transpose3d(x, w), t(2, 6, 3, 4, 4), t(6, 4, 3, 3, 3, seed=1)),
    F.linear: with_params(lambda x, w, b: F.linear(x, w, b), t(*X4), t(5, 4, seed=1), t(5, seed=2)),
    F.embedding: (lambda i, w: F.embedding(i, w), (torch.tensor([[1, 2], [3, 9]]), t(10, 6, seed=1))),
    torch.matmul: (lambda x, w: torch.matmul(x, w), (t(*X4), t(4, 3, seed=1))),
    operator.matmul: (lambda x, w: x @ w, (t(*X4), t(4, 3, seed=1))),
    torch.bmm: (lambda x, y: torch.bmm(x, y), (t(3, 5, 4), t(3, 4, 2, seed=1))),
    torch.mm: (lambda x, y: torch.mm(x, y), (t(5, 4), t(4, 2, seed=1))),
    F.scaled_dot_product_attention: (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                                     (t(2, 3, 5, 4), t(2, 3, 6, 4, seed=1), t(2, 3, 6, 8, seed=2))),
    F.batch_norm: (lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b),
                   (t(*X4), t(6, seed=1), t(6, seed=2, low="positive"), t(6, seed=3), t(6, seed=4))),
    F.instance_norm: (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (t(*X4), t(6, seed=1), t(6, seed=2))),
    F.layer_norm: (lambda x, w, b: F.layer_norm(x, (4,), w, b), (t(*X4), t(4, seed=1), t(4, seed=2))),
    F.rms_norm: (lambda x, w: F.rms_norm(x, (5, 4), w), (t(*X4), t(5, 4, seed=1))),
    F.group_norm: (lambda x, w, b: F.group_norm(x, 3, w, b), (t(*X4), t(6, seed=1), t(6, seed=2))),
    F.local_response_norm: (lambda x: F.local_response_norm(x, 2), (t(*X4),)),
    F.interpolate: (lambda x: F.interpolate(x, scale_factor=2), (t(*X4),)),
    F.upsample: (lambda x: F.upsample(x, scale_factor=2), (t(*X4),)),
    F.upsample_nearest: (lambda x: F.upsample_nearest(x, scale_factor=2), (t(*X4),)),
    F.upsample_bilinear: (lambda x: F.upsample_bilinear(x, scale_factor=2), (t(*X4),)),
    F.pad: (lambda x: F.pad(x, (1, 1, 0, 2)), (t(*X4),)),
    torch.zeros: (lambda x: x + torch.zeros(6, 1, 1), (t(*X4),)),
    torch.ones: (lambda x: x * torch.ones(6, 1, 1), (t(*X4),)),
    torch.empty: (lambda x: x + torch.empty(6, 1, 1).fill_(1.0), (t(*X4),)),
    torch.full: (lambda x: x + torch.full((6, 1, 1), 2.0), (t(*X4),)),
    torch.arange: (lambda x: x + torch.arange(4.0), (t(*X4),)),
    torch.tensor: (lambda x: x + torch.tensor(2.0), (t(*X4),)),
    torch.randn: (lambda x: x + 0 * torch.randn(6, 1, 1), (t(*X4),)),
    torch.rand: (lambda x: x + 0 * torch.rand(6, 1, 1), (t(*X4),)),
    torch.linspace: (lambda x: x + torch.linspace(0, 1, 4), (t(*X4),)),
    torch.eye: (lambda x: x + torch.eye(5, 4), (t(*X4),)),
    torch.max: (lambda x: torch.max(x, 1), (t(*X4),)),
    torch.min: (lambda x: torch.min(x, 1), (t(*X4),)),
    torch.norm: (lambda x: torch.norm(x), (t(*X4),)),
    torch.median: (lambda x: torch.median(x, 1), (t(*X4),)),
    torch.argmax: (lambda x: torch.argmax(x, 1).float(), (t(*X4),)),
    torch.argmin: (lambda x: torch.argmin(x, 1).float(), (t(*X4),)),
    torch.all: (lambda x: torch.all(x > -9, 1).float(), (t(*X4),)),
    torch.any: (lambda x: torch.any(x > 0, 1).float(), (t(*X4),)),
    torch.logsumexp: (lambda x: torch.logsumexp(x, 1), (t(*X4),)),
    torch.empty_like: (lambda x: torch.empty_like(x).zero_() + x, (t(*X4),)),
    **_torchvision_functions(),
    F.dropout1d: (lambda x: F.dropout1d(x, 0.5), (t(2, 6, 7),)),
}
_SCALAR_FUNCTIONS = {math.sqrt, math.ceil, math.floor, math.trunc, builtins.int, builtins.float, builtins.round,
                     builtins.max, builtins.min, builtins.abs, operator.truth, operator.not_}


def _pool_sample(key):
    name = key.__name__
    n = 1 if "1d" in name else 3 if "3d" in name else 2
    x = {1: t(2, 6, 8), 2: t(*X4), 3: t(2, 6, 4, 4, 4)}[n]
    if name.startswith("adaptive"):
        return (lambda x: key(x, 2)), (x,)
    if name.startswith("lp_pool"):
        return (lambda x: key(x.abs() + 0.1, 2, 2)), (x,)
    return (lambda x: key(x, 2)), (x,)


def function_sample(key):
    if key in FUNCTIONS:
        return FUNCTIONS[key]
    if key in _SCALAR_FUNCTIONS or getattr(key, "__name__", "").lstrip("_").startswith("sym_"):
        return SCALAR
    rule = FUNCTION_RULES[key].__name__
    name = getattr(key, "__name__", "")
    if rule == "broadcast":
        if key in (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
                   operator.or_, operator.xor):
            return (lambda x, y: key(x > 0, y > 0).float()) if key in (operator.and_, operator.or_, operator.xor) \
                else (lambda x, y: key(x, y).float()), (t(*X4), t(1, 6, 1, 4, seed=1))
        if name in ("logical_and", "logical_or", "eq", "ne", "lt", "gt", "le", "ge"):
            return (lambda x, y: key(x, y).float()), (t(*X4), t(1, 6, 1, 4, seed=1))
        positive = name in ("pow", "fmod", "remainder", "floor_divide", "floordiv", "mod", "truediv", "div", "divide",
                            "true_divide", "itruediv", "atan2")
        return (lambda x, y: key(x.clone(), y)), (t(*X4), t(1, 6, 1, 4, seed=1, low="positive" if positive else None))
    if rule == "same_shape":
        positive = name in POSITIVE
        return (lambda x: key(x.clone())), (t(*X4, low="positive" if positive else None),)
    if rule == "_pool_fn":
        return _pool_sample(key)
    if rule in ("reduce_rule", "reduction"):
        return (lambda x: key(x, 1)), (t(*X4, low="positive"),)
    if rule == "creation":
        return None
    return (lambda x: key(x)), (t(*X4),)


# ATen operators: samples built from the operator's schema, with these overrides
ATEN = {
    "conv1d.default": with_params(lambda x, w: aten.conv1d.default(x, w, None, [1], [1], [1], 2), t(2, 6, 7),
                                  t(4, 3, 3)),
    "conv2d.default": with_params(lambda x, w, b: aten.conv2d.default(x, w, b, [1, 1], [1, 1], [1, 1], 6),
                                  t(*X4), t(6, 1, 3, 3, seed=1), t(6, seed=2)),
    "conv3d.default": with_params(lambda x, w: aten.conv3d.default(x, w), t(2, 6, 3, 4, 4), t(4, 6, 3, 3, 3)),
    "conv1d.padding": with_params(lambda x, w: aten.conv1d.padding(x, w, None, [1], "same"), t(2, 6, 7), t(4, 6, 3)),
    "conv2d.padding": with_params(lambda x, w: aten.conv2d.padding(x, w, None, [1, 1], "same", [1, 1], 2),
                                  t(*X4), t(4, 3, 3, 3)),
    "conv3d.padding": with_params(lambda x, w: aten.conv3d.padding(x, w, None, [1, 1, 1], "same"),
                                  t(2, 6, 3, 4, 4), t(4, 6, 3, 3, 3)),
    "conv_transpose1d.default": with_params(lambda x, w: aten.conv_transpose1d.default(x, w), t(2, 6, 7),
                                            t(6, 4, 3)),
    "conv_transpose2d.input": with_params(lambda x, w: aten.conv_transpose2d.input(x, w, None, [1, 1], [0, 0],
                                                                                   [0, 0], 2), t(*X4), t(6, 2, 3, 3)),
    "conv_transpose3d.input": with_params(lambda x, w: aten.conv_transpose3d.input(x, w), t(2, 6, 3, 4, 4),
                                          t(6, 4, 3, 3, 3)),
    "convolution.default": with_params(lambda x, w: aten.convolution.default(x, w, None, [1, 1], [0, 0], [1, 1],
                                                                             False, [0, 0], 2), t(*X4), t(4, 3, 3, 3)),
    "_convolution.default": with_params(lambda x, w: aten._convolution.default(
        x, w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1, False, False, True, True), t(*X4), t(6, 4, 3, 3)),
    "linear.default": with_params(lambda x, w, b: aten.linear.default(x, w, b), t(*X4), t(5, 4, seed=1), t(5, seed=2)),
    "addmm.default": with_params(lambda x, w, b: aten.addmm.default(b, x, w), t(6, 4), t(4, 5, seed=1), t(5, seed=2)),
    "embedding.default": (lambda w, i: aten.embedding.default(w, i), (t(10, 6), torch.tensor([[1, 2], [3, 9]]))),
    "batch_norm.default": (lambda x, w, b, m, v: aten.batch_norm.default(x, w, b, m, v, False, 0.1, 1e-5, False),
                           (t(*X4), t(6, seed=1), t(6, seed=2), t(6, seed=3), t(6, seed=4, low="positive"))),
    "instance_norm.default": (lambda x, w, b: aten.instance_norm.default(x, w, b, None, None, True, 0.1, 1e-5, False),
                              (t(*X4), t(6, seed=1), t(6, seed=2))),
    "_native_batch_norm_legit_no_training.default": (
        lambda x, w, b, m, v: aten._native_batch_norm_legit_no_training.default(x, w, b, m, v, 0.1, 1e-5)[0],
        (t(*X4), t(6, seed=1), t(6, seed=2), t(6, seed=3), t(6, seed=4, low="positive"))),
    "native_batch_norm.default": (lambda x, w, b: aten.native_batch_norm.default(x, w, b, None, None, True, 0.1,
                                                                                  1e-5)[0], (t(*X4), t(6, seed=1),
                                                                                             t(6, seed=2))),
    "layer_norm.default": (lambda x, w, b: aten.layer_norm.default(x, [4], w, b), (t(*X4), t(4, seed=1), t(4, seed=2))),
    "rms_norm.default": (lambda x, w: aten.rms_norm.default(x, [4], w), (t(*X4), t(4, seed=1))),
    "group_norm.default": (lambda x, w, b: aten.group_norm.default(x, 3, w, b), (t(*X4), t(6, seed=1), t(6, seed=2))),
    "scaled_dot_product_attention.default": (
        lambda q, k, v: aten.scaled_dot_product_attention.default(q, k, v),
        (t(2, 3, 5, 4), t(2, 3, 6, 4, seed=1), t(2, 3, 6, 8, seed=2))),
    "matmul.default": (lambda x, w: aten.matmul.default(x, w), (t(*X4), t(4, 3))),
    "mm.default": (lambda x, w: aten.mm.default(x, w), (t(5, 4), t(4, 3))),
    "bmm.default": (lambda x, w: aten.bmm.default(x, w), (t(3, 5, 4), t(3, 4, 2))),
    "view.default": (lambda x: aten.view.default(x, [2, 6, 20]), (t(*X4),)),
    "_unsafe_view.default": (lambda x: aten._unsafe_view.default(x, [2, 3, 2, 20]), (t(*X4),)),
    "reshape.default": (lambda x: aten.reshape.default(x, [2, 6, 20]), (t(*X4),)),
    "view_copy.default": (lambda x: aten.view_copy.default(x, [12, 20]), (t(*X4),)),
    "flatten.using_ints": (lambda x: aten.flatten.using_ints(x, 1), (t(*X4),)),
    "squeeze.default": (lambda x: aten.squeeze.default(x), (t(2, 6, 1, 4),)),
    "squeeze.dim": (lambda x: aten.squeeze.dim(x, 2), (t(2, 6, 1, 4),)),
    "squeeze.dims": (lambda x: aten.squeeze.dims(x, [2]), (t(2, 6, 1, 4),)),
    "unsqueeze.default": (lambda x: aten.unsqueeze.default(x, 2), (t(*X4),)),
    "view_as.default": (lambda x, y: aten.view_as.default(x, y), (t(*X4), t(2, 6, 20))),
    "reshape_as.default": (lambda x, y: aten.reshape_as.default(x, y), (t(*X4), t(2, 6, 20))),
    "unflatten.int": (lambda x: aten.unflatten.int(x, 1, [2, 3]), (t(*X4),)),
    "permute.default": (lambda x: aten.permute.default(x, [0, 3, 1, 2]), (t(*X4),)),
    "transpose.int": (lambda x: aten.transpose.int(x, 1, 3), (t(*X4),)),
    "t.default": (lambda x: aten.t.default(x), (t(6, 4),)),
    "movedim.int": (lambda x: aten.movedim.int(x, 1, 3), (t(*X4),)),
    "swapaxes.default": (lambda x: aten.swapaxes.default(x, 1, 2), (t(*X4),)),
    "swapdims.default": (lambda x: aten.swapdims.default(x, 1, 2), (t(*X4),)),
    "numpy_T.default": (lambda x: aten.numpy_T.default(x), (t(*X4),)),
    "mT.default": (lambda x: aten.mT.default(x), (t(*X4),)),
    "expand.default": (lambda x: aten.expand.default(x, [2, 6, 3, 4]), (t(2, 6, 1, 4),)),
    "expand_as.default": (lambda x, y: aten.expand_as.default(x, y), (t(2, 6, 1, 4), t(*X4))),
    "repeat.default": (lambda x: aten.repeat.default(x, [1, 2, 1, 1]), (t(*X4),)),
    "select.int": (lambda x: aten.select.int(x, 2, 1), (t(*X4),)),
    "slice.Tensor": (lambda x: aten.slice.Tensor(x, 1, 0, 3), (t(*X4),)),
    "narrow.default": (lambda x: aten.narrow.default(x, 2, 1, 3), (t(*X4),)),
    "index_select.default": (lambda x: aten.index_select.default(x, 1, torch.tensor([0, 2])), (t(*X4),)),
    "index.Tensor": (lambda x: aten.index.Tensor(x, [None, torch.tensor([[0, 2], [5, 2]])]), (t(*X4),)),
    # a mixture of experts: routed tokens (6, hidden 4), router (3 experts), gate/up and down (width 5)
    "routed_experts.default": with_params(
        lambda x, router, gate_up, down: torch.ops.spruce.routed_experts.default(x, router, gate_up, down, 2, True,
                                                                                   "silu"),
        t(6, 4), t(3, 4, seed=1), t(3, 10, 4, seed=2), t(3, 4, 5, seed=3)),
    "cat.default": (lambda x, y: aten.cat.default([x, y], 1), (t(*X4), t(2, 3, 5, 4))),
    "concat.default": (lambda x, y: aten.concat.default([x, y], 1), (t(*X4), t(2, 3, 5, 4))),
    "concatenate.default": (lambda x, y: aten.concatenate.default([x, y], 1), (t(*X4), t(2, 3, 5, 4))),
    "stack.default": (lambda x, y: aten.stack.default([x, y], 2), (t(*X4), t(*X4, seed=1))),
    "split.Tensor": (lambda x: aten.split.Tensor(x, 4, 1), (t(*X4),)),
    "split_with_sizes.default": (lambda x: aten.split_with_sizes.default(x, [2, 4], 1), (t(*X4),)),
    "split_with_sizes_copy.default": (lambda x: aten.split_with_sizes_copy.default(x, [2, 4], 1), (t(*X4),)),
    "chunk.default": (lambda x: aten.chunk.default(x, 2, 1), (t(*X4),)),
    "unsafe_split.Tensor": (lambda x: aten.unsafe_split.Tensor(x, 3, 1), (t(*X4),)),
    "unsafe_chunk.default": (lambda x: aten.unsafe_chunk.default(x, 3, 1), (t(*X4),)),
    "unbind.int": (lambda x: aten.unbind.int(x, 2), (t(*X4),)),
    "tensor_split.sections": (lambda x: aten.tensor_split.sections(x, 2, 1), (t(*X4),)),
    "tensor_split.indices": (lambda x: aten.tensor_split.indices(x, [1, 4], 1), (t(*X4),)),
    "tensor_split.tensor_indices_or_sections": (
        lambda x: aten.tensor_split.tensor_indices_or_sections(x, torch.tensor(2), 1), (t(*X4),)),
    "flip.default": (lambda x: aten.flip.default(x, [3]), (t(*X4),)),
    "roll.default": (lambda x: aten.roll.default(x, [1], [2]), (t(*X4),)),
    "pad.default": (lambda x: aten.pad.default(x, [1, 1, 0, 2]), (t(*X4),)),
    "constant_pad_nd.default": (lambda x: aten.constant_pad_nd.default(x, [1, 1, 0, 2]), (t(*X4),)),
    "reflection_pad1d.default": (lambda x: aten.reflection_pad1d.default(x, [1, 1]), (t(2, 6, 5),)),
    "reflection_pad2d.default": (lambda x: aten.reflection_pad2d.default(x, [1, 1, 1, 1]), (t(*X4),)),
    "reflection_pad3d.default": (lambda x: aten.reflection_pad3d.default(x, [1, 1, 1, 1, 1, 1]), (t(2, 6, 3, 4, 4),)),
    "replication_pad1d.default": (lambda x: aten.replication_pad1d.default(x, [1, 1]), (t(2, 6, 5),)),
    "replication_pad2d.default": (lambda x: aten.replication_pad2d.default(x, [1, 1, 1, 1]), (t(*X4),)),
    "replication_pad3d.default": (lambda x: aten.replication_pad3d.default(x, [1, 1, 1, 1, 1, 1]),
                                  (t(2, 6, 3, 4, 4),)),
    "circular_pad2d.default": (lambda x: aten.circular_pad2d.default(x, [1, 1, 1, 1]), (t(*X4),)),
    "pixel_shuffle.default": (lambda x: aten.pixel_shuffle.default(x, 2), (t(2, 8, 3, 3),)),
    "pixel_unshuffle.default": (lambda x: aten.pixel_unshuffle.default(x, 2), (t(2, 2, 4, 4),)),
    "channel_shuffle.default": (lambda x: aten.channel_shuffle.default(x, 2), (t(*X4),)),
    "native_channel_shuffle.default": (lambda x: aten.native_channel_shuffle.default(x, 3), (t(*X4),)),
    "grid_sampler.default": (lambda x, g: aten.grid_sampler.default(x, g, 0, 0, False), (t(*X4), t(2, 3, 3, 2) / 2)),
    "grid_sampler_2d.default": (lambda x, g: aten.grid_sampler_2d.default(x, g, 0, 0, False),
                                (t(*X4), t(2, 3, 3, 2) / 2)),
    "grid_sampler_3d.default": (lambda x, g: aten.grid_sampler_3d.default(x, g, 0, 0, False),
                                (t(2, 6, 3, 4, 4), t(2, 2, 2, 2, 3) / 2)),
    "softmax.int": (lambda x: aten.softmax.int(x, 1), (t(*X4),)),
    "log_softmax.int": (lambda x: aten.log_softmax.int(x, -1), (t(*X4),)),
    "_softmax.default": (lambda x: aten._softmax.default(x, 2, False), (t(*X4),)),
    "_log_softmax.default": (lambda x: aten._log_softmax.default(x, 1, False), (t(*X4),)),
    "cumsum.default": (lambda x: aten.cumsum.default(x, 2), (t(*X4),)),
    "cumprod.default": (lambda x: aten.cumprod.default(x, 2), (t(*X4),)),
    "logcumsumexp.default": (lambda x: aten.logcumsumexp.default(x, 1), (t(*X4),)),
    "cummax.default": (lambda x: aten.cummax.default(x, 1), (t(*X4),)),
    "cummin.default": (lambda x: aten.cummin.default(x, 1), (t(*X4),)),
    "sort.default": (lambda x: aten.sort.default(x, 1), (t(*X4),)),
    "argsort.default": (lambda x: aten.argsort.default(x, 1).float(), (t(*X4),)),
    "topk.default": (lambda x: aten.topk.default(x, 2, 1), (t(*X4),)),
    "kthvalue.default": (lambda x: aten.kthvalue.default(x, 2, 1), (t(*X4),)),
    "prelu.default": (lambda x, w: aten.prelu.default(x, w), (t(*X4), t(6, seed=1))),
    "type_as.default": (lambda x, y: aten.type_as.default(x, y), (t(*X4), t(3, seed=1))),
    "where.self": (lambda x, y: aten.where.self(x > 0, x, y), (t(*X4), t(1, 6, 1, 4))),
    "where.ScalarSelf": (lambda x, y: aten.where.ScalarSelf(x > 0, 1.0, y), (t(*X4), t(1, 6, 1, 4))),
    "where.ScalarOther": (lambda x: aten.where.ScalarOther(x > 0, x, 1.0), (t(*X4),)),
    "where.Scalar": (lambda x: aten.where.Scalar(x > 0, 1.0, 0.0), (t(*X4),)),
    "masked_fill.Scalar": (lambda x: aten.masked_fill.Scalar(x, x > 0, 1.0), (t(*X4),)),
    "masked_fill.Tensor": (lambda x: aten.masked_fill.Tensor(x, x > 0, torch.tensor(1.0)), (t(*X4),)),
    "masked_fill_.Scalar": (lambda x: aten.masked_fill_.Scalar(x.clone(), x > 0, 1.0), (t(*X4),)),
    "masked_fill_.Tensor": (lambda x: aten.masked_fill_.Tensor(x.clone(), x > 0, torch.tensor(1.0)), (t(*X4),)),
    "addcmul.default": (lambda x, y: aten.addcmul.default(x, x, y), (t(*X4), t(1, 6, 1, 4))),
    "addcdiv.default": (lambda x, y: aten.addcdiv.default(x, x, y.abs() + 1), (t(*X4), t(1, 6, 1, 4))),
    "lerp.Scalar": (lambda x, y: aten.lerp.Scalar(x, y, 0.3), (t(*X4), t(1, 6, 1, 4))),
    "lerp.Tensor": (lambda x, y: aten.lerp.Tensor(x, y, y), (t(*X4), t(1, 6, 1, 4))),
    "clamp.Tensor": (lambda x, y: aten.clamp.Tensor(x, y, None), (t(*X4), t(1, 6, 1, 4))),
    "copy_.default": (lambda x, y: aten.copy_.default(torch.zeros_like(x), y), (t(*X4), t(1, 6, 1, 4))),
    "isclose.default": (lambda x, y: aten.isclose.default(x, y).float(), (t(*X4), t(1, 6, 1, 4))),
    "native_dropout.default": (lambda x: aten.native_dropout.default(x, 0.5, False), (t(*X4),)),
    "dropout.default": (lambda x: aten.dropout.default(x, 0.5, False), (t(*X4),)),
    "dropout_.default": (lambda x: aten.dropout_.default(x.clone(), 0.5, False), (t(*X4),)),
    "feature_dropout.default": (lambda x: aten.feature_dropout.default(x, 0.5, False), (t(*X4),)),
    "alpha_dropout.default": (lambda x: aten.alpha_dropout.default(x, 0.5, False), (t(*X4),)),
    "feature_alpha_dropout.default": (lambda x: aten.feature_alpha_dropout.default(x, 0.5, False), (t(*X4),)),
    "bernoulli.default": (lambda x: 0 * aten.bernoulli.default(x.sigmoid()) + x, (t(*X4),)),
    "bernoulli_.float": (lambda x: 0 * aten.bernoulli_.float(x.clone(), 0.5) + x, (t(*X4),)),
    "uniform_.default": (lambda x: 0 * aten.uniform_.default(x.clone()) + x, (t(*X4),)),
    "normal_.default": (lambda x: 0 * aten.normal_.default(x.clone()) + x, (t(*X4),)),
    "rand_like.default": (lambda x: 0 * aten.rand_like.default(x) + x, (t(*X4),)),
    "randn_like.default": (lambda x: 0 * aten.randn_like.default(x) + x, (t(*X4),)),
    "empty_like.default": (lambda x: 0 * aten.empty_like.default(x).zero_() + x, (t(*X4),)),
    "fill_.Scalar": (lambda x: aten.fill_.Scalar(x.clone(), 2.0), (t(*X4),)),
    "fill.Scalar": (lambda x: aten.fill.Scalar(x, 2.0), (t(*X4),)),
    "full_like.default": (lambda x: aten.full_like.default(x, 2.0), (t(*X4),)),
    "threshold.default": (lambda x: aten.threshold.default(x, 0.1, 0.0), (t(*X4),)),
    "threshold_.default": (lambda x: aten.threshold_.default(x.clone(), 0.1, 0.0), (t(*X4),)),
    "round.decimals": (lambda x: aten.round.decimals(x, decimals=1), (t(*X4),)),
    "clamp.default": (lambda x: aten.clamp.default(x, -0.5, 0.5), (t(*X4),)),
    "clamp_.default": (lambda x: aten.clamp_.default(x.clone(), -0.5, 0.5), (t(*X4),)),
    "clip.default": (lambda x: aten.clip.default(x, -0.5, 0.5), (t(*X4),)),
    "clamp_min.default": (lambda x: aten.clamp_min.default(x, 0.1), (t(*X4),)),
    "clamp_min_.default": (lambda x: aten.clamp_min_.default(x.clone(), 0.1), (t(*X4),)),
    "clamp_max.default": (lambda x: aten.clamp_max.default(x, 0.1), (t(*X4),)),
    "clamp_max_.default": (lambda x: aten.clamp_max_.default(x.clone(), 0.1), (t(*X4),)),
    "bitwise_not.default": (lambda x: aten.bitwise_not.default(x > 0).float(), (t(*X4),)),
    "pow.Tensor_Scalar": (lambda x: aten.pow.Tensor_Scalar(x, 2.0), (t(*X4),)),
    "to.dtype": (lambda x: aten.to.dtype(x, torch.float64), (t(*X4),)),
    "to.device": (lambda x: aten.to.device(x, torch.device("cpu"), torch.float64), (t(*X4),)),
    "to.dtype_layout": (lambda x: aten.to.dtype_layout(x, dtype=torch.float64), (t(*X4),)),
    "_to_copy.default": (lambda x: aten._to_copy.default(x, dtype=torch.float64), (t(*X4),)),
    "pow.Scalar": (lambda x: aten.pow.Scalar(2.0, x), (t(*X4),)),
    "pow_.Scalar": (lambda x: aten.pow_.Scalar(x.clone(), 2.0), (t(*X4),)),
    "mul_.Scalar": (lambda x: aten.mul_.Scalar(x.clone(), 2.0), (t(*X4),)),
    "max_pool1d_with_indices.default": (lambda x: aten.max_pool1d_with_indices.default(x, [2]), (t(2, 6, 8),)),
    "max_pool2d_with_indices.default": (lambda x: aten.max_pool2d_with_indices.default(x, [2, 2]), (t(*X4),)),
    "max_pool3d_with_indices.default": (lambda x: aten.max_pool3d_with_indices.default(x, [2, 2, 2]),
                                        (t(2, 6, 4, 4, 4),)),
    "adaptive_max_pool1d.default": (lambda x: aten.adaptive_max_pool1d.default(x, [2]), (t(2, 6, 8),)),
    "adaptive_max_pool2d.default": (lambda x: aten.adaptive_max_pool2d.default(x, [2, 2]), (t(*X4),)),
    "adaptive_max_pool3d.default": (lambda x: aten.adaptive_max_pool3d.default(x, [2, 2, 2]), (t(2, 6, 4, 4, 4),)),
    "sym_size.int": (lambda x: aten.view.default(x, [aten.sym_size.int(x, 0), -1]), (t(*X4),)),
    "sym_numel.default": (lambda x: aten.view.default(x, [aten.sym_numel.default(x)]), (t(*X4),)),
    "sym_stride.int": (lambda x: x * aten.sym_stride.int(x, 1), (t(*X4),)),
    "sym_storage_offset.default": (lambda x: x + aten.sym_storage_offset.default(x), (t(*X4),)),
    "item.default": (lambda x: x * aten.item.default(x[0, 0, 0, 0]), (t(*X4),)),
    "_local_scalar_dense.default": (lambda x: x * aten._local_scalar_dense.default(x[0, 0, 0, 0]), (t(*X4),)),
    "_assert_tensor_metadata.default": (lambda x: x + 0 * aten._assert_tensor_metadata.default(
        x, dtype=torch.float32) if False else x.relu(), (t(*X4),)),
}
_NO_TENSOR_ATEN = {"_assert_scalar.default", "sym_constrain_range_for_size.default", "sym_constrain_range.default",
                   "_assert_async.default", "_assert_async.msg", "tolist.default"}


def aten_sample(op):
    name = f"{op._opname}.{op._overloadname}"
    if name in ATEN:
        return ATEN[name]
    if name in _NO_TENSOR_ATEN:
        return SCALAR
    rule = FUNCTION_RULES[op].__name__
    packet = op._opname
    if rule == "broadcast":
        comparisons = ("eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor")
        if packet in comparisons or packet.startswith("bitwise"):
            if op._overloadname == "Scalar":
                return (lambda x: op(x if not packet.startswith("bitwise") else (x > 0), 0.5 if not packet.startswith(
                    "bitwise") else True).float()), (t(*X4),)
            return (lambda x, y: op(x > 0, y > 0).float() if packet.startswith(("logical", "bitwise")) else op(
                x, y).float()), (t(*X4), t(1, 6, 1, 4))
        positive = packet in ("pow", "fmod", "remainder", "floor_divide", "div", "div_", "atan2", "xlogy", "hypot")
        second = 0.7 if op._overloadname == "Scalar" else t(1, 6, 1, 4, low="positive" if positive else None)
        kwargs = {"rounding_mode": "floor"} if op._overloadname == "Tensor_mode" else {}
        if isinstance(second, float):
            return (lambda x: op(x.clone(), second, **kwargs)), (t(*X4, low="positive" if positive else None),)
        return (lambda x, y: op(x.clone(), y, **kwargs)), (t(*X4, low="positive" if positive else None), second)
    if rule == "same_shape":
        positive = packet in POSITIVE
        return (lambda x: op(x.clone())), (t(*X4, low="positive" if positive else None),)
    if rule in ("reduce_all",):
        if packet in ("all", "any"):
            return (lambda x: op(x > 0).float()), (t(*X4),)
        return (lambda x: op(x)), (t(*X4, low="positive"),)
    if rule == "reduce_dims":
        if packet in ("all", "any"):
            return (lambda x: op(x > 0, [1] if op._overloadname == "dims" else 1).float()), (t(*X4),)
        if packet in ("argmax", "argmin"):
            return (lambda x: op(x, 1).float()), (t(*X4),)
        if packet in ("norm",):
            return (lambda x: op(x, 2, [1])), (t(*X4),)
        if packet == "linalg_vector_norm":
            return (lambda x: op(x, 2, [1])), (t(*X4),)
        if packet in ("max", "min", "median", "mode", "logsumexp") or op._overloadname in ("dim_int", "dim"):
            return (lambda x: op(x, 1)), (t(*X4, low="positive"),)
        if packet == "count_nonzero":
            return (lambda x: op(x, [1]).float()), (t(*X4),)
        return (lambda x: op(x, [1])), (t(*X4, low="positive"),)
    if rule == "pool":
        if "upsample" in packet:
            n = 1 if "1d" in packet or "linear1d" in packet else 3 if "3d" in packet else 2
            x = {1: t(2, 6, 5), 2: t(*X4), 3: t(2, 6, 3, 4, 4)}[n]
            out = [2 * s for s in x.shape[2:]]
            if op._overloadname == "vec":
                extra = (False,) if any(k in packet for k in ("linear", "bilinear", "bicubic", "trilinear")) else ()
                return (lambda x: op(x, out, *extra, None)), (x,)
            extra = (False,) if any(k in packet for k in ("linear", "bilinear", "bicubic", "trilinear")) else ()
            return (lambda x: op(x, out, *extra)), (x,)
        n = 1 if "1d" in packet else 3 if "3d" in packet else 2
        x = {1: t(2, 6, 8), 2: t(*X4), 3: t(2, 6, 4, 4, 4)}[n]
        if packet.startswith(("adaptive", "_adaptive")):
            return (lambda x: op(x, [2] * n)), (x,)
        if packet.startswith("lp_pool"):
            return (lambda x: op(x.abs() + 0.1, 2.0, [2, 2])), (x,)
        return (lambda x: op(x, [2] * n)), (x,)
    if rule == "creation_op":
        return (lambda x: x + 0 * _created(op, x)), (t(*X4),)
    if rule == "roi":
        boxes = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0], [1, 1.0, 1.0, 4.0, 3.0]])
        if op._opname == "ps_roi_align":
            return (lambda x: op(x, boxes, 1.0, 2, 2, 1)[0]), (t(2, 8, 5, 4),)
        if op._opname == "roi_pool":
            return (lambda x: op(x, boxes, 1.0, 2, 2)[0]), (t(*X4),)
        return (lambda x: op(x, boxes, 1.0, 2, 2, 2, False)), (t(*X4),)
    return None


def _created(op, x):
    name = f"{op._opname}.{op._overloadname}"
    made = {
        "arange.default": lambda: aten.arange.default(4, dtype=torch.float32),
        "arange.start": lambda: aten.arange.start(0, 4, dtype=torch.float32),
        "arange.start_step": lambda: aten.arange.start_step(0, 8, 2, dtype=torch.float32),
        "zeros.default": lambda: aten.zeros.default([6, 1, 1]),
        "ones.default": lambda: aten.ones.default([6, 1, 1]),
        "full.default": lambda: aten.full.default([6, 1, 1], 2.0),
        "empty.memory_format": lambda: aten.empty.memory_format([6, 1, 1]).zero_(),
        "scalar_tensor.default": lambda: aten.scalar_tensor.default(2.0),
        "linspace.default": lambda: aten.linspace.default(0, 1, 4),
        "eye.default": lambda: aten.eye.m(5, 4),
        "randn.default": lambda: aten.randn.default([6, 1, 1]),
        "rand.default": lambda: aten.rand.default([6, 1, 1]),
        "randint.default": lambda: aten.randint.default(3, [6, 1, 1]).float(),
        "randint.low": lambda: aten.randint.low(1, 3, [6, 1, 1]).float(),
        "randperm.default": lambda: aten.randperm.default(4).float(),
        "new_zeros.default": lambda: aten.new_zeros.default(x, [6, 1, 1]),
        "new_ones.default": lambda: aten.new_ones.default(x, [6, 1, 1]),
        "new_full.default": lambda: aten.new_full.default(x, [6, 1, 1], 2.0),
        "new_empty.default": lambda: aten.new_empty.default(x, [6, 1, 1]).zero_(),
        "new_empty_strided.default": lambda: aten.new_empty_strided.default(x, [6, 1, 1], [1, 1, 1]).zero_(),
        "empty_strided.default": lambda: aten.empty_strided.default([6, 1, 1], [1, 1, 1]).zero_(),
        "meshgrid.default": lambda: aten.meshgrid.default([aten.arange.default(5, dtype=torch.float32),
                                                          aten.arange.default(4, dtype=torch.float32)])[0],
        "meshgrid.indexing": lambda: aten.meshgrid.indexing([aten.arange.default(5, dtype=torch.float32),
                                                            aten.arange.default(4, dtype=torch.float32)],
                                                           indexing="ij")[1],
        "tril.default": lambda: aten.tril.default(x),
        "triu.default": lambda: aten.triu.default(x),
        "tril_indices.default": lambda: aten.tril_indices.default(4, 4)[0, :4].float(),
        "triu_indices.default": lambda: aten.triu_indices.default(4, 4)[0, :4].float(),
        "tensor.default": None,
    }[name]
    return made() if made is not None else torch.zeros(())


def sample_for(registry, key):
    if registry == "module":
        return module_sample(key)
    if registry == "method":
        return method_sample(key)
    if isinstance(key, torch._ops.OpOverload):
        return aten_sample(key)
    return function_sample(key)


KEYS = ([("module", k) for k in MODULE_RULES] + [("method", k) for k in METHOD_RULES]
        + [("function", k) for k in FUNCTION_RULES])
# names no CPU tensor call produces: no such tensor method, or CUDA
UNSAMPLED = {("method", "new_zeros_like"), ("method", "cuda"), ("method", "gelu"), ("method", "silu")}
# A recurrent layer's hidden unit is its gate rows and its weight_hh column together: random
# rows make the unit's state, which its random column feeds to every other unit, so only the
# activation side is checked here; removing the unit is exact because masking zeroes the rows
# and the columns together, which tests/passes/rules/test_recurrent.py checks (compact == masked).
ACTIVATIONS_ONLY = {("module", nn.LSTM), ("module", nn.GRU), ("module", nn.RNN)}


def _id(entry):
    registry, key = entry
    name = key.__name__ if isinstance(key, type) else str(key) if isinstance(key, (str, torch._ops.OpOverload)) else (
        f"{getattr(key, '__module__', '')}.{getattr(key, '__name__', key)}")
    return f"{registry}:{name}"


@pytest.mark.parametrize("entry", KEYS, ids=[_id(k) for k in KEYS])
def test_rule_is_sound(entry):
    registry, key = entry
    if entry in UNSAMPLED:
        pytest.skip("registered for a name no CPU tensor call produces")
    sample = sample_for(registry, key)
    assert sample is not None, f"no sample for the rule of {_id(entry)}: add one to this test"
    if sample is SCALAR:
        return  # arithmetic on sizes: no tensor channels
    fn, inputs = sample
    check_sound(fn, inputs, ((True, False),) if entry in ACTIVATIONS_ONLY else ((True, False), (False, True)))


def test_slices_that_tile_a_dim_prune_as_its_pieces():
    """Literal slices covering a dim exactly once (Phi-3's fused qkv_proj cut into query, key
    and value) are sub-ranges of it: each keeps the channels of its own range free."""
    def pieces(x):
        return aten.slice.Tensor(x, 1, 0, 2), aten.slice.Tensor(x, 1, 2, 5), aten.slice.Tensor(x, 1, 5, 6)

    check_sound(pieces, (t(*X4),))
    _, _, analysis = analysed(pieces, (t(*X4),))
    assert not any(reason.startswith("partial slice") for reason in analysis.analyzer.reasons)


def test_batch_norm_over_a_weight_pins_what_it_averages():
    """Weight standardisation (NF-ResNet, BiT): batch_norm in training mode over a conv weight
    reduces over the weight's input channels, so they cannot prune."""

    def standardised_conv(x, w):
        o = w.shape[0]
        wn = F.batch_norm(w.reshape(1, o, -1), None, None, training=True, momentum=0.0).reshape_as(w)
        return F.conv2d(x, wn)

    check_sound(standardised_conv, (t(*X4), t(4, 6, 3, 3, seed=1)))
    check_sound(lambda x, w: aten.conv2d.default(x, aten.batch_norm.default(
        w.reshape(1, 4, -1), None, None, None, None, True, 0.0, 1e-5, False).reshape(4, 6, 3, 3)),
        (t(*X4), t(4, 6, 3, 3, seed=1)))
