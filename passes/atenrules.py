"""Channel rules for the ATen operators of ``torch.export`` graphs.

One rule per operator, registered in the same table as every other ``call_function``
target (``spruce.passes.oprules.FUNCTION_RULES``, keyed by the ``OpOverload``), with
the rewrite of its size-carrying arguments, when it has any, in
``spruce.passes.oprules.REWRITES``. Rules read their arguments by the operator's schema
names (:func:`schema_args`: the argument adapter), and most delegate to the shared
helpers of the torch-level rules. An operator without a rule pins every dimension it
touches, with a reason naming the node.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import fx

from .analysis import Analyzer, ShapeOf, SizeRead, TensorDims
from .oprules import (
    Call,
    Resize,
    Rewrite,
    along_dim,
    broadcast,
    cat,
    contract,
    conv,
    expand,
    expand_as,
    function_rule,
    index_tensor,
    layer_norm_fn,
    linear,
    matmul,
    pad,
    pin_dims,
    pin_new,
    reduction,
    repeat,
    reshape_to,
    rewrite_groups,
    rewrite_normalized_shape,
    rewrite_size_list,
    rms_norm_fn,
    same_shape,
    scalar_of,
    sdpa,
    set_arg,
    spatial,
    split_pieces,
    split_sizes,
    stack,
    unknown,
)
from .oprules import group_norm as group_norm_rule

__all__ = ["ATEN_OPS", "schema_args"]

aten = torch.ops.aten
# every ATen operator with a rule here (the soundness tests run over this list)
ATEN_OPS: list[object] = []


def _ops(*names: str) -> list[object]:
    """The OpOverloads ``aten.<packet>.<overload>`` that exist in the installed torch."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


def aten_rule(*names: str, shape_args: bool = False, rewrite: Rewrite | None = None):
    """Register a rule for the named ATen overloads (``"add.Tensor"``; no overload means
    ``.default``)."""
    ops = _ops(*names)

    def register(rule: Callable) -> Callable:
        ATEN_OPS.extend(op for op in ops if op not in ATEN_OPS)
        return function_rule(*ops, shape_args=shape_args, rewrite=rewrite)(rule)

    return register


_SCHEMA_NAMES: dict[object, tuple[list[str], dict[str, object]]] = {}


def schema_args(call: Call) -> dict[str, object]:
    """The node's arguments by schema name (positional and keyword, defaults filled in)."""
    op = call.node.target
    cached = _SCHEMA_NAMES.get(op)
    if cached is None:
        names = [a.name for a in op._schema.arguments]
        defaults = {a.name: a.default_value for a in op._schema.arguments if a.has_default_value()}
        cached = _SCHEMA_NAMES[op] = (names, defaults)
    names, defaults = cached
    out = dict(defaults)
    out.update(zip(names, call.args))
    out.update(call.kwargs)
    return out


def _with_args(call: Call, *args: object, **kwargs: object) -> Call:
    """The same node seen with other arguments (to reuse a torch-level helper)."""
    return Call(call.node, tuple(args), dict(kwargs), call.meta, call.module)


def _dims(value: object, ndim: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value % ndim if ndim else 0]
    return [int(d) % ndim for d in value]


# ---------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------

aten_rule(
    "add.Tensor", "add.Scalar", "add_.Tensor", "add_.Scalar", "sub.Tensor", "sub.Scalar", "sub_.Tensor",
    "rsub.Tensor", "rsub.Scalar", "mul.Tensor", "mul.Scalar", "mul_.Tensor", "mul_.Scalar", "div.Tensor",
    "div.Scalar", "div.Tensor_mode", "div_.Tensor", "div_.Scalar", "pow.Tensor_Tensor", "pow.Tensor_Scalar",
    "pow.Scalar", "maximum", "minimum", "fmax", "fmin", "where.self", "where.ScalarSelf", "where.ScalarOther",
    "where.Scalar", "eq.Tensor", "eq.Scalar", "ne.Tensor", "ne.Scalar", "lt.Tensor", "lt.Scalar", "le.Tensor",
    "le.Scalar", "gt.Tensor", "gt.Scalar", "ge.Tensor", "ge.Scalar", "logical_and", "logical_or",
    "logical_xor", "bitwise_and.Tensor", "bitwise_and.Scalar", "bitwise_or.Tensor", "bitwise_or.Scalar",
    "bitwise_xor.Tensor", "floor_divide", "floor_divide.Scalar", "remainder.Tensor", "remainder.Scalar",
    "fmod.Tensor", "fmod.Scalar", "atan2", "masked_fill.Scalar", "masked_fill.Tensor", "masked_fill_.Scalar",
    "masked_fill_.Tensor", "addcmul", "addcdiv", "lerp.Scalar", "lerp.Tensor", "copysign.Tensor", "hypot",
    "clamp.Tensor", "copy_", "xlogy.Tensor", "isclose",
)(broadcast)

aten_rule(
    "relu", "relu_", "relu6", "silu", "silu_", "gelu", "gelu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "leaky_relu",
    "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "mish", "mish_", "softplus", "threshold",
    "threshold_", "log_sigmoid", "hardshrink", "softshrink", "exp", "exp_", "exp2", "log", "log_", "log2",
    "log10", "log1p", "expm1", "sqrt", "sqrt_", "rsqrt", "neg", "neg_", "abs", "abs_", "sin", "cos", "tan",
    "atan", "asin", "acos", "sinh", "cosh", "erf", "erfinv", "clamp", "clamp_", "clamp_min", "clamp_min_",
    "clamp_max", "clamp_max_", "clip", "square", "reciprocal", "sign", "sgn", "floor", "ceil",
    "round", "round.decimals", "trunc", "frac", "logical_not", "bitwise_not", "isnan", "isinf", "isfinite",
    "nan_to_num", "detach", "detach_", "alias", "clone", "contiguous", "lift_fresh_copy", "_to_copy",
    "to.dtype", "to.device", "to.dtype_layout", "dropout", "dropout_", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "zero_", "fill_.Scalar", "fill.Scalar", "bernoulli", "bernoulli_.float", "uniform_", "normal_",
    "pow_.Scalar", "mul_.Scalar", "positive",
)(same_shape)


@aten_rule("type_as")
def type_as(an: Analyzer, call: Call) -> object:
    """Casts to the other tensor's dtype; the other tensor's values and shape play no part."""
    return call.args[0]


@aten_rule("prelu")
def prelu(an: Analyzer, call: Call) -> object:
    x, w = call.args[0], call.args[1]
    if isinstance(w, TensorDims) and w[0].size > 1:
        an.same(w[0], x[1])
    return x


@aten_rule("native_dropout")
def native_dropout(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    return (x, x)


# ---------------------------------------------------------------------------
# reductions and ops mixing values along a dim
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# normalisation
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
def group_norm(an: Analyzer, call: Call) -> object:
    a = schema_args(call)
    return group_norm_rule(an, call, a["input"], int(a["num_groups"]), a.get("weight"), a.get("bias"))


# ---------------------------------------------------------------------------
# layers with parameters
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


@aten_rule("linear")
def linear_op(an: Analyzer, call: Call) -> object:
    a = schema_args(call)
    w, b = a["weight"], a.get("bias")
    if not isinstance(w, TensorDims) or len(w) != 2:
        return unknown(an, call)
    return linear(an, call, a["input"], w, b if isinstance(b, TensorDims) else None)


aten_rule("matmul", "mm", "bmm")(matmul)


@aten_rule("addmm")
def addmm(an: Analyzer, call: Call) -> object:
    """``bias + x @ w`` with ``w`` stored (in, out): transformers' ``Conv1D`` (GPT-2)."""
    a = schema_args(call)
    bias, x, w = a["self"], a["mat1"], a["mat2"]
    if not all(isinstance(v, TensorDims) for v in (bias, x, w)) or len(x) != 2 or len(w) != 2:
        return unknown(an, call)
    contract(an, call, x[1], w[0])
    out_f = an.new_space(w[1].size, f"{call.node.name}[-1]")
    an.same(out_f, w[1])
    rows = x[0]
    if bias[-1].size == out_f.size:
        an.same(bias[-1], out_f)
    else:
        an.pin(bias[-1], f"broadcast bias at node '{call.node.name}'")
    if len(bias) == 2:
        if bias[0].size == rows.size:
            an.same(bias[0], rows)
        else:
            an.pin(bias[0], f"broadcast bias at node '{call.node.name}'")
    return TensorDims([rows, out_f])


@aten_rule("embedding")
def embedding(an: Analyzer, call: Call) -> object:
    w, ids = call.args[0], call.args[1]
    an.pin(w[0], f"embedding vocabulary at node '{call.node.name}'")
    out_d = an.new_space(w[1].size, f"{call.node.name}[-1]")
    an.same(out_d, w[1])
    return TensorDims(list(ids) + [out_d])


aten_rule("scaled_dot_product_attention")(sdpa)


# ---------------------------------------------------------------------------
# reshapes, views, joins and splits
# ---------------------------------------------------------------------------


def _rewrite_sizes_at(position: int, name: str) -> Rewrite:
    """view/reshape/expand: the size list follows the output's dims."""
    def rewrite(node: fx.Node, ctx: Resize) -> None:
        sizes = node.args[position] if position < len(node.args) else node.kwargs.get(name)
        if isinstance(sizes, (list, tuple)):
            new = rewrite_size_list(list(sizes), ctx.out, ctx)
            if new is not None:
                set_arg(node, position, name, new)

    return rewrite


@aten_rule("view", "_unsafe_view", "reshape", "view_copy", shape_args=True, rewrite=_rewrite_sizes_at(1, "size"))
def view(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    if not isinstance(x, TensorDims) or not hasattr(call.meta, "shape"):
        return unknown(an, call)
    return reshape_to(an, x, call.out_shape, call.node.name)


@aten_rule("flatten.using_ints", "squeeze", "squeeze.dim", "squeeze.dims", "unsqueeze", "view_as", "reshape_as",
           shape_args=True)
def reshape_like(an: Analyzer, call: Call) -> object:
    """Reshapes whose arguments are dims, not sizes (nothing to rewrite)."""
    x = call.args[0]
    if not isinstance(x, TensorDims) or not hasattr(call.meta, "shape"):
        return unknown(an, call)
    out = reshape_to(an, x, call.out_shape, call.node.name)
    other = call.args[1] if len(call.args) > 1 else None
    if call.node.target in (aten.view_as.default, aten.reshape_as.default) and isinstance(other, TensorDims):
        for o, s in zip(out, other):
            an.same(o, s)  # the compact `other` keeps matching sizes
    return out


def _rewrite_unflatten(node: fx.Node, ctx: Resize) -> None:
    out, x = ctx.out, ctx.value(node.args[0])
    if not isinstance(out, TensorDims) or not isinstance(x, TensorDims):
        return
    d = int(node.args[1]) % len(x)
    sizes = list(node.args[2])
    new = rewrite_size_list(sizes, TensorDims(out[d : d + len(sizes)]), ctx)
    if new is not None:
        set_arg(node, 2, "sizes", new)


@aten_rule("unflatten.int", shape_args=True, rewrite=_rewrite_unflatten)
def unflatten(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    return reshape_to(an, x, call.out_shape, call.node.name)


@aten_rule("permute", "transpose.int", "t", "movedim.int", "swapaxes", "swapdims", "numpy_T", "mT")
def reorder(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    n = len(x)
    op = call.node.target
    if op is aten.permute.default:
        order = [int(d) % n for d in call.args[1]]
    elif op in (aten.transpose.int, getattr(aten.swapaxes, "default", None), getattr(aten.swapdims, "default", None)):
        a, b = int(call.args[1]) % n, int(call.args[2]) % n
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
    elif op is aten.movedim.int:
        src, dst = int(call.args[1]) % n, int(call.args[2]) % n
        order = [d for d in range(n) if d != src]
        order.insert(dst, src)
    elif op is getattr(getattr(aten, "mT", None), "default", None):
        order = list(range(n - 2)) + [n - 1, n - 2]
    else:  # t, numpy_T
        order = list(reversed(range(n)))
    return TensorDims(x[d] for d in order)


@aten_rule("expand", shape_args=True, rewrite=_rewrite_sizes_at(1, "size"))
def expand_op(an: Analyzer, call: Call) -> object:
    return expand(an, call)


aten_rule("expand_as")(expand_as)


aten_rule("repeat")(repeat)


@aten_rule("select.int")
def select(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = int(call.args[1]) % len(x)
    return index_tensor(an, call, x, tuple([slice(None)] * d + [0]))


@aten_rule("slice.Tensor", "narrow")
def slice_op(an: Analyzer, call: Call) -> object:
    """A full slice keeps the dim's channels; a partial one pins them."""
    x = call.args[0]
    a = schema_args(call)
    d = int(a.get("dim", 0)) % len(x)
    if call.node.target is aten.narrow.default:
        start, length = a.get("start"), a.get("length")
        full = start == 0 and isinstance(length, int) and length >= x[d].size
    else:
        start, end, step = a.get("start"), a.get("end"), a.get("step", 1)
        full = step == 1 and start in (None, 0) and (end is None or (isinstance(end, int) and end >= x[d].size))
    if any(isinstance(v, (TensorDims, SizeRead, ShapeOf)) for v in (a.get("start"), a.get("end"), a.get("length"))):
        full = False
    if full:
        return x
    an.pin(x[d], f"partial slice at node '{call.node.name}'")
    dims = list(x)
    dims[d] = pin_new(an, an.new_space(call.out_shape[d], f"{call.node.name}[{d}]"), "partial slice")
    return TensorDims(dims)


@aten_rule("index_select")
def index_select(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = int(call.args[1]) % len(x)
    an.pin(x[d], f"indexed dim at node '{call.node.name}'")
    an.pin_value(call.args[2], f"index at node '{call.node.name}'")
    dims = list(x)
    dims[d] = pin_new(an, an.new_space(call.out_shape[d], f"{call.node.name}[{d}]"), "indexed dim")
    return TensorDims(dims)


aten_rule("cat", "concat", "concatenate")(cat)
aten_rule("stack")(stack)


def _rewrite_split(node: fx.Node, ctx: Resize) -> None:
    """split / chunk become split_with_sizes with each piece's new size."""
    found = split_sizes(ctx.value(node.args[0]), ctx.out, ctx)
    if found is None:
        return
    d, sizes = found
    node.target = aten.split_with_sizes.default
    node.args = (node.args[0], sizes, d)
    node.kwargs = {}


@aten_rule("split.Tensor", "split_with_sizes", "chunk", "unsafe_split.Tensor", "unsafe_chunk",
           "split_with_sizes_copy", shape_args=True, rewrite=_rewrite_split)
def split(an: Analyzer, call: Call) -> object:
    """Pieces along ``dim`` are consecutive sub-ranges of it."""
    x = call.args[0]
    d = int(schema_args(call).get("dim", 0)) % len(x)
    return split_pieces(an, call, x, d, list(call.meta))


@aten_rule("unbind.int")
def unbind(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = int(schema_args(call).get("dim", 0)) % len(x)
    an.pin(x[d], f"unbind over this dim at node '{call.node.name}'")
    return tuple(TensorDims(s for k, s in enumerate(x) if k != d) for _ in call.meta)


@aten_rule("tensor_split.sections", "tensor_split.indices", "tensor_split.tensor_indices_or_sections")
def tensor_split(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = int(schema_args(call).get("dim", 0)) % len(x)
    an.pin(x[d], f"tensor_split at node '{call.node.name}'")
    return split(an, call)


@aten_rule("flip", "roll")
def flip(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    dims = schema_args(call).get("dims")
    pin_dims(an, x, range(len(x)) if not dims else dims, "reordered along this dim")
    return x


aten_rule("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
          "replication_pad1d", "replication_pad2d", "replication_pad3d", "circular_pad2d")(pad)


@aten_rule("pixel_shuffle", "pixel_unshuffle")
def pixel_shuffle(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    r = int(call.args[1])
    shape = call.out_shape
    lead = len(x) - 3
    out = list(x[:lead]) + [an.new_space(s, f"{call.node.name}[{k}]") for k, s in enumerate(shape[lead:], lead)]
    for s in out[lead + 1 :] + list(x[lead + 1 :]):
        an.pin(s, f"spatial dim at node '{call.node.name}'")
    f1 = pin_new(an, an.new_space(r, f"{call.node.name}.r1"), "pixel shuffle factor")
    f2 = pin_new(an, an.new_space(r, f"{call.node.name}.r2"), "pixel shuffle factor")
    if call.node.target is aten.pixel_shuffle.default:
        an.product(x[lead], [out[lead], f1, f2])
    else:
        an.product(out[lead], [x[lead], f1, f2])
    return TensorDims(out)


@aten_rule("channel_shuffle", "native_channel_shuffle")
def channel_shuffle(an: Analyzer, call: Call) -> object:
    """view(B, g, C/g, ...).transpose(1, 2): channel c' of every group moves together."""
    x = call.args[0]
    g = int(call.args[1])
    groups = pin_new(an, an.new_space(g, f"{call.node.name}.groups"), "channel shuffle group count")
    per = an.new_space(x[1].size // g, f"{call.node.name}.per_group")
    an.product(x[1], [groups, per])
    out_ch = an.new_space(x[1].size, f"{call.node.name}[1]")
    an.product(out_ch, [per, groups])
    return TensorDims([x[0], out_ch, *x[2:]])


# ---------------------------------------------------------------------------
# spatial ops
# ---------------------------------------------------------------------------


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
# values without channels: creation, sizes, assertions
# ---------------------------------------------------------------------------


@aten_rule("arange", "arange.start", "arange.start_step", "zeros", "ones", "full", "empty.memory_format",
           "scalar_tensor", "linspace", "eye", "randn", "rand", "randint", "randint.low", "randperm", "tensor",
           "new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided", "empty_strided", "meshgrid",
           "meshgrid.indexing", "tril", "triu", "tril_indices", "triu_indices")
def creation(an: Analyzer, call: Call) -> object:
    """A tensor made with a given size: its dims are fixed. (``new_*`` read only the dtype and
    device of their first argument, meshgrid/tril/triu build index structure.)"""
    fixed = f"tensor created with a fixed size at node '{call.node.name}'"
    if call.node.target in (aten.tril.default, aten.triu.default):
        x = call.args[0]
        pin_dims(an, x, range(max(0, len(x) - 2), len(x)), "triangular part taken over this dim")
        return x
    for value in list(call.args) + list(call.kwargs.values()):
        if isinstance(value, (SizeRead, ShapeOf)) or (isinstance(value, (list, tuple)) and any(
                isinstance(v, (SizeRead, ShapeOf, TensorDims)) for v in value)):
            an.pin_value(value, f"size used to create a tensor at node '{call.node.name}'")
    out = an.fresh(call.meta, call.node.name)
    an.pin_value(out, fixed)
    return out


@aten_rule("sym_size.int", shape_args=True)
def sym_size(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    return SizeRead(frozenset([x[int(call.args[1]) % len(x)]]))


@aten_rule("sym_numel", "sym_stride.int", "sym_storage_offset", shape_args=True)
def sym_numel(an: Analyzer, call: Call) -> object:
    return SizeRead(frozenset(call.args[0]))


@aten_rule("_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range", "_assert_async",
           "_assert_async.msg")
def assertion(an: Analyzer, call: Call) -> object:
    """A check on sizes: they must not change."""
    an.pin_value((call.args, call.kwargs), f"size checked by an assertion at node '{call.node.name}'")
    return None


def _rewrite_metadata_check(node: fx.Node, ctx: Resize) -> None:
    x = ctx.value(node.args[0])
    if isinstance(x, TensorDims) and any(ctx.changed(s) for s in x):
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("size", "stride")}
        node.args = node.args[:1] + tuple(None if i in (1, 2) else a for i, a in enumerate(node.args[1:], 1))


@aten_rule("_assert_tensor_metadata", shape_args=True, rewrite=_rewrite_metadata_check)
def tensor_metadata_check(an: Analyzer, call: Call) -> object:
    """A dtype/device check: sizes it compares are rewritten with the tensor."""
    return None


@aten_rule("item", "_local_scalar_dense", "tolist")
def item(an: Analyzer, call: Call) -> object:
    """A tensor's value read into Python: every element of it matters."""
    an.pin_value(call.args[0], f"tensor value read into Python at node '{call.node.name}'")
    return None


def _scalar(an: Analyzer, call: Call) -> object:
    """Arithmetic on Python numbers (sizes read from tensors stay size reads)."""
    return scalar_of(call.args, call.kwargs)


_SYM_FUNCTIONS = [getattr(torch, n) for n in ("sym_min", "sym_max", "sym_float", "sym_int", "sym_not", "sym_ite",
                                              "sym_sqrt", "sym_sum") if hasattr(torch, n)]
function_rule(*_SYM_FUNCTIONS, operator.truth, operator.not_, math.trunc, shape_args=True)(_scalar)
