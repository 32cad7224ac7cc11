"""Reductions (sum, mean, max, norms...) and ops mixing values along one dim (softmax,
cumulative sums, sorting): the dims they reduce or mix over are pinned, except the mean of
squares of an RMSNorm computed by hand under ``normalised_widths``."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..spaces import Analyzer, TensorDims
from .common import dims_arg, is_multi, pin_dims, pin_new, schema_args, unknown
from .elementwise import broadcast
from .registry import Call, aten_rule, function_rule, method_rule, module_rule

__all__ = ["along_dim", "reduction"]


# ---------------------------------------------------------------------------
# fx rules
# ---------------------------------------------------------------------------


_MEANS = {torch.mean, "mean", torch.ops.aten.mean.dim}
_POWS = {torch.pow, "pow", operator.pow, torch.ops.aten.pow.Tensor_Scalar}


def _hand_written_rms_norm(an: Analyzer, call: Call, x: TensorDims, dims: list[int] | None) -> torch.Tensor | None:
    """The weight of the RMSNorm module this node computes by hand, or None: under
    ``normalised_widths``, ``x.pow(2).mean(-1, keepdim=True)`` inside a module whose class
    name says ``Norm`` and whose only parameter is a 1-D ``weight`` as wide as the last dim
    (Llama's, Qwen2's, T5's RMSNorm). The masked model then takes that mean over the kept
    channels (:func:`spruce.passes.maskednorm.install_masked_norms`)."""
    node = call.node
    if not (an.normalised_widths and an.hand_written_norms) or node.target not in _MEANS:
        return None
    if dims != [len(x) - 1] or not isinstance(call.meta, TensorMetadata) or len(call.meta.shape) != len(x):
        return None  # the last dim, kept (keepdim=True)
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or source.target not in _POWS or len(source.args) < 2 or source.args[1] != 2:
        return None
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    name = getattr(kind, "__name__", str(kind)).rsplit(".", 1)[-1]
    try:
        module = an.model.get_submodule(str(path))
    except (AttributeError, TypeError):
        return None
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if "Norm" not in name or list(params) != ["weight"] or weight.dim() != 1 or weight.numel() != x[-1].size:
        return None
    return weight


def reduction(an: Analyzer, call: Call, dim_name: str = "dim") -> object:
    """Reduction over some dims: those dims lose their channels' identity (pinned), except
    the mean of squares of an RMSNorm computed by hand under ``normalised_widths``
    (:func:`_hand_written_rms_norm`)."""
    x = call.args[0]
    if not isinstance(x, TensorDims):
        return unknown(an, call)
    dims = dims_arg(call.arg(1, dim_name), len(x))
    weight = _hand_written_rms_norm(an, call, x, dims) if not isinstance(call.arg(1, dim_name), TensorDims) else None
    if weight is not None:
        w = an.tensor_dims(weight)[0]
        an.same(w, x[-1])
        an.norm_spaces.add(w.id)
        an.hand_norm_spaces.add(w.id)
        return TensorDims(list(x[:-1]) + [pin_new(an, an.new_space(1, f"{call.node.name}[{len(x) - 1}]"),
                                                  "reduced dim")])
    out_meta = call.meta[0] if is_multi(call.meta) else call.meta
    # read from the result: positional arguments differ between overloads (std(x, dim, unbiased, keepdim))
    keepdim = (len(out_meta.shape) == len(x) if isinstance(out_meta, TensorMetadata)
               else bool(call.arg(2, "keepdim", False)))
    if dims is None or isinstance(call.arg(1, dim_name), TensorDims):
        if isinstance(call.arg(1, dim_name), TensorDims):  # torch.max(x, y) is elementwise
            return broadcast(an, call)
        pin_dims(an, x, range(len(x)), "full reduction")
        return an.fresh(call.meta, call.node.name) if call.meta is not None else None
    pin_dims(an, x, dims, "reduction over this dim")
    kept = []
    for d, space in enumerate(x):
        if d in dims:
            if keepdim:
                kept.append(pin_new(an, an.new_space(1, f"{call.node.name}[{d}]"), "reduced dim"))
        else:
            kept.append(space)
    kept = TensorDims(kept)
    if is_multi(call.meta):  # (values, indices)
        return tuple(kept for _ in call.meta)
    return kept


def along_dim(an: Analyzer, call: Call, dim_pos: int = 1, what: str = "normalised over this dim"):
    """Op mixing values along one dim (softmax, cumsum): that dim is pinned."""
    x = call.args[0]
    d = call.arg(dim_pos, "dim")
    if d is None:
        pin_dims(an, x, range(len(x)), what)
    else:
        pin_dims(an, x, [int(d)], what)
    return x


@function_rule(torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, F.softmin, torch.cumsum,
               torch.cumprod, F.normalize, F.glu)
@method_rule("softmax", "log_softmax", "cumsum", "cumprod")
def mixing(an: Analyzer, call: Call) -> object:
    if call.node.target is F.normalize:
        x = call.args[0]
        pin_dims(an, x, [int(call.arg(2, "dim", 1))], "normalised over this dim")
        return x
    if call.node.target is F.glu:
        return unknown(an, call)
    return along_dim(an, call)


@module_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def softmax_module(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = call.module.dim
    pin_dims(an, x, range(len(x)) if d is None else [d], "softmax over this dim")
    return x


@function_rule(torch.sum, torch.mean, torch.amax, torch.amin, torch.std, torch.var, torch.prod,
               torch.logsumexp, torch.max, torch.min, torch.argmax, torch.argmin, torch.norm,
               torch.all, torch.any, torch.median)
@method_rule("sum", "mean", "amax", "amin", "std", "var", "prod", "logsumexp", "max", "min",
             "argmax", "argmin", "norm", "all", "any", "median")
def reduce_rule(an: Analyzer, call: Call) -> object:
    if call.node.target in (torch.norm, "norm"):
        return reduction(an, call) if call.arg(2, "dim") is None else unknown(an, call)
    return reduction(an, call)


# ---------------------------------------------------------------------------
# ATen rules
# ---------------------------------------------------------------------------


def _with_args(call: Call, *args: object, **kwargs: object) -> Call:
    """The same node seen with other arguments (to reuse a torch-level helper)."""
    return Call(call.node, tuple(args), dict(kwargs), call.meta, call.module)


def _reduce(an: Analyzer, call: Call, dim: object, keepdim: bool, all_if_empty: bool = False) -> object:
    x = call.args[0]
    if not isinstance(x, TensorDims):
        return unknown(an, call)
    if dim is None or (all_if_empty and isinstance(dim, (list, tuple)) and not dim):
        dim = list(range(len(x)))
    return reduction(an, _with_args(call, x, dim, keepdim))


@aten_rule("sum", "mean", "prod", "all", "any", "max", "min", "amax.default", "amin", "std", "var",
           "count_nonzero")
def reduce_all(an: Analyzer, call: Call) -> object:
    """Full reductions (and amax/amin, whose empty dim list means every dim)."""
    a = schema_args(call)
    return _reduce(an, call, a.get("dim"), bool(a.get("keepdim", False)), all_if_empty=True)


@aten_rule("sum.dim_IntList", "mean.dim", "prod.dim_int", "all.dim", "all.dims", "any.dim", "any.dims",
           "max.dim", "min.dim", "std.correction", "var.correction", "std_mean.correction",
           "var_mean.correction", "logsumexp", "norm.ScalarOpt_dim", "linalg_vector_norm", "argmax", "argmin",
           "count_nonzero.dim_IntList", "median.dim", "mode", "nansum", "kthvalue")
def reduce_dims(an: Analyzer, call: Call) -> object:
    """Reductions over the ``dim`` argument (all dims when None or empty)."""
    a = schema_args(call)
    return _reduce(an, call, a.get("dim"), bool(a.get("keepdim", False)), all_if_empty=True)


@aten_rule("softmax.int", "log_softmax.int", "_softmax", "_log_softmax", "cumsum", "cumprod", "logcumsumexp",
           "cummax", "cummin", "sort", "argsort", "topk")
def along(an: Analyzer, call: Call) -> object:
    """Ops mixing values along ``dim`` (normalisation, scans, sorting): that dim is pinned."""
    a = schema_args(call)
    x = call.args[0]
    d = a.get("dim", -1)
    pin_dims(an, x, [int(d)], "mixes values along this dim")
    shape_out = call.meta
    if isinstance(shape_out, (tuple, list)) and not hasattr(shape_out, "shape"):
        outs = []
        for i, m in enumerate(shape_out):
            if tuple(m.shape) == tuple(s.size for s in x):
                outs.append(x)
            else:
                dims = list(x)
                dims[int(d) % len(x)] = pin_new(an, an.new_space(m.shape[int(d) % len(x)],
                                                                 f"{call.node.name}.{i}"), "selected along a dim")
                outs.append(TensorDims(dims))
        return tuple(outs)
    return along_dim(an, _with_args(call, x, d))
