"""Helpers shared by the rules of several op families: the rule of an op without one
(:func:`unknown`), pins, argument readers (:func:`schema_args` for ATen operators), a
contraction (:func:`contract`), argument setters for size rewrites, and meta tensors."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..spaces import Analyzer, SizeRead, Space, TensorDims, iter_spaces
from .registry import Call, Resize, Rewrite

__all__ = [
    "broadcast_dims",
    "contract",
    "describe",
    "dim_index",
    "dims_arg",
    "is_multi",
    "is_parameter_space",
    "meta_like",
    "check_numel",
    "pin_dims",
    "pin_new",
    "rewrite_groups",
    "scalar_of",
    "schema_args",
    "set_arg",
    "unknown",
]


def dim_index(d: int, ndim: int) -> int:
    """``d`` counted from the front of ``ndim`` dims."""
    return d + ndim if d < 0 else d


def dims_arg(value, ndim: int) -> list[int] | None:
    """A ``dim`` argument (an int, a sequence, or None for none given) as dims counted from the
    front."""
    if value is None:
        return None
    if isinstance(value, int):
        return [dim_index(value, ndim)]
    return [dim_index(int(d), ndim) for d in value]


def is_multi(meta: object) -> bool:
    """Does the node return several tensors (TensorMetadata is itself a NamedTuple)?"""
    return isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata)


def describe(node: fx.Node, module: nn.Module | None) -> str:
    """How a node calls its op, for reasons (``module Conv2d 'conv'``)."""
    if node.op == "call_module":
        return f"module {type(module).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = node.target
    return f"function {getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', target)}"


def unknown(an: Analyzer, call: Call, reason: str | None = None) -> object:
    """No rule: everything this op touches keeps all its channels."""
    reason = reason or f"unknown operator {describe(call.node, call.module)} at node '{call.node.name}'"
    an.pin_value((call.args, call.kwargs), reason)
    out = an.fresh(call.meta, call.node.name)
    an.pin_value(out, reason)
    if out is None and call.meta is None:
        return scalar_of(call.args, call.kwargs)
    return out


def scalar_of(args, kwargs) -> object:
    """The Python number computed from sizes among ``args`` and ``kwargs`` (None without any)."""
    spaces = frozenset(iter_spaces((args, kwargs)))
    return SizeRead(spaces) if spaces else None


def pin_new(an: Analyzer, space: Space, what: str) -> Space:
    """``space``, pinned because of ``what`` at the current node."""
    an.pin(space, f"{what} at node '{an.current.name}'")
    return space


def pin_dims(an: Analyzer, x: TensorDims, dims, what: str) -> None:
    """Pin dims ``dims`` of ``x`` because of ``what`` at the current node."""
    for d in dims:
        an.pin(x[dim_index(d, len(x))], f"{what} at node '{an.current.name}'")


def broadcast_dims(an: Analyzer, call: Call, operands, shape: tuple[int, ...], skip: int = 0) -> list[Space]:
    """The dims of ``shape``, an output broadcast from ``operands`` (aligned at their last dims),
    except its last ``skip`` dims: a dim where operands have one of its size is theirs (those are
    one channel space); any other is a new pinned dim."""
    out = []
    for pos in range(skip + 1, len(shape) + 1):
        size = shape[-pos]
        cands = [t[-pos] for t in operands if len(t) >= pos and t[-pos].size == size]
        if cands:
            for other in cands[1:]:
                an.same(cands[0], other)
            out.append(cands[0])
        else:
            out.append(pin_new(an, an.new_space(size, f"{call.node.name}[{len(shape) - pos}]"), "broadcast dim"))
    return out[::-1]


def is_parameter_space(an: Analyzer, space: Space) -> bool:
    """Is ``space`` a dim of a parameter, buffer or constant of the model?"""
    return space.id in an.param_space_ids


def contract(an: Analyzer, call: Call, a: Space, b: Space) -> None:
    """``a`` and ``b`` are summed over together (a layer's input channels and its weight's).
    Removing a channel is exact when one side is a model tensor, zero in the masked model;
    between two computed values (a weight computed in the graph) the dim is pinned."""
    if is_parameter_space(an, a) or is_parameter_space(an, b):
        an.same(a, b)
    else:
        an.pin(a, f"contraction between activations at node '{call.node.name}'")
        an.pin(b, f"contraction between activations at node '{call.node.name}'")


def set_arg(node: fx.Node, position: int, name: str, value: object) -> None:
    """Set argument ``name`` (at ``position`` when given positionally) of a call node."""
    if position < len(node.args):
        args = list(node.args)
        args[position] = value
        node.args = tuple(args)
    else:
        node.update_kwarg(name, value)


def rewrite_groups(position: int, name: str = "groups") -> Rewrite:
    """A literal group count (``F.conv2d(..., groups=self.channels)``, ``group_norm``'s
    num_groups) follows the group space its rule noted."""
    def rewrite(node: fx.Node, ctx: Resize) -> None:
        groups = ctx.extra("groups")
        if isinstance(groups, Space) and ctx.changed(groups):
            set_arg(node, position, name, ctx.size(groups))

    return rewrite


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


def meta_like(x: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``x``'s shape, strides and dtype (``torch.empty_like`` takes a Python
    decomposition on meta tensors, twenty times slower)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def check_numel(module: nn.Module, names: tuple[str, ...], count: int, what: str) -> None:
    """Raise ``RuntimeError`` where a tensor attribute of ``module`` named in ``names`` has not
    ``count`` elements (what its kernel would raise on, in words: ``what``)."""
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is not None and tensor.numel() != count:
            raise RuntimeError(f"{type(module).__name__}.{name} has {tensor.numel()} elements, "
                               f"the input {count} {what}")
