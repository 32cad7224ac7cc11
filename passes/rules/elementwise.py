"""Elementwise ops: arithmetic with broadcasting, activations, dropout and casts (fx and
ATen rules, and the meta shapes of the commonest)."""

from __future__ import annotations

import builtins
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..spaces import Analyzer, TensorDims
from .common import broadcast_dims, meta_like, scalar_of, unknown
from .registry import (
    FUNCTION_RULES,
    MODULE_RULES,
    Call,
    aten_rule,
    function_rule,
    function_shape,
    method_rule,
    module_fixer,
    module_rule,
    module_shape,
)

__all__ = ["broadcast", "prelu", "same_shape"]


# ---------------------------------------------------------------------------
# fx rules
# ---------------------------------------------------------------------------


def broadcast(an: Analyzer, call: Call) -> object:
    """Elementwise op with broadcasting: equal-sized aligned dims are one channel space."""
    operands = [a for a in list(call.args) + list(call.kwargs.values()) if isinstance(a, TensorDims)]
    if not isinstance(call.meta, TensorMetadata):
        if operands:
            return unknown(an, call)
        return scalar_of(call.args, call.kwargs)  # arithmetic on sizes
    shape = call.out_shape
    out = broadcast_dims(an, call, operands, shape)
    for t in operands:  # broadcast-expanded size-1 dims of an operand carry no channel
        for pos in range(1, len(t) + 1):
            if t[-pos].size == 1 and pos <= len(shape) and shape[-pos] != 1:
                an.pin(t[-pos], f"broadcast dim at node '{call.node.name}'")
    return TensorDims(out)


def same_shape(an: Analyzer, call: Call) -> object:
    """Unary op keeping the shape of its first tensor argument (activations, dropout, casts)."""
    x = call.args[0] if call.args else next(iter(call.kwargs.values()))
    if isinstance(x, TensorDims) and isinstance(call.meta, TensorMetadata) and tuple(
        s.size for s in x
    ) == call.out_shape:
        return x
    return broadcast(an, call)


_BINARY = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.mod, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.neg,
    operator.pos, operator.abs, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.and_, operator.or_, operator.xor, operator.invert,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.floor_divide, torch.maximum, torch.minimum, torch.where, torch.pow,
    torch.eq, torch.ne, torch.lt, torch.gt, torch.le, torch.ge, torch.logical_and, torch.logical_or,
    torch.addcmul, torch.addcdiv, torch.lerp, torch.fmod, torch.remainder, torch.atan2,
    math.sqrt, math.ceil, math.floor, builtins.int, builtins.float, builtins.round, builtins.max,
    builtins.min, builtins.abs,
]


function_rule(*_BINARY, shape_args=True)(broadcast)
method_rule(
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "pow", "maximum", "minimum",
    "masked_fill", "masked_fill_", "where", "eq", "ne", "lt", "gt", "le", "ge", "addcmul", "lerp",
    "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__", "floor_divide",
    "type_as", "copy_",
)(broadcast)


_UNARY_FUNCS = [
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.neg, torch.abs,
    torch.sqrt, torch.rsqrt, torch.sin, torch.cos, torch.erf, torch.clamp, torch.clip,
    torch.clamp_min, torch.clamp_max, torch.square, torch.reciprocal, torch.sign, torch.floor,
    torch.ceil, torch.round, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
    torch.rand_like, torch.randn_like, torch.nan_to_num, torch.log1p, torch.expm1,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.logsigmoid, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.softsign, F.tanhshrink, F.threshold,
]


function_rule(*_UNARY_FUNCS)(same_shape)
method_rule(
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "neg", "abs", "sqrt",
    "rsqrt", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "contiguous", "clone", "detach",
    "float", "half", "bfloat16", "double", "to", "type", "cpu", "cuda", "requires_grad_",
    "square", "reciprocal", "sign", "floor", "ceil", "round", "exp_", "erf", "sin", "cos",
    "new_zeros_like", "zero_", "fill_", "nan_to_num", "hardtanh_", "gelu", "silu",
)(same_shape)


_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Hardshrink, nn.Softshrink,
)


module_rule(*_ACTIVATION_MODULES)(same_shape)


def prelu(an: Analyzer, call: Call, x: TensorDims, weight: object) -> TensorDims:
    """PReLU: a weight of one slope per channel follows the channel dim (1); a single shared
    slope relates nothing."""
    if isinstance(weight, TensorDims) and weight[0].size > 1:
        an.same(weight[0], x[1])
    return x


@module_rule(nn.PReLU)
def prelu_module(an: Analyzer, call: Call) -> object:
    return prelu(an, call, call.args[0], an.tensor_dims(call.module.weight))


@aten_rule("prelu")
def prelu_op(an: Analyzer, call: Call) -> object:
    return prelu(an, call, call.args[0], call.args[1])


def _register_torchvision() -> None:
    try:
        import importlib

        sd_mod = importlib.import_module("torchvision.ops.stochastic_depth")
    except ImportError:  # torchvision is optional
        return
    FUNCTION_RULES[sd_mod.stochastic_depth] = same_shape
    # the module too: captured as one call (a type with a module rule is a leaf), it reads
    # ``self.training`` when it runs, so a model's eval and training graphs stay one graph
    MODULE_RULES[sd_mod.StochasticDepth] = same_shape


_register_torchvision()


# ---------------------------------------------------------------------------
# ATen rules
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


@aten_rule("native_dropout")
def native_dropout(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    return (x, x)


# ---------------------------------------------------------------------------
# meta shapes
# ---------------------------------------------------------------------------


@module_shape(nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
              nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
def _no_parameters(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An elementwise module without parameters fits any input."""
    return meta_like(x)


@function_shape(F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, torch.relu,
                torch.sigmoid, torch.tanh, "relu", "sigmoid", "tanh", "contiguous", "clone", "detach")
def _same_shape_meta(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Elementwise functions of one tensor (no options): the input's shape and dtype."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    return meta_like(args[0])


@function_shape(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout_meta(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Dropout, whatever its options: the input's shape and dtype."""
    x = args[0] if args else kwargs.get("input")
    return meta_like(x) if isinstance(x, torch.Tensor) else None


def _broadcast_shape(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The broadcast shape of two operands (tensors or Python numbers, no options), None for a
    call that is not that; raises ``RuntimeError`` where the shapes do not broadcast."""
    if kwargs or len(args) != 2 or not all(isinstance(a, (torch.Tensor, bool, int, float)) for a in args):
        return None
    shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    if not shapes:
        return None
    out = []
    for i in range(1, max(len(s) for s in shapes) + 1):
        sizes = {s[-i] for s in shapes if len(s) >= i} - {1}
        if len(sizes) > 1:
            raise RuntimeError(f"shapes {' and '.join(str(list(s)) for s in shapes)} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out[::-1])


@function_shape(operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, "add", "sub", "mul")
def _broadcast_meta(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Elementwise arithmetic of two operands: the broadcast shape, the promoted dtype."""
    shape = _broadcast_shape(args, kwargs)
    return None if shape is None else torch.empty(shape, dtype=torch.result_type(*args), device="meta")


@function_shape(operator.truediv, torch.div, "div")
def _true_divide(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """True division: as :func:`_broadcast_meta`, but integers divide into the default float dtype."""
    shape = _broadcast_shape(args, kwargs)
    if shape is None:
        return None
    dtype = torch.result_type(*args)
    if not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()
    return torch.empty(shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------------------
# module rewrites (attributes after the tensors shrank)
# ---------------------------------------------------------------------------


@module_fixer(nn.PReLU)
def _fix_prelu(new: nn.Module, old: nn.Module) -> None:
    new.num_parameters = new.weight.shape[0]
