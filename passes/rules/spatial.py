"""Spatial ops: pooling, resampling, padding, flips and rolls, grid sampling and regions of
interest: batch and channels pass through, the spatial dims are pinned (fx and ATen rules,
and the meta shapes of adaptive average pooling)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..spaces import Analyzer, TensorDims
from .common import dims_arg, is_multi, pin_dims, pin_new, schema_args, unknown
from .registry import (
    ATEN_OPS,
    Call,
    FunctionShape,
    aten_rule,
    function_rule,
    function_shape,
    method_rule,
    module_rule,
    module_shape,
)

__all__ = ["spatial"]


# ---------------------------------------------------------------------------
# fx rules
# ---------------------------------------------------------------------------


def spatial(an: Analyzer, call: Call, n_spatial: int | None = None) -> object:
    """Leading (batch, channel) dims pass through; the trailing spatial dims are new."""
    x = call.args[0]
    shape = call.out_shape
    n_spatial = len(shape) - 2 if n_spatial is None else n_spatial
    keep = len(shape) - n_spatial
    out = list(x[:keep])
    for k in range(keep, len(x)):  # pooling/interpolation windows mix along these dims
        an.pin(x[k], f"spatial dim at node '{call.node.name}'")
    for k in range(keep, len(shape)):
        if k < len(x) and x[k].size == shape[k] and call.node.target not in (F.interpolate,):
            out.append(x[k])
        else:
            out.append(pin_new(an, an.new_space(shape[k], f"{call.node.name}[{k}]"), "spatial dim"))
    return TensorDims(out)


_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1,
    nn.LPPool2d: 2, nn.Upsample: None, nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2,
}


def _pool_module(an: Analyzer, call: Call) -> object:
    if getattr(call.module, "return_indices", False):
        return unknown(an, call)
    n = _POOL_MODULES[type(call.module)]
    return spatial(an, call, len(call.args[0]) - 2 if n is None else n)


module_rule(*_POOL_MODULES)(_pool_module)


_POOL_FUNCS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool2d: 2,
    torch.max_pool2d: 2, torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
}


def _pool_fn(an: Analyzer, call: Call) -> object:
    if call.kwargs.get("return_indices") or is_multi(call.meta):
        return unknown(an, call)
    return spatial(an, call, _POOL_FUNCS[call.node.target])


function_rule(*_POOL_FUNCS)(_pool_fn)


@function_rule(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
def interpolate(an: Analyzer, call: Call) -> object:
    return spatial(an, call, len(call.args[0]) - 2)


@function_rule(F.pad)
def pad(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    amounts = call.arg(1, "pad")
    if not all(isinstance(p, int) for p in amounts):
        return unknown(an, call)
    shape = call.out_shape
    out = list(x)
    for k in range(len(amounts) // 2):
        d = len(x) - 1 - k
        if amounts[2 * k] or amounts[2 * k + 1]:
            an.pin(x[d], f"padded dim at node '{call.node.name}'")
            out[d] = pin_new(an, an.new_space(shape[d], f"{call.node.name}[{d}]"), "padded dim")
    return TensorDims(out)


@module_rule(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
             nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
             nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad2d)
def pad_module(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    shape = call.out_shape
    out = list(x)
    for d in range(len(x)):
        if x[d].size != shape[d]:
            an.pin(x[d], f"padded dim at node '{call.node.name}'")
            out[d] = pin_new(an, an.new_space(shape[d], f"{call.node.name}[{d}]"), "padded dim")
    return TensorDims(out)


@function_rule(torch.roll, torch.flip)
@method_rule("roll", "flip")
def roll(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    name = call.node.target if isinstance(call.node.target, str) else call.node.target.__name__
    dims = call.arg(2, "dims") if name == "roll" else call.arg(1, "dims")
    pin_dims(an, x, range(len(x)) if dims is None else dims_arg(dims, len(x)), f"{name} along this dim")
    return x


# ---------------------------------------------------------------------------
# ATen rules
# ---------------------------------------------------------------------------


aten_rule("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
          "replication_pad1d", "replication_pad2d", "replication_pad3d", "circular_pad2d")(pad)


@aten_rule("flip", "roll")
def flip(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    dims = schema_args(call).get("dims")
    pin_dims(an, x, range(len(x)) if not dims else dims, "reordered along this dim")
    return x


@aten_rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
           "lp_pool2d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
           "upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec", "upsample_linear1d",
           "upsample_linear1d.vec", "upsample_bilinear2d", "upsample_bilinear2d.vec", "upsample_bicubic2d",
           "upsample_bicubic2d.vec", "upsample_trilinear3d", "upsample_trilinear3d.vec",
           "_upsample_bilinear2d_aa", "_upsample_bilinear2d_aa.vec", "_upsample_nearest_exact2d",
           "_upsample_nearest_exact2d.vec")
def pool(an: Analyzer, call: Call) -> object:
    """Pooling and resampling: batch and channel pass through, spatial dims are new (pinned)."""
    x = call.args[0]
    n_spatial = len(x) - 2 if len(x) >= 3 else len(x) - 1
    return spatial(an, call, n_spatial)


@aten_rule("max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
           "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")
def pool_with_indices(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    first = Call(call.node, call.args, call.kwargs, call.meta[0], call.module)
    out = spatial(an, first, len(x) - 2)
    return (out, out)


@aten_rule("grid_sampler", "grid_sampler_2d", "grid_sampler_3d")
def grid_sample(an: Analyzer, call: Call) -> object:
    """Sampling ``input`` at ``grid`` positions: channels pass through per batch row; the
    input's spatial dims are read at data-dependent positions and the grid is coordinates."""
    x, grid = call.args[0], call.args[1]
    pin_dims(an, x, range(2, len(x)), "sampled spatial dim")
    an.pin_value(grid, f"sampling grid at node '{call.node.name}'")
    an.same(x[0], grid[0])
    shape = call.out_shape
    out = [x[0], x[1]] + [pin_new(an, an.new_space(s, f"{call.node.name}[{k}]"), "sampled position")
                          for k, s in enumerate(shape[2:], 2)]
    return TensorDims(out)


def _register_torchvision_ops() -> None:
    """torchvision's RoIAlign / RoIPool: channels pass through, box rows are new."""
    try:
        import torchvision  # noqa: F401  (registers torch.ops.torchvision)
    except ImportError:  # torchvision is optional
        return
    ops = [getattr(getattr(torch.ops.torchvision, n, None), "default", None) for n in ("roi_align", "roi_pool",
                                                                                        "ps_roi_align")]

    def roi(an: Analyzer, call: Call) -> object:
        x, rois = call.args[0], call.args[1]
        if call.node.target is ops[2]:  # position-sensitive: channels are (bins, channel) products
            return unknown(an, call)
        pin_dims(an, x, [0] + list(range(2, len(x))), "pooled over by regions of interest")
        an.pin_value(rois, f"regions of interest at node '{call.node.name}'")
        meta = call.meta[0] if isinstance(call.meta, (tuple, list)) and not hasattr(call.meta, "shape") else call.meta
        shape = tuple(meta.shape)
        out = TensorDims([pin_new(an, an.new_space(shape[0], f"{call.node.name}[0]"), "one row per region"), x[1]]
                         + [pin_new(an, an.new_space(s, f"{call.node.name}[{k}]"), "pooled bin")
                            for k, s in enumerate(shape[2:], 2)])
        return (out, an.fresh(call.meta[1], call.node.name + ".argmax")) if meta is not call.meta else out

    present = [op for op in ops if op is not None]
    function_rule(*present)(roi)
    ATEN_OPS.extend(op for op in present if op not in ATEN_OPS)


_register_torchvision_ops()


# ---------------------------------------------------------------------------
# meta shapes
# ---------------------------------------------------------------------------


def _adaptive_pool(x: torch.Tensor, output_size: object, dims: int) -> torch.Tensor:
    """The output of an adaptive pooling over the last ``dims`` dims of ``x`` (``output_size``
    an int or a tuple whose None entries keep the input's size)."""
    sizes = (output_size,) * dims if isinstance(output_size, int) else tuple(output_size)
    if len(sizes) != dims or x.dim() not in (dims + 1, dims + 2) or any(s == 0 for s in x.shape[1:]):
        raise RuntimeError(f"adaptive pooling to {output_size} does not fit input shape {list(x.shape)}")
    spatial = x.shape[x.dim() - dims:]
    out = tuple(int(size if want is None else want) for size, want in zip(spatial, sizes))
    return torch.empty((*x.shape[:x.dim() - dims], *out), dtype=x.dtype, device="meta")


@module_shape(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _adaptive_avg_pool(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """AdaptiveAvgPoolNd: the last N dims become ``output_size`` (None keeps a size)."""
    return _adaptive_pool(x, module.output_size, _POOL_MODULES[type(module)])


def _adaptive_avg_pool_function(function: Callable) -> FunctionShape:
    def rule(args: tuple, kwargs: dict) -> torch.Tensor | None:
        """``F.adaptive_avg_poolNd(x, output_size)``: as the module."""
        if kwargs or len(args) != 2 or not isinstance(args[0], torch.Tensor) or \
                not isinstance(args[1], (int, tuple, list)):
            return None
        return _adaptive_pool(args[0], args[1], _POOL_FUNCS[function])

    return rule


for _function in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
    function_shape(_function)(_adaptive_avg_pool_function(_function))
