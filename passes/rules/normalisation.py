"""Normalisation layers: batch / instance norm (per channel), layer / RMS norm (over the
last dims), group norm (whole groups), local response norm (fx and ATen rules, the rewrite
of a literal ``normalized_shape`` or group count, and the meta shapes of the modules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..spaces import Analyzer, Space, TensorDims
from .common import check_numel, meta_like, pin_dims, pin_new, rewrite_groups, schema_args, set_arg
from .registry import (
    Call,
    Resize,
    Rewrite,
    aten_rule,
    function_rule,
    function_shape,
    module_fixer,
    module_rule,
    module_shape,
)

__all__ = ["group_norm", "normalised", "rewrite_normalized_shape"]


# ---------------------------------------------------------------------------
# fx rules
# ---------------------------------------------------------------------------


@module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
             nn.InstanceNorm2d, nn.InstanceNorm3d)
def batch_norm_module(an: Analyzer, call: Call) -> object:
    """Per-channel normalisation: weight, bias and running statistics follow the channel.
    In training mode the statistics come from the input (a module's graph is the same in
    both modes, and a compact model must train like its masked model): every dim they
    average over is pinned, the batch and positions for BatchNorm, each sample's positions
    for InstanceNorm."""
    m = call.module
    x = call.args[0]
    instance = isinstance(m, nn.modules.instancenorm._InstanceNorm)
    unbatched = instance and len(x) == m._get_no_batch_dim()
    c = 0 if unbatched else 1
    for t in (m.weight, m.bias, m.running_mean, m.running_var):
        if t is not None:
            an.same(an.tensor_dims(t)[0], x[c])
    averaged = range(c + 1, len(x)) if instance else [d for d in range(len(x)) if d != c]
    kind = "instance" if instance else "batch"
    pin_dims(an, x, averaged, f"{type(m).__name__} averages over this dim ({kind} statistics)")
    return x


@function_rule(F.batch_norm, F.instance_norm)
def batch_norm_fn(an: Analyzer, call: Call) -> object:
    """Per-channel (dim 1) normalisation whose statistics average over every other dim
    (weight standardisation applies it to a reshaped conv weight): those dims are pinned."""
    x = call.args[0]
    instance = call.node.target is F.instance_norm
    stats = ([call.arg(1, "running_mean"), call.arg(2, "running_var"), call.arg(3, "weight"), call.arg(4, "bias")]
             if not instance else [call.kwargs.get(k, call.arg(i, k)) for i, k in
                                   ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))])
    for t in stats:
        if isinstance(t, TensorDims):
            an.same(t[0], x[1])
    if instance:  # per-sample statistics over the positions (use_input_stats defaults to True)
        pin_dims(an, x, range(2, len(x)), "instance_norm averages over this dim (instance statistics)")
    elif call.arg(5, "training", False) or not isinstance(stats[0], TensorDims):  # batch statistics
        pin_dims(an, x, [d for d in range(len(x)) if d != 1], "batch_norm averages over this dim (batch statistics)")
    return x


def normalised(an: Analyzer, x: TensorDims, k: int, weight: object, bias: object, what: str) -> TensorDims:
    """LayerNorm / RMSNorm over the last ``k`` dims of ``x``: weight and bias follow them.
    The normalised dims are pinned (a channel's output depends on every channel's value),
    except under ``normalised_widths`` for a norm over one dim with a weight: that dim is
    free, the masked model computing the norm over the kept channels only (its weight
    identifies it there: :mod:`spruce.passes.maskednorm`), so the compact model's smaller
    norm is exact. The normalised space is noted (``"normalised"``) for the rewrite of a
    literal ``normalized_shape``."""
    tail = x[len(x) - k :]
    for t in (weight, bias):
        if isinstance(t, TensorDims):
            for a, b in zip(t, tail):
                an.same(a, b)
    if an.normalised_widths and k == 1 and isinstance(weight, TensorDims) and len(weight) == 1:
        an.norm_spaces.add(weight[0].id)
        an.note("normalised", tail[0])
        return x
    reason = f"{what} normalises over this dim"
    if an.normalised_widths:
        reason += " (normalised_widths frees only a norm over one dim with a weight)"
    pin_dims(an, x, range(len(x) - k, len(x)), reason)
    return x


def rewrite_normalized_shape(position: int) -> Rewrite:
    """A literal ``normalized_shape`` follows the normalised space its rule noted."""
    def rewrite(node: fx.Node, ctx: Resize) -> None:
        space = ctx.extra("normalised")
        if isinstance(space, Space) and ctx.changed(space):
            set_arg(node, position, "normalized_shape", [ctx.size(space)])

    return rewrite


@module_rule(nn.LayerNorm, nn.RMSNorm)
def layer_norm_module(an: Analyzer, call: Call) -> object:
    m = call.module
    weight = an.tensor_dims(m.weight) if getattr(m, "weight", None) is not None else None
    bias = an.tensor_dims(m.bias) if getattr(m, "bias", None) is not None else None
    return normalised(an, call.args[0], len(m.normalized_shape), weight, bias, type(m).__name__)


@function_rule(F.layer_norm, shape_args=True, rewrite=rewrite_normalized_shape(1))
def layer_norm_fn(an: Analyzer, call: Call) -> object:
    return normalised(an, call.args[0], len(call.arg(1, "normalized_shape")), call.arg(2, "weight"),
                      call.arg(3, "bias"), "layer_norm")


@function_rule(F.rms_norm, shape_args=True, rewrite=rewrite_normalized_shape(1))
def rms_norm_fn(an: Analyzer, call: Call) -> object:
    return normalised(an, call.args[0], len(call.arg(1, "normalized_shape")), call.arg(2, "weight"), None,
                      "rms_norm")


def group_norm(an: Analyzer, call: Call, x: TensorDims, num_groups: int, weight: object, bias: object) -> object:
    """Group normalisation removes whole groups: the channel dim is (group, channel within
    group) with the latter pinned, so a group's statistics never change; the group count
    is rewritten (noted as "groups"). Batch rows are independent; every other dim is
    normalised over (pinned)."""
    c = x[1]
    groups = an.new_space(num_groups, f"{call.node.name}.groups")
    per_group = pin_new(an, an.new_space(c.size // num_groups, f"{call.node.name}.per_group"),
                        "channels within a group of a group norm")
    an.product(c, [groups, per_group])
    pin_dims(an, x, range(2, len(x)), "group norm normalises over this dim")
    for t in (weight, bias):
        if isinstance(t, TensorDims):
            an.same(t[0], c)
    an.note("groups", groups)
    return x


@module_rule(nn.GroupNorm)
def group_norm_module(an: Analyzer, call: Call) -> object:
    m = call.module
    x = call.args[0]
    if not m.affine:  # the module's group count is rewritten from its weight: nothing to read it from
        pin_dims(an, x, [1], "GroupNorm without affine parameters keeps its groups")
        pin_dims(an, x, range(2, len(x)), "group norm normalises over this dim")
        return x
    return group_norm(an, call, x, m.num_groups, an.tensor_dims(m.weight), an.tensor_dims(m.bias))


@function_rule(F.group_norm, rewrite=rewrite_groups(1, "num_groups"))
def group_norm_fn(an: Analyzer, call: Call) -> object:
    return group_norm(an, call, call.args[0], int(call.arg(1, "num_groups")), call.arg(2, "weight"),
                      call.arg(3, "bias"))


@module_rule(nn.LocalResponseNorm, nn.CrossMapLRN2d)
def local_response_norm_module(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    pin_dims(an, x, [1], f"{type(call.module).__name__} mixes channels")
    return x


@function_rule(F.local_response_norm)
def local_response_norm_fn(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    pin_dims(an, x, [1], "local response normalisation mixes channels")
    return x


# ---------------------------------------------------------------------------
# ATen rules
# ---------------------------------------------------------------------------


@aten_rule("batch_norm", "instance_norm", "_native_batch_norm_legit_no_training", "native_batch_norm")
def batch_norm(an: Analyzer, call: Call) -> object:
    """Per-channel normalisation (dim 1): parameters and running statistics follow the channel.
    With batch statistics (training mode, no running statistics, instance norm) every other
    dim is averaged over, so it is pinned (weight standardisation through batch_norm on a
    weight is a reduction over its input channels)."""
    a = schema_args(call)
    x = a["input"]
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = a.get(name)
        if isinstance(t, TensorDims):
            an.same(t[0], x[1])
    stats_from_input = bool(a.get("training", False)) or bool(a.get("use_input_stats", False)) or not isinstance(
        a.get("running_mean"), TensorDims)
    if stats_from_input:
        reduced = range(2, len(x)) if "use_input_stats" in a else [d for d in range(len(x)) if d != 1]
        pin_dims(an, x, reduced, "batch_norm averages over this dim (batch or instance statistics)")
    if isinstance(call.meta, (tuple, list)) and not hasattr(call.meta, "shape"):
        return (x,) + tuple(an.fresh(m, f"{call.node.name}.{i}") for i, m in enumerate(call.meta[1:], 1))
    return x


aten_rule("layer_norm", shape_args=True, rewrite=rewrite_normalized_shape(1))(layer_norm_fn)
aten_rule("rms_norm", shape_args=True, rewrite=rewrite_normalized_shape(1))(rms_norm_fn)


@aten_rule("group_norm", rewrite=rewrite_groups(1, "num_groups"))
def group_norm_op(an: Analyzer, call: Call) -> object:
    a = schema_args(call)
    return group_norm(an, call, a["input"], int(a["num_groups"]), a.get("weight"), a.get("bias"))


# ---------------------------------------------------------------------------
# meta shapes
# ---------------------------------------------------------------------------


@module_shape(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm_meta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm: the input's rank, and weight, bias and running statistics one entry per
    channel (dim 1)."""
    module._check_input_dim(x)
    check_numel(module, ("weight", "bias", "running_mean", "running_var"), x.shape[1], "channels")
    return meta_like(x)


def _check_layer_norm(x: torch.Tensor, shape: tuple[int, ...], weight: object, bias: object) -> None:
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise RuntimeError(f"layer_norm: normalized_shape {list(shape)} does not end input shape {list(x.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != shape:
            raise RuntimeError(f"layer_norm: {name} has shape {list(tensor.shape)}, normalized_shape {list(shape)}")


@module_shape(nn.LayerNorm)
def _layer_norm_meta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm: the input's trailing dims are ``normalized_shape``, and so are weight and bias."""
    _check_layer_norm(x, tuple(module.normalized_shape), module.weight, module.bias)
    return meta_like(x)


@module_shape(nn.GroupNorm)
def _group_norm_meta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm: the channels (dim 1) split into ``num_groups``, weight and bias one per channel."""
    channels = x.shape[1] if x.dim() >= 2 else -1
    if channels < 0 or channels % module.num_groups:
        raise RuntimeError(f"GroupNorm: input shape {list(x.shape)} does not split into {module.num_groups} groups")
    check_numel(module, ("weight", "bias"), channels, "channels")
    return meta_like(x)


@function_shape(F.layer_norm)
def _layer_norm_function(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)``: as the LayerNorm module."""
    bound = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
    x, shape = bound.get("input"), bound.get("normalized_shape")
    if not isinstance(x, torch.Tensor) or not isinstance(shape, (tuple, list, torch.Size)):
        return None
    _check_layer_norm(x, tuple(shape), bound.get("weight"), bound.get("bias"))
    return meta_like(x)


# ---------------------------------------------------------------------------
# module rewrites (attributes after the tensors shrank)
# ---------------------------------------------------------------------------


@module_fixer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _fix_norm(new: nn.Module, old: nn.Module) -> None:
    for t in (new.weight, new.running_mean):
        if t is not None:
            new.num_features = t.shape[0]
            return


@module_fixer(nn.GroupNorm)
def _fix_group_norm(new: nn.Module, old: nn.Module) -> None:
    if new.weight is not None:  # whole groups are removed (the rule pins channels within a group)
        per_group = old.num_channels // old.num_groups
        new.num_channels = new.weight.shape[0]
        new.num_groups = new.num_channels // per_group


@module_fixer(nn.LayerNorm, nn.RMSNorm)
def _fix_layer_norm(new: nn.Module, old: nn.Module) -> None:
    if new.weight is not None:  # a norm over one dim whose width shrank (normalised_widths)
        new.normalized_shape = tuple(new.weight.shape)
