"""Run a graph on meta tensors (shapes and dtypes only, no compute), cheaply.

On meta tensors the cost of a graph is the Python meta kernels and decompositions of its
operators, not arithmetic: even an elementwise add costs about a millisecond, and
BatchNorm, LayerNorm and a Linear on a 4-d input decompose into a dozen such references,
which made checking a compact model on meta tensors slower than running it for real.
The commonest operators therefore get their output here without a kernel, from a rule
that raises where the kernel would (sizes or parameters that no longer fit the input):

- :data:`MODULE_SHAPES`, per module type (exactly that type: a subclass may override
  ``forward``), for modules called with one tensor;
- :data:`FUNCTION_SHAPES`, per function or method name, for elementwise operators (the
  output's shape by broadcasting, its dtype by type promotion), ``F.layer_norm`` and
  adaptive average pooling.

Every other node runs its meta kernel.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import has_pytree_io

__all__ = ["FUNCTION_SHAPES", "MODULE_SHAPES", "MetaRules", "MetaRun", "function_shape", "module_shape", "runs_on_meta"]

ModuleShape = Callable[[nn.Module, torch.Tensor], torch.Tensor]
FunctionShape = Callable[[tuple, dict], "torch.Tensor | None"]
MODULE_SHAPES: dict[type, ModuleShape] = {}
FUNCTION_SHAPES: dict[object, FunctionShape] = {}


def _like(x: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``x``'s shape, strides and dtype (``torch.empty_like`` takes a Python
    decomposition on meta tensors, twenty times slower)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def module_shape(*types: type):
    """Register the output rule of modules of exactly ``types``: ``rule(module, x)`` returns a
    meta tensor shaped as the module's output for input ``x``, or raises as its kernel would."""

    def register(fn: ModuleShape) -> ModuleShape:
        for t in types:
            MODULE_SHAPES[t] = fn
        return fn

    return register


def function_shape(*targets: object):
    """Register the output rule of ``targets`` (functions, or method names): ``rule(args,
    kwargs)`` returns a meta tensor shaped as the output, raises as the kernel would, or
    returns None for a call it does not cover (the kernel then runs)."""

    def register(fn: FunctionShape) -> FunctionShape:
        for t in targets:
            FUNCTION_SHAPES[t] = fn
        return fn

    return register


# ---- modules ------------------------------------------------------------------------------


@module_shape(nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
              nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
def _no_parameters(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An elementwise module without parameters fits any input."""
    return _like(x)


def _numel_is(module: nn.Module, names: tuple[str, ...], count: int, what: str) -> None:
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is not None and tensor.numel() != count:
            raise RuntimeError(f"{type(module).__name__}.{name} has {tensor.numel()} elements, "
                               f"the input {count} {what}")


@module_shape(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm: the input's rank, and weight, bias and running statistics one entry per
    channel (dim 1)."""
    module._check_input_dim(x)
    _numel_is(module, ("weight", "bias", "running_mean", "running_var"), x.shape[1], "channels")
    return _like(x)


def _check_layer_norm(x: torch.Tensor, shape: tuple[int, ...], weight: object, bias: object) -> None:
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise RuntimeError(f"layer_norm: normalized_shape {list(shape)} does not end input shape {list(x.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != shape:
            raise RuntimeError(f"layer_norm: {name} has shape {list(tensor.shape)}, normalized_shape {list(shape)}")


@module_shape(nn.LayerNorm)
def _layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm: the input's trailing dims are ``normalized_shape``, and so are weight and bias."""
    _check_layer_norm(x, tuple(module.normalized_shape), module.weight, module.bias)
    return _like(x)


@module_shape(nn.GroupNorm)
def _group_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm: the channels (dim 1) split into ``num_groups``, weight and bias one per channel."""
    channels = x.shape[1] if x.dim() >= 2 else -1
    if channels < 0 or channels % module.num_groups:
        raise RuntimeError(f"GroupNorm: input shape {list(x.shape)} does not split into {module.num_groups} groups")
    _numel_is(module, ("weight", "bias"), channels, "channels")
    return _like(x)


@module_shape(nn.Linear)
def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Linear: the input's last dim is ``weight``'s second, the bias one entry per output
    feature, the dtypes equal; the output's last dim is ``weight``'s first."""
    out_features, in_features = module.weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise RuntimeError(f"Linear: input shape {list(x.shape)} does not end in {in_features} features")
    if x.dtype != module.weight.dtype:
        raise RuntimeError(f"Linear: input dtype {x.dtype}, weight dtype {module.weight.dtype}")
    _numel_is(module, ("bias",), out_features, "output features")
    return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device="meta")


def _adaptive_pool(x: torch.Tensor, output_size: object, dims: int) -> torch.Tensor:
    """The output of an adaptive pooling over the last ``dims`` dims of ``x`` (``output_size``
    an int or a tuple whose None entries keep the input's size)."""
    sizes = (output_size,) * dims if isinstance(output_size, int) else tuple(output_size)
    if len(sizes) != dims or x.dim() not in (dims + 1, dims + 2) or any(s == 0 for s in x.shape[1:]):
        raise RuntimeError(f"adaptive pooling to {output_size} does not fit input shape {list(x.shape)}")
    spatial = x.shape[x.dim() - dims:]
    out = tuple(int(size if want is None else want) for size, want in zip(spatial, sizes))
    return torch.empty((*x.shape[:x.dim() - dims], *out), dtype=x.dtype, device="meta")


_POOL_DIMS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
              F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}


@module_shape(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _adaptive_avg_pool(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """AdaptiveAvgPoolNd: the last N dims become ``output_size`` (None keeps a size)."""
    return _adaptive_pool(x, module.output_size, _POOL_DIMS[type(module)])


# ---- functions and methods --------------------------------------------------------------


@function_shape(F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, torch.relu,
                torch.sigmoid, torch.tanh, "relu", "sigmoid", "tanh", "contiguous", "clone", "detach")
def _same_shape(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Elementwise functions of one tensor (no options): the input's shape and dtype."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    return _like(args[0])


@function_shape(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Dropout, whatever its options: the input's shape and dtype."""
    x = args[0] if args else kwargs.get("input")
    return _like(x) if isinstance(x, torch.Tensor) else None


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
def _broadcast(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Elementwise arithmetic of two operands: the broadcast shape, the promoted dtype."""
    shape = _broadcast_shape(args, kwargs)
    return None if shape is None else torch.empty(shape, dtype=torch.result_type(*args), device="meta")


@function_shape(operator.truediv, torch.div, "div")
def _true_divide(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """True division: as :func:`_broadcast`, but integers divide into the default float dtype."""
    shape = _broadcast_shape(args, kwargs)
    if shape is None:
        return None
    dtype = torch.result_type(*args)
    if not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()
    return torch.empty(shape, dtype=dtype, device="meta")


@function_shape(F.layer_norm)
def _layer_norm_function(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)``: as the LayerNorm module."""
    bound = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
    x, shape = bound.get("input"), bound.get("normalized_shape")
    if not isinstance(x, torch.Tensor) or not isinstance(shape, (tuple, list, torch.Size)):
        return None
    _check_layer_norm(x, tuple(shape), bound.get("weight"), bound.get("bias"))
    return _like(x)


def _adaptive_avg_pool_function(function: Callable) -> FunctionShape:
    def rule(args: tuple, kwargs: dict) -> torch.Tensor | None:
        """``F.adaptive_avg_poolNd(x, output_size)``: as the module."""
        if kwargs or len(args) != 2 or not isinstance(args[0], torch.Tensor) or \
                not isinstance(args[1], (int, tuple, list)):
            return None
        return _adaptive_pool(args[0], args[1], _POOL_DIMS[function])

    return rule


for _function in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
    function_shape(_function)(_adaptive_avg_pool_function(_function))


class MetaRules:
    """Mixed into an ``fx.Interpreter`` (before it) that runs on meta tensors: takes the outputs
    of the modules in :data:`MODULE_SHAPES` (called with one tensor) and of the calls in
    :data:`FUNCTION_SHAPES` from their rules instead of their kernels."""

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        rule = MODULE_SHAPES.get(type(module))
        if rule is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return super().call_module(target, args, kwargs)
        return rule(module, args[0])

    def call_function(self, target, args, kwargs):
        rule = FUNCTION_SHAPES.get(target)
        out = None if rule is None else rule(args, kwargs)
        return super().call_function(target, args, kwargs) if out is None else out

    def call_method(self, target, args, kwargs):
        rule = FUNCTION_SHAPES.get(target)
        out = None if rule is None else rule(args, kwargs)
        return super().call_method(target, args, kwargs) if out is None else out


class MetaRun(MetaRules, fx.Interpreter):
    """Runs a graph on meta-tensor inputs with :class:`MetaRules`."""


def runs_on_meta(graph: fx.GraphModule, inputs: tuple) -> bool:
    """Does ``graph`` run on meta tensors (shapes and dtypes only)? Its parameters, buffers and
    tensor inputs are replaced by meta tensors of the same shapes for the run (``graph`` is not
    changed). What channel removal can break (a size, group count or split that no longer
    fits) fails there as it does for real; an operator without a meta kernel, or code that
    reads values, also gives False (the caller then runs the graph for real)."""
    from torch.nn.utils.stateless import _reparametrize_module

    named = list(graph.named_parameters(remove_duplicate=False)) + list(graph.named_buffers(remove_duplicate=False))
    state = {name: torch.empty_like(t, device="meta") for name, t in named}
    meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    try:
        with _reparametrize_module(graph, state):
            if has_pytree_io(graph.graph):
                graph(*meta_inputs)  # its forward flattens the inputs into the placeholders
            else:
                MetaRun(graph).run(*meta_inputs)
    except Exception:  # noqa: BLE001 - any failure here is settled by the real run
        return False
    return True
