"""Convolutions (plain, grouped, depthwise, transposed): output channels follow the weight,
input channels are contracted with it (fx and ATen rules, and the rewrite of a literal group
count)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..spaces import Analyzer, TensorDims
from .common import contract, pin_new, rewrite_groups, schema_args, unknown
from .registry import Call, aten_rule, function_rule, module_fixer, module_rule

__all__ = ["conv"]


# ---------------------------------------------------------------------------
# fx rules
# ---------------------------------------------------------------------------


def conv(an: Analyzer, call: Call, x: TensorDims, w: TensorDims, b: TensorDims | None,
         groups: int, transposed: bool) -> TensorDims:
    """Convolution: out channels follow weight dim 0 (dim 1 transposed), input channels the
    other; with groups, channels are a product (group, channel within group)."""
    shape = call.out_shape
    n_sp = len(w) - 2
    batched = len(shape) == n_sp + 2
    c = 1 if batched else 0
    out_ch = an.new_space(shape[c], f"{call.node.name}[{c}]")
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    if groups == 1:
        contract(an, call, x[c], w_in)
        an.same(out_ch, w_out)
    else:
        g = an.new_space(groups, f"{call.node.name}.groups")
        in_per = an.new_space(x[c].size // groups, f"{call.node.name}.in_per_group")
        out_per = an.new_space(shape[c] // groups, f"{call.node.name}.out_per_group")
        an.product(x[c], [g, in_per])
        an.product(out_ch, [g, out_per])
        if transposed:
            contract(an, call, x[c], w[0])
            an.same(w[1], out_per)
        else:
            contract(an, call, in_per, w[1])
            an.same(w[0], out_ch)
        if in_per.size == 1:
            if out_per.size > 1:
                an.pin(out_per, f"depthwise channel multiplier at node '{call.node.name}'")
        else:
            an.pin(g, f"group count of a grouped convolution at node '{call.node.name}'")
        an.note("groups", g)
    if b is not None:
        an.same(b[0], out_ch)
    out = [x[0]] if batched else []
    out.append(out_ch)
    for space in x[c + 1 :]:  # the kernel mixes neighbouring positions
        an.pin(space, f"spatial dim at node '{call.node.name}'")
    for k in range(c + 1, len(shape)):
        out.append(pin_new(an, an.new_space(shape[k], f"{call.node.name}[{k}]"), "spatial dim"))
    return TensorDims(out)


@module_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_module(an: Analyzer, call: Call) -> object:
    m = call.module
    if m.padding_mode != "zeros" and isinstance(m, nn.modules.conv._ConvTransposeNd):
        return unknown(an, call)
    w = an.tensor_dims(m.weight)
    b = an.tensor_dims(m.bias) if m.bias is not None else None
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return conv(an, call, call.args[0], w, b, m.groups, transposed)


@function_rule(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               rewrite=rewrite_groups(6))
def conv_fn(an: Analyzer, call: Call) -> object:
    name = call.node.target.__name__
    transposed = "transpose" in name
    w = call.arg(1, "weight")
    b = call.arg(2, "bias")
    groups = call.arg(6, "groups", 1)
    if not isinstance(w, TensorDims) or not isinstance(groups, int):
        return unknown(an, call)
    return conv(an, call, call.args[0], w, b if isinstance(b, TensorDims) else None, groups, transposed)


# ---------------------------------------------------------------------------
# ATen rules
# ---------------------------------------------------------------------------


def _conv_call(an: Analyzer, call: Call, transposed: bool | None) -> object:
    """Any ATen convolution overload: its schema's weight, bias and groups to the shared conv
    rule; ``transposed`` None reads the schema's ``transposed`` argument."""
    a = schema_args(call)
    w, b, groups = a["weight"], a.get("bias"), a.get("groups", 1)
    if not isinstance(w, TensorDims) or not isinstance(groups, int):
        return unknown(an, call)
    if transposed is None:
        transposed = bool(a.get("transposed"))
    return conv(an, call, a["input"], w, b if isinstance(b, TensorDims) else None, groups, transposed=transposed)


@aten_rule("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding",
           rewrite=rewrite_groups(6))
def convolution_nd(an: Analyzer, call: Call) -> object:
    return _conv_call(an, call, transposed=False)


@aten_rule("conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", rewrite=rewrite_groups(6))
def convolution_transpose(an: Analyzer, call: Call) -> object:
    return _conv_call(an, call, transposed=True)


@aten_rule("convolution", "_convolution", rewrite=rewrite_groups(8))
def convolution(an: Analyzer, call: Call) -> object:
    return _conv_call(an, call, transposed=None)


# ---------------------------------------------------------------------------
# module rewrites (attributes after the tensors shrank)
# ---------------------------------------------------------------------------


@module_fixer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _fix_conv(new: nn.Module, old: nn.Module) -> None:
    in_per_group = old.in_channels // old.groups
    out_per_group = old.out_channels // old.groups
    new.out_channels = new.weight.shape[0]
    if in_per_group == 1 and old.groups > 1:  # depthwise: the group count follows the channels
        new.groups = new.out_channels // out_per_group
    new.in_channels = new.weight.shape[1] * new.groups


@module_fixer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _fix_conv_transpose(new: nn.Module, old: nn.Module) -> None:
    in_per_group = old.in_channels // old.groups
    new.in_channels = new.weight.shape[0]
    if in_per_group == 1 and old.groups > 1:
        new.groups = new.in_channels
    new.out_channels = new.weight.shape[1] * new.groups
