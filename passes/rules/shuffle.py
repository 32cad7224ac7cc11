"""Channel and pixel shuffles: the channel dim as a row-major product of groups (fx and ATen
rules, one rule each)."""

from __future__ import annotations

import torch
from torch import nn

from ..spaces import Analyzer, TensorDims
from .common import pin_new
from .registry import Call, aten_rule, module_rule

__all__ = ["channel_shuffle", "pixel_shuffle"]

aten = torch.ops.aten


def channel_shuffle(an: Analyzer, call: Call, x: TensorDims, g: int) -> TensorDims:
    """x.view(B, g, C/g, ...).transpose(1, 2): channel c' of every group moves together."""
    groups = pin_new(an, an.new_space(g, f"{call.node.name}.groups"), "channel shuffle group count")
    per = an.new_space(x[1].size // g, f"{call.node.name}.per_group")
    an.product(x[1], [groups, per])
    out_ch = an.new_space(x[1].size, f"{call.node.name}[1]")
    an.product(out_ch, [per, groups])
    return TensorDims([x[0], out_ch, *x[2:]])


@module_rule(nn.ChannelShuffle)
def channel_shuffle_module(an: Analyzer, call: Call) -> object:
    return channel_shuffle(an, call, call.args[0], call.module.groups)


@aten_rule("channel_shuffle", "native_channel_shuffle")
def channel_shuffle_op(an: Analyzer, call: Call) -> object:
    return channel_shuffle(an, call, call.args[0], int(call.args[1]))


def pixel_shuffle(an: Analyzer, call: Call, x: TensorDims, r: int, upscale: bool) -> TensorDims:
    """(*, C r r, H, W) to (*, C, H r, W r) (``upscale``) or back: the channel dims are a product
    (channel, r, r) with the factors pinned; the spatial dims are pinned."""
    shape = call.out_shape
    lead = len(x) - 3
    out = list(x[:lead]) + [an.new_space(s, f"{call.node.name}[{k}]") for k, s in enumerate(shape[lead:], lead)]
    for s in out[lead + 1 :] + list(x[lead + 1 :]):
        an.pin(s, f"spatial dim at node '{call.node.name}'")
    f1 = pin_new(an, an.new_space(r, f"{call.node.name}.r1"), "pixel shuffle factor")
    f2 = pin_new(an, an.new_space(r, f"{call.node.name}.r2"), "pixel shuffle factor")
    if upscale:
        an.product(x[lead], [out[lead], f1, f2])
    else:
        an.product(out[lead], [x[lead], f1, f2])
    return TensorDims(out)


@module_rule(nn.PixelShuffle, nn.PixelUnshuffle)
def pixel_shuffle_module(an: Analyzer, call: Call) -> object:
    m = call.module
    if isinstance(m, nn.PixelShuffle):
        return pixel_shuffle(an, call, call.args[0], m.upscale_factor, upscale=True)
    return pixel_shuffle(an, call, call.args[0], m.downscale_factor, upscale=False)


@aten_rule("pixel_shuffle", "pixel_unshuffle")
def pixel_shuffle_op(an: Analyzer, call: Call) -> object:
    upscale = call.node.target is aten.pixel_shuffle.default
    return pixel_shuffle(an, call, call.args[0], int(call.args[1]), upscale)
