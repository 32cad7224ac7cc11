"""Per-operator channel rules: how channels flow through each op kind.

One rule per op kind, registered in one of three tables keyed by module type,
function, or method name. A rule receives the :class:`Analyzer`, the fx node and
the analysis values of its arguments, relates the spaces of inputs, outputs and
parameters, and returns the value of the node. An operator without a rule pins
every dimension it touches (its channels become unprunable, with a reason naming
the node): never silently wrong.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .analysis import Analyzer, ShapeOf, SizeRead, Space, TensorDims, iter_spaces

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "REWRITES", "SHAPE_CONSUMERS", "apply_rules"]


@dataclass
class Call:
    """What a rule sees of one node: argument values and the output's shape meta."""

    node: fx.Node
    args: tuple
    kwargs: dict
    meta: object
    module: nn.Module | None = None

    def arg(self, i: int, name: str, default: object = None) -> object:
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    @property
    def out_shape(self) -> tuple[int, ...]:
        assert isinstance(self.meta, TensorMetadata), f"node '{self.node.name}' is not a tensor"
        return tuple(self.meta.shape)


Rule = Callable[[Analyzer, Call], object]
MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[object, Rule] = {}  # call_function targets: torch, F, operator, torch.ops.aten...
METHOD_RULES: dict[str, Rule] = {}
# ops whose size-valued arguments the export pass rewrites: reading a size for them is safe
SHAPE_CONSUMERS: set[object] = set()


class Resize(Protocol):
    """What a size rewrite sees (built by :func:`spruce.passes.export.remove_channels`)."""

    out: object  # the analysis value of the node in the original graph

    def size(self, space: Space) -> int: ...  # the space's size once channels are removed
    def changed(self, space: Space) -> bool: ...
    def value(self, arg: object) -> object: ...  # the analysis value of an argument node
    def stale(self, arg: object) -> bool: ...  # a size read whose spaces change
    def extra(self, name: str) -> object: ...  # what the rule noted (Analyzer.note)


Rewrite = Callable[[fx.Node, Resize], None]
# how an op's size-carrying arguments (view sizes, split sizes, group counts) change when
# channels are removed; keyed like the rule tables (function / method name / aten op)
REWRITES: dict[object, Rewrite] = {}


def _registrar(table: dict, keys: tuple, shape_args: bool = False, rewrite: Rewrite | None = None):
    """A decorator registering a rule in ``table`` under every key (a module type, function,
    method name), noting keys whose size arguments are read (``shape_args``) and their size
    ``rewrite``."""
    def register(rule: Rule) -> Rule:
        for key in keys:
            table[key] = rule
            if shape_args:
                SHAPE_CONSUMERS.add(key)
            if rewrite is not None:
                REWRITES[key] = rewrite
        return rule

    return register


def module_rule(*types: type):
    return _registrar(MODULE_RULES, types)


def function_rule(*fns: object, shape_args: bool = False, rewrite: Rewrite | None = None):
    return _registrar(FUNCTION_RULES, fns, shape_args, rewrite)


def method_rule(*names: str, shape_args: bool = False, rewrite: Rewrite | None = None):
    return _registrar(METHOD_RULES, names, shape_args, rewrite)


# ---------------------------------------------------------------------------
# size rewrites shared by fx and aten rules
# ---------------------------------------------------------------------------


def rewrite_size_list(sizes: list, out: object, ctx: Resize) -> list | None:
    """New sizes for a view/reshape/expand whose output dims are ``out``; None if unchanged.
    A literal -1 stays; a size read from a tensor whose dim changes becomes the new literal."""
    if not isinstance(out, TensorDims) or len(out) != len(sizes):
        return None
    changed = False
    new = []
    for arg, space in zip(sizes, out):
        if isinstance(arg, int) and arg == -1:
            new.append(arg)
        elif ctx.changed(space) or ctx.stale(arg):
            new.append(ctx.size(space))
            changed = True
        else:
            new.append(arg)
    return new if changed else None


def rewrite_fx_shape(node: fx.Node, ctx: Resize) -> None:
    """view/reshape/expand methods and torch.reshape in an fx graph."""
    if node.op == "call_method":
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            new = rewrite_size_list(list(rest[0]), ctx.out, ctx)
            if new is not None:
                node.args = (node.args[0], tuple(new))
        elif "size" in node.kwargs or "shape" in node.kwargs:
            key = "size" if "size" in node.kwargs else "shape"
            new = rewrite_size_list(list(node.kwargs[key]), ctx.out, ctx)
            if new is not None:
                node.update_kwarg(key, tuple(new))
        else:
            new = rewrite_size_list(rest, ctx.out, ctx)
            if new is not None:
                node.args = (node.args[0], *new)
    elif node.op == "call_function":
        shape = node.args[1] if len(node.args) > 1 else node.kwargs["shape"]
        new = rewrite_size_list(list(shape), ctx.out, ctx)
        if new is not None:
            node.args = (node.args[0], tuple(new))
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "shape"}


def split_sizes(x: object, outs: object, ctx: Resize) -> tuple[int, list[int]] | None:
    """(dim, new piece sizes) of a split whose input is ``x`` and pieces ``outs``; None if
    no piece changes size."""
    if not isinstance(x, TensorDims) or not isinstance(outs, tuple) or not outs:
        return None
    dims = [d for d in range(len(x)) if isinstance(outs[0], TensorDims) and outs[0][d] is not x[d]]
    if not dims:
        return None
    d = dims[0]
    if not any(ctx.changed(o[d]) for o in outs):
        return None
    return d, [ctx.size(o[d]) for o in outs]


def rewrite_fx_split(node: fx.Node, ctx: Resize) -> None:
    """split/chunk in an fx graph become a split with the new piece sizes."""
    x = ctx.value(node.args[0])
    found = split_sizes(x, ctx.out, ctx)
    if found is None:
        return
    d, sizes = found
    node.args = (node.args[0], sizes, d)
    node.kwargs = {}
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split


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


def _tensors(values) -> list[TensorDims]:
    out = []
    for v in values:
        if isinstance(v, TensorDims):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(_tensors(v))
    return out


def _is_multi(meta: object) -> bool:
    """Does the node return several tensors (TensorMetadata is itself a NamedTuple)?"""
    return isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _desc(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module":
        return f"module {type(module).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = node.target
    return f"function {getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', target)}"


# ---------------------------------------------------------------------------
# generic rules
# ---------------------------------------------------------------------------


def unknown(an: Analyzer, call: Call, reason: str | None = None) -> object:
    """No rule: everything this op touches keeps all its channels."""
    reason = reason or f"unknown operator {_desc(call.node, call.module)} at node '{call.node.name}'"
    an.pin_value((call.args, call.kwargs), reason)
    out = an.fresh(call.meta, call.node.name)
    an.pin_value(out, reason)
    if out is None and call.meta is None:
        return scalar_of(call.args, call.kwargs)
    return out


def scalar_of(args, kwargs) -> object:
    spaces = frozenset(iter_spaces((args, kwargs)))
    return SizeRead(spaces) if spaces else None


def pin_new(an: Analyzer, space: Space, what: str) -> Space:
    an.pin(space, f"{what} at node '{an.current.name}'")
    return space


def broadcast(an: Analyzer, call: Call) -> object:
    """Elementwise op with broadcasting: equal-sized aligned dims are one channel space."""
    operands = [a for a in list(call.args) + list(call.kwargs.values()) if isinstance(a, TensorDims)]
    if not isinstance(call.meta, TensorMetadata):
        if operands:
            return unknown(an, call)
        return scalar_of(call.args, call.kwargs)  # arithmetic on sizes
    shape = call.out_shape
    out = []
    for pos in range(1, len(shape) + 1):
        size = shape[-pos]
        cands = [t[-pos] for t in operands if len(t) >= pos and t[-pos].size == size]
        if cands:
            for other in cands[1:]:
                an.same(cands[0], other)
            out.append(cands[0])
        else:
            out.append(pin_new(an, an.new_space(size, f"{call.node.name}[{len(shape) - pos}]"), "broadcast dim"))
    for t in operands:  # broadcast-expanded size-1 dims of an operand carry no channel
        for pos in range(1, len(t) + 1):
            if t[-pos].size == 1 and pos <= len(shape) and shape[-pos] != 1:
                an.pin(t[-pos], f"broadcast dim at node '{call.node.name}'")
    return TensorDims(reversed(out))


def same_shape(an: Analyzer, call: Call) -> object:
    """Unary op keeping the shape of its first tensor argument (activations, dropout, casts)."""
    x = call.args[0] if call.args else next(iter(call.kwargs.values()))
    if isinstance(x, TensorDims) and isinstance(call.meta, TensorMetadata) and tuple(
        s.size for s in x
    ) == call.out_shape:
        return x
    return broadcast(an, call)


def pin_dims(an: Analyzer, x: TensorDims, dims, what: str) -> None:
    for d in dims:
        an.pin(x[_dim(d, len(x))], f"{what} at node '{an.current.name}'")


def _dims_arg(value, ndim: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [_dim(value, ndim)]
    return [_dim(int(d), ndim) for d in value]


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
    dims = _dims_arg(call.arg(1, dim_name), len(x))
    weight = _hand_written_rms_norm(an, call, x, dims) if not isinstance(call.arg(1, dim_name), TensorDims) else None
    if weight is not None:
        w = an.tensor_dims(weight)[0]
        an.same(w, x[-1])
        an.norm_spaces.add(w.id)
        an.hand_norm_spaces.add(w.id)
        return TensorDims(list(x[:-1]) + [pin_new(an, an.new_space(1, f"{call.node.name}[{len(x) - 1}]"),
                                                  "reduced dim")])
    out_meta = call.meta[0] if _is_multi(call.meta) else call.meta
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
    if _is_multi(call.meta):  # (values, indices)
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


# ---------------------------------------------------------------------------
# reshapes
# ---------------------------------------------------------------------------


def reshape_to(an: Analyzer, x: TensorDims, shape: tuple[int, ...], label: str) -> TensorDims:
    """Spaces of ``x`` viewed as ``shape`` (row-major): aligned blocks become products."""
    in_sizes = [s.size for s in x]
    out: list[Space | None] = [None] * len(shape)
    i = j = 0
    while i < len(in_sizes) or j < len(shape):
        if i < len(in_sizes) and in_sizes[i] == 1:
            an.pin(x[i], f"size-1 dim at {an.where()}")  # dropped or moved: its one element is all of x
            i += 1
            continue
        if j < len(shape) and shape[j] == 1:
            out[j] = pin_new(an, an.new_space(1, f"{label}[{j}]"), "size-1 dim")
            j += 1
            continue
        if i >= len(in_sizes) or j >= len(shape):
            raise AssertionError(f"{an.where()}: reshape {in_sizes} -> {shape} does not align")
        i0, j0 = i, j
        pi, pj = in_sizes[i], shape[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                pi *= in_sizes[i]
                i += 1
            else:
                pj *= shape[j]
                j += 1
        ins = [x[k] for k in range(i0, i) if in_sizes[k] != 1]
        outs = list(range(j0, j))
        if len(ins) == 1 and len(outs) == 1:
            out[j0] = ins[0]
        elif len(ins) == 1:
            for k in outs:
                out[k] = an.new_space(shape[k], f"{label}[{k}]")
            an.product(ins[0], [out[k] for k in outs])
        elif len(outs) == 1:
            out[j0] = an.new_space(shape[j0], f"{label}[{j0}]")
            an.product(out[j0], ins)
        else:
            for s in ins:
                an.pin(s, f"reshape without a common factorisation at {an.where()}")
            for k in outs:
                out[k] = pin_new(an, an.new_space(shape[k], f"{label}[{k}]"), "reshape without a common factorisation")
        for k in outs:
            if out[k] is None:  # size-1 dims inside a block
                out[k] = pin_new(an, an.new_space(shape[k], f"{label}[{k}]"), "size-1 dim")
    return TensorDims(out)


# (unflatten has no rule: its size argument is not rewritten, so it pins what it touches)
@function_rule(torch.flatten, torch.squeeze, torch.unsqueeze, shape_args=True)
@function_rule(torch.reshape, shape_args=True, rewrite=rewrite_fx_shape)
@method_rule("flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", shape_args=True)
@method_rule("view", "reshape", shape_args=True, rewrite=rewrite_fx_shape)
def reshape(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    if not isinstance(x, TensorDims) or not isinstance(call.meta, TensorMetadata):
        return unknown(an, call)
    if call.node.target in ("view", "reshape") and len(call.args) == 2 and isinstance(call.args[1], torch.dtype):
        return unknown(an, call)
    if call.node.target in ("view_as", "reshape_as"):
        out = reshape_to(an, x, call.out_shape, call.node.name)
        for a, b in zip(out, call.args[1]):
            an.same(a, b)  # the pruned model's `other` must keep matching sizes
        return out
    return reshape_to(an, x, call.out_shape, call.node.name)


@module_rule(nn.Flatten, nn.Unflatten)
def reshape_module(an: Analyzer, call: Call) -> object:
    return reshape_to(an, call.args[0], call.out_shape, call.node.name)


@function_rule(torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.t, torch.movedim, torch.moveaxis)
@method_rule("permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis")
def permute(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    n = len(x)
    name = call.node.target if isinstance(call.node.target, str) else call.node.target.__name__
    rest = list(call.args[1:])
    if name == "permute":
        order = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        order = order or call.kwargs.get("dims")
        order = [_dim(int(d), n) for d in order]
    elif name in ("transpose", "swapaxes", "swapdims"):
        a = _dim(int(call.arg(1, "dim0")), n)
        b = _dim(int(call.arg(2, "dim1")), n)
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
    elif name == "t":
        order = list(reversed(range(n)))
    else:  # movedim
        src = _dims_arg(call.arg(1, "source"), n)
        dst = _dims_arg(call.arg(2, "destination"), n)
        order = [-1] * n
        for s, d in zip(src, dst):
            order[d] = s
        rest_src = iter(d for d in range(n) if d not in src)
        order = [o if o >= 0 else next(rest_src) for o in order]
    return TensorDims(x[d] for d in order)


@function_rule(torch.cat, torch.concat, torch.concatenate)
def cat(an: Analyzer, call: Call) -> object:
    tensors = [t for t in call.arg(0, "tensors") if isinstance(t, TensorDims)]
    shape = call.out_shape
    d = _dim(int(call.arg(1, "dim", 0)), len(shape))
    tensors = [t for t in tensors if len(t) == len(shape)]  # torch.cat skips empty 1-D tensors
    out_space = an.new_space(shape[d], f"{call.node.name}[{d}]")
    offset = 0
    for t in tensors:
        an.slice_same(out_space, offset, t[d], 0, t[d].size)
        offset += t[d].size
    out = []
    for k in range(len(shape)):
        if k == d:
            out.append(out_space)
            continue
        for t in tensors[1:]:
            an.same(tensors[0][k], t[k])
        out.append(tensors[0][k])
    return TensorDims(out)


@function_rule(torch.stack)
def stack(an: Analyzer, call: Call) -> object:
    tensors = [t for t in call.arg(0, "tensors") if isinstance(t, TensorDims)]
    shape = call.out_shape
    d = _dim(int(call.arg(1, "dim", 0)), len(shape))
    for t in tensors[1:]:
        for a, b in zip(tensors[0], t):
            an.same(a, b)
    dims = list(tensors[0])
    dims.insert(d, pin_new(an, an.new_space(shape[d], f"{call.node.name}[{d}]"), "stacked dim"))
    return TensorDims(dims)


@function_rule(torch.tensor_split, torch.unbind, shape_args=True)
@function_rule(torch.split, torch.chunk, shape_args=True, rewrite=rewrite_fx_split)
@method_rule("tensor_split", "unbind", shape_args=True)
@method_rule("split", "chunk", "split_with_sizes", shape_args=True, rewrite=rewrite_fx_split)
def split(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    name = call.node.target if isinstance(call.node.target, str) else call.node.target.__name__
    default_dim = 0
    d = call.arg(2, "dim", default_dim) if name != "unbind" else call.arg(1, "dim", 0)
    d = _dim(int(d), len(x))
    parts = list(call.meta)
    if name == "unbind":
        an.pin(x[d], f"unbind over this dim at node '{call.node.name}'")
        return tuple(TensorDims(s for k, s in enumerate(x) if k != d) for _ in parts)
    if name == "tensor_split":
        an.pin(x[d], f"tensor_split at node '{call.node.name}'")
    return split_pieces(an, call, x, d, parts)


def split_pieces(an: Analyzer, call: Call, x: TensorDims, d: int, parts: list) -> tuple[TensorDims, ...]:
    """The dims of the pieces ``parts`` (their metadata, in order) that split ``x`` along
    ``d``: each piece's dim ``d`` is the next consecutive sub-range of ``x[d]``; an empty piece
    is pinned."""
    outs = []
    offset = 0
    for i, part in enumerate(parts):
        size = tuple(part.shape)[d]
        piece = an.new_space(size, f"{call.node.name}.{i}[{d}]")
        an.slice_same(x[d], offset, piece, 0, size)
        if size == 0:
            an.pin(piece, "empty split")
        offset += size
        outs.append(TensorDims(piece if k == d else s for k, s in enumerate(x)))
    return tuple(outs)


@function_rule(operator.getitem, shape_args=True)
def getitem(an: Analyzer, call: Call) -> object:
    obj, idx = call.args[0], call.args[1]
    if isinstance(obj, ShapeOf):
        if isinstance(idx, int):
            return SizeRead(frozenset([obj.dims[idx]]))
        if isinstance(idx, slice):
            return ShapeOf(TensorDims(obj.dims[idx]))
        return SizeRead(frozenset(obj.dims))
    if isinstance(obj, TensorDims):
        return index_tensor(an, call, obj, idx)
    if isinstance(obj, (tuple, list)):
        if isinstance(idx, (int, slice)):
            return obj[idx]
        return unknown(an, call)
    if isinstance(obj, dict):
        return obj.get(idx)
    if isinstance(obj, SizeRead):
        return obj
    if obj is None:
        return an.fresh(call.meta, call.node.name)
    return unknown(an, call)


def _full_slice(sl: slice, size: int) -> bool:
    return (
        sl.step in (None, 1)
        and sl.start in (None, 0)
        and (sl.stop is None or (isinstance(sl.stop, int) and sl.stop >= size))
    )


def index_tensor(an: Analyzer, call: Call, x: TensorDims, idx) -> object:
    """Basic indexing: full slices keep channels; partial slices and integers pin."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(it, (TensorDims, list, SizeRead)) or (isinstance(it, slice) and any(
        isinstance(v, (TensorDims, SizeRead)) for v in (it.start, it.stop, it.step))) for it in items):
        return unknown(an, call)  # advanced indexing or bounds computed from sizes
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (len(x) - n_real) + items[k + 1 :]
    items += [slice(None)] * (len(x) - sum(1 for it in items if it is not None))
    shape = call.out_shape
    out, d = [], 0
    for it in items:
        if it is None:
            out.append(pin_new(an, an.new_space(1, f"{call.node.name}[{len(out)}]"), "new axis"))
        elif isinstance(it, int):
            an.pin(x[d], f"integer index at node '{call.node.name}'")
            d += 1
        elif isinstance(it, slice):
            if _full_slice(it, x[d].size):
                out.append(x[d])
            else:
                an.pin(x[d], f"partial slice at node '{call.node.name}'")
                k = len(out)
                out.append(pin_new(an, an.new_space(shape[k], f"{call.node.name}[{k}]"), "partial slice"))
            d += 1
        else:
            return unknown(an, call)
    return TensorDims(out)


@function_rule(builtins.getattr)
def get_attribute(an: Analyzer, call: Call) -> object:
    obj, name = call.args[0], call.args[1]
    if isinstance(obj, TensorDims):
        if name == "shape":
            return ShapeOf(obj)
        if name in ("T", "mT"):
            return TensorDims(reversed(obj)) if name == "T" else TensorDims(list(obj[:-2]) + [obj[-1], obj[-2]])
        if name in ("data",):
            return obj
        if name in ("dtype", "device", "is_cuda", "requires_grad", "layout"):
            return None
        if name == "ndim":
            return None
    return unknown(an, call)


@method_rule("size")
def size(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = call.arg(1, "dim")
    if d is None:
        return ShapeOf(x)
    return SizeRead(frozenset([x[_dim(int(d), len(x))]]))


@method_rule("dim", "ndimension", "is_contiguous", "is_floating_point", "get_device")
def no_channels(an: Analyzer, call: Call) -> object:
    return None


@method_rule("numel", "nelement")
def numel(an: Analyzer, call: Call) -> object:
    return SizeRead(frozenset(call.args[0]))


@function_rule(torch.numel)
def numel_fn(an: Analyzer, call: Call) -> object:
    return SizeRead(frozenset(call.args[0]))


@function_rule(torch._assert)
def assertion(an: Analyzer, call: Call) -> object:
    # a size compared in an assertion must not change
    an.pin_value(call.args[0], f"size checked by an assertion at node '{call.node.name}'")
    return None


@method_rule("expand", shape_args=True, rewrite=rewrite_fx_shape)
def expand(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    shape = call.out_shape
    out = []
    for pos in range(1, len(shape) + 1):
        if pos <= len(x) and x[-pos].size == shape[-pos]:
            out.append(x[-pos])
        else:
            if pos <= len(x):
                an.pin(x[-pos], f"expanded dim at node '{call.node.name}'")
            out.append(an.copies(shape[-pos], f"{call.node.name}[{len(shape) - pos}]"))
    return TensorDims(reversed(out))


@method_rule("expand_as")
def expand_as(an: Analyzer, call: Call) -> object:
    x, other = call.args[0], call.args[1]
    out = list(other)
    for pos in range(1, len(x) + 1):
        if x[-pos].size == other[-pos].size:
            an.same(x[-pos], other[-pos])
        else:
            an.pin(x[-pos], f"expanded dim at node '{call.node.name}'")
    return TensorDims(out)


@method_rule("repeat")
def repeat(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    reps = call.args[1] if len(call.args) == 2 and isinstance(call.args[1], (tuple, list)) else call.args[1:]
    if any(not isinstance(r, int) for r in reps):
        return unknown(an, call)
    shape = call.out_shape
    out = []
    lead = len(shape) - len(x)
    for k in range(len(shape)):
        if k < lead:
            out.append(pin_new(an, an.new_space(shape[k], f"{call.node.name}[{k}]"), "repeated dim"))
            continue
        src = x[k - lead]
        if reps[k] == 1:
            out.append(src)
        else:
            tiled = an.new_space(shape[k], f"{call.node.name}[{k}]")
            copies = pin_new(an, an.new_space(reps[k], f"{call.node.name}.repeats[{k}]"), "repeat count")
            an.product(tiled, [copies, src])
            out.append(tiled)
    return TensorDims(out)


# ---------------------------------------------------------------------------
# elementwise, activations, normalisation
# ---------------------------------------------------------------------------

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


@module_rule(nn.PReLU)
def prelu(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    w = an.tensor_dims(call.module.weight)
    if w[0].size > 1:
        an.same(w[0], x[1])
    return x


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
# spatial ops: pooling, interpolation, padding
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
    if call.kwargs.get("return_indices") or _is_multi(call.meta):
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
    pin_dims(an, x, range(len(x)) if dims is None else _dims_arg(dims, len(x)), f"{name} along this dim")
    return x


@module_rule(nn.ChannelShuffle)
def channel_shuffle_module(an: Analyzer, call: Call) -> object:
    """x.view(B, g, C/g, ...).transpose(1, 2): channel c' of every group moves together."""
    x = call.args[0]
    g = call.module.groups
    groups = pin_new(an, an.new_space(g, f"{call.node.name}.groups"), "channel shuffle group count")
    per = an.new_space(x[1].size // g, f"{call.node.name}.per_group")
    an.product(x[1], [groups, per])
    out_ch = an.new_space(x[1].size, f"{call.node.name}[1]")
    an.product(out_ch, [per, groups])
    return TensorDims([x[0], out_ch, *x[2:]])


@module_rule(nn.PixelShuffle, nn.PixelUnshuffle)
def pixel_shuffle(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    shape = call.out_shape
    out = [x[0]] + [an.new_space(s, f"{call.node.name}[{k}]") for k, s in enumerate(shape[1:], 1)]
    for s in out[2:]:
        an.pin(s, f"spatial dim at node '{call.node.name}'")
    for s in x[2:]:
        an.pin(s, f"spatial dim at node '{call.node.name}'")
    if isinstance(call.module, nn.PixelShuffle):
        r = call.module.upscale_factor
        f1 = pin_new(an, an.new_space(r, "r1"), "pixel shuffle factor")
        f2 = pin_new(an, an.new_space(r, "r2"), "pixel shuffle factor")
        an.product(x[1], [out[1], f1, f2])
    else:
        r = call.module.downscale_factor
        f1 = pin_new(an, an.new_space(r, "r1"), "pixel shuffle factor")
        f2 = pin_new(an, an.new_space(r, "r2"), "pixel shuffle factor")
        an.product(out[1], [x[1], f1, f2])
    return TensorDims(out)


# ---------------------------------------------------------------------------
# layers with parameters
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


def contract(an: Analyzer, call: Call, a: Space, b: Space) -> None:
    """``a`` and ``b`` are summed over together (a layer's input channels and its weight's).
    Removing a channel is exact when one side is a model tensor, zero in the masked model;
    between two computed values (a weight computed in the graph) the dim is pinned."""
    if _is_parameter_space(an, a) or _is_parameter_space(an, b):
        an.same(a, b)
    else:
        an.pin(a, f"contraction between activations at node '{call.node.name}'")
        an.pin(b, f"contraction between activations at node '{call.node.name}'")


def linear(an: Analyzer, call: Call, x: TensorDims, w: TensorDims, b: TensorDims | None) -> TensorDims:
    contract(an, call, x[-1], w[1])
    out_f = an.new_space(w[0].size, f"{call.node.name}[-1]")
    an.same(out_f, w[0])
    if b is not None:
        an.same(b[0], out_f)
    return TensorDims(list(x[:-1]) + [out_f])


@module_rule(nn.Linear, nn.LazyLinear)
def linear_module(an: Analyzer, call: Call) -> object:
    m = call.module
    b = an.tensor_dims(m.bias) if m.bias is not None else None
    return linear(an, call, call.args[0], an.tensor_dims(m.weight), b)


@function_rule(F.linear)
def linear_fn(an: Analyzer, call: Call) -> object:
    w, b = call.arg(1, "weight"), call.arg(2, "bias")
    if not isinstance(w, TensorDims) or len(w) != 2:
        return unknown(an, call)
    return linear(an, call, call.args[0], w, b if isinstance(b, TensorDims) else None)


@module_rule(nn.Embedding)
def embedding_module(an: Analyzer, call: Call) -> object:
    ids = call.args[0]
    w = an.tensor_dims(call.module.weight)
    an.pin(w[0], f"embedding vocabulary at node '{call.node.name}'")
    out_d = an.new_space(w[1].size, f"{call.node.name}[-1]")
    an.same(out_d, w[1])
    return TensorDims(list(ids) + [out_d])


@function_rule(F.embedding)
def embedding_fn(an: Analyzer, call: Call) -> object:
    ids, w = call.args[0], call.arg(1, "weight")
    an.pin(w[0], f"embedding vocabulary at node '{call.node.name}'")
    out_d = an.new_space(w[1].size, f"{call.node.name}[-1]")
    an.same(out_d, w[1])
    return TensorDims(list(ids) + [out_d])


def _is_parameter_space(an: Analyzer, space: Space) -> bool:
    return space.id in an.param_space_ids


@function_rule(torch.matmul, torch.bmm, torch.mm, operator.matmul)
@method_rule("matmul", "bmm", "mm", "__matmul__")
def matmul(an: Analyzer, call: Call) -> object:
    a, b = call.args[0], call.args[1]
    if not isinstance(a, TensorDims) or not isinstance(b, TensorDims) or len(a) < 2 or len(b) < 2:
        return unknown(an, call)
    shape = call.out_shape
    k_a, k_b = a[-1], b[-2]
    if _is_parameter_space(an, k_a) or _is_parameter_space(an, k_b):
        an.same(k_a, k_b)  # weight rows zeroed in the masked model: contraction stays exact
    else:
        an.pin(k_a, f"contraction between activations at node '{call.node.name}'")
        an.pin(k_b, f"contraction between activations at node '{call.node.name}'")
    batch = []
    for pos in range(3, len(shape) + 1):
        size = shape[-pos]
        cands = [t[-pos] for t in (a, b) if len(t) >= pos and t[-pos].size == size]
        if cands:
            for other in cands[1:]:
                an.same(cands[0], other)
            batch.append(cands[0])
        else:
            batch.append(pin_new(an, an.new_space(size, f"{call.node.name}[{len(shape) - pos}]"), "broadcast dim"))
    return TensorDims(list(reversed(batch)) + [a[-2], b[-1]])


@function_rule(F.scaled_dot_product_attention)
def sdpa(an: Analyzer, call: Call) -> object:
    """Heads (leading dims) are the independent units, pruned whole: the q/k feature dim is
    contracted and sets the default scale (and rotary embeddings act on it), so it is
    pinned; v's feature dim is pinned too, so that a head keeps its width and head counts
    (``num_attention_heads``, the head reshapes) are what changes. With ``is_causal`` query row
    i reads keys 0..i by position, so the query rows are pinned too (removing one would shift
    every later row's mask)."""
    q, k, v = call.args[0], call.args[1], call.args[2]
    mask = call.arg(3, "attn_mask")
    if call.arg(5, "is_causal", False) is not False:  # True, or a value only known at run time
        an.pin(q[-2], f"causal attention query rows (positions) at node '{call.node.name}'")
    reason = f"attention query/key feature dim at node '{call.node.name}'"
    an.pin(q[-1], reason)
    an.pin(k[-1], reason)
    an.pin(v[-1], f"attention head dim (whole heads are pruned) at node '{call.node.name}'")
    an.pin(k[-2], f"attention keys at node '{call.node.name}'")
    an.same(k[-2], v[-2])
    shape = call.out_shape
    lead = []
    for pos in range(3, len(shape) + 1):
        cands = [t[-pos] for t in (q, k, v) if len(t) >= pos and t[-pos].size == shape[-pos]]
        for other in cands[1:]:
            an.same(cands[0], other)
        lead.append(cands[0] if cands else pin_new(an, an.new_space(shape[-pos], "sdpa"), "broadcast dim"))
    _attention_mask(an, call, mask, lead)
    return TensorDims(list(reversed(lead)) + [q[-2], v[-1]])


def _attention_mask(an: Analyzer, call: Call, mask: object, lead: list[Space]) -> None:
    """An additive mask or bias with a dim per head (T5's relative position bias) loses the
    heads its attention loses; its other dims (queries, keys, broadcast dims) are pinned."""
    where = f"attention mask at node '{call.node.name}'"
    if not isinstance(mask, TensorDims):
        an.pin_value(mask, where)
        return
    for pos in range(1, len(mask) + 1):
        space = mask[-pos]
        if pos >= 3 and pos - 3 < len(lead) and space.size == lead[pos - 3].size and space.size != 1:
            an.same(space, lead[pos - 3])
        else:
            an.pin(space, where)


def _weights_used(node: fx.Node) -> bool:
    """Is the second output (attention weights) of a multi-output node read?"""
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            if user.args[1] != 0 and user.users:
                return True
        else:
            return True
    return False


@module_rule(nn.MultiheadAttention)
def multihead_attention(an: Analyzer, call: Call) -> object:
    """Whole heads are the unit. nn.MultiheadAttention requires embed_dim == heads x
    head_dim == the query width, so the query/output width is tied to the heads."""
    m = call.module
    q, k, v = call.arg(0, "query"), call.arg(1, "key"), call.arg(2, "value")
    if (not m._qkv_same_embed_dim or m.in_proj_weight is None or m.bias_k is not None
            or not all(isinstance(t, TensorDims) for t in (q, k, v))):
        return unknown(an, call)
    for name in ("key_padding_mask", "attn_mask"):
        an.pin_value(call.kwargs.get(name), f"attention mask at node '{call.node.name}'")
    if len(call.args) > 3:
        an.pin_value(call.args[3:], f"attention mask at node '{call.node.name}'")
    e = m.embed_dim
    an.same(q[-1], k[-1])
    an.same(q[-1], v[-1])
    w = an.tensor_dims(m.in_proj_weight)
    an.same(w[1], q[-1])
    inner = an.new_space(e, f"{call.node.name}.inner")
    heads = an.new_space(m.num_heads, f"{call.node.name}.heads")
    head_dim = pin_new(an, an.new_space(m.head_dim, f"{call.node.name}.head_dim"), "attention head dim")
    an.product(inner, [heads, head_dim])
    an.same(inner, q[-1])
    for part in range(3):
        an.slice_same(w[0], part * e, inner, 0, e)
    if m.in_proj_bias is not None:
        bias = an.tensor_dims(m.in_proj_bias)
        for part in range(3):
            an.slice_same(bias[0], part * e, inner, 0, e)
    ow = an.tensor_dims(m.out_proj.weight)
    an.same(ow[1], inner)
    an.same(ow[0], q[-1])
    if m.out_proj.bias is not None:
        an.same(an.tensor_dims(m.out_proj.bias)[0], q[-1])
    seq_k = 0 if not m.batch_first and len(k) == 3 else len(k) - 2
    an.pin(k[seq_k], f"attention keys at node '{call.node.name}'")
    an.same(k[seq_k], v[seq_k])
    if len(q) == 3:  # batch rows attend only within themselves
        batch = 0 if m.batch_first else 1
        an.same(q[batch], k[batch])
        an.same(q[batch], v[batch])
    out = TensorDims(list(q))
    weights = an.fresh(call.meta[1], call.node.name + ".weights") if _is_multi(call.meta) else None
    an.pin_value(weights, f"attention weights at node '{call.node.name}'")
    if weights is not None and _weights_used(call.node):  # averaged over heads: every head counts
        an.pin(heads, f"attention weights averaged over heads are used at node '{call.node.name}'")
    if isinstance(weights, TensorDims) and len(q) == 3 and weights[0].size == q[batch].size:
        an.same(weights[0], q[batch])  # (batch, [heads,] queries, keys): a batch row's own weights
        seq_q = 1 if m.batch_first else 0
        if weights[-2].size == q[seq_q].size:
            an.same(weights[-2], q[seq_q])  # each query's row
    return (out, weights)


# ---------------------------------------------------------------------------
# torchvision wrapped functions
# ---------------------------------------------------------------------------


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


@function_rule(torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
               torch.randn, torch.rand, torch.linspace, torch.eye)
def creation(an: Analyzer, call: Call) -> object:
    an.pin_value((call.args, call.kwargs), f"size used to create a tensor at node '{call.node.name}'")
    out = an.fresh(call.meta, call.node.name)
    an.pin_value(out, f"tensor created with a fixed size at node '{call.node.name}'")
    return out


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------


def _lookup(node: fx.Node, module: nn.Module | None) -> Rule:
    if node.op == "call_module":
        for t in type(module).__mro__:
            if t in MODULE_RULES:
                return MODULE_RULES[t]
        return unknown
    if node.op == "call_method":
        return METHOD_RULES.get(node.target, unknown)
    return FUNCTION_RULES.get(node.target, unknown)


def _shape_consumer(node: fx.Node) -> bool:
    return node.target in SHAPE_CONSUMERS if node.op in ("call_function", "call_method") else False


def apply_rules(an: Analyzer, gm: fx.GraphModule) -> tuple[list, object]:
    """Relate every node's spaces in ``gm`` through the rule tables.

    Returns the values of the graph's placeholders (in order) and of its output; the
    caller decides what the boundary pins (:func:`spruce.passes.analysis.analyze`)."""
    modules = dict(gm.named_modules())
    inputs: list = []
    output: object = None
    for node in gm.graph.nodes:
        an.current = node
        key = (an.graph_index, node)
        meta = node.meta.get("tensor_meta")
        if node.op == "placeholder":
            value = an.fresh(meta, node.name)
            inputs.append(value)
            an.values[key] = value
            an.input_space_ids.update(s.id for s in iter_spaces(value))
            continue  # related by its users, by links between pieces, or pinned as a graph input
        elif node.op == "get_attr":
            value = _get_attr(an, gm, node)
        elif node.op == "output":
            output = _resolve(an, node.args[0])
            continue
        else:
            module = modules.get(node.target) if node.op == "call_module" else None
            args = _resolve(an, node.args)
            kwargs = _resolve(an, node.kwargs)
            if not _shape_consumer(node):
                reads = [v for v in _flatten((args, kwargs)) if isinstance(v, (SizeRead, ShapeOf))]
                for r in reads:
                    an.pin_value(r, f"size of this dim is used as a value at node '{node.name}'")
            call = Call(node, tuple(args), dict(kwargs), meta, module)
            rule = _lookup(node, module)
            try:
                value = rule(an, call)
            except (AssertionError, IndexError, TypeError, ValueError, KeyError, AttributeError) as exc:
                # a rule that does not understand this use falls back to pinning
                value = unknown(an, call, f"unsupported use of {_desc(node, module)} at node '{node.name}' "
                                          f"({type(exc).__name__}: {exc})")
        an.values[key] = value
        _pin_untouched(an, value)
    an.current = None
    return inputs, output


def _pin_untouched(an: Analyzer, value: object) -> None:
    for space in iter_spaces(value):
        if (an.graph.degree(space.id) == 0 and space.id not in an.pinned_space_ids
                and space.id not in an.param_space_ids  # parameters get related by their users
                and space.id not in an.copy_space_ids  # copies: related by their users (GQA heads)
                and space.id not in an.input_space_ids):  # graph inputs by the boundary or links
            an.pin(space, f"new dimension from node '{an.current.name}'")


def _get_attr(an: Analyzer, gm: fx.GraphModule, node: fx.Node) -> object:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, torch.Tensor):
        return an.tensor_dims(obj, name=node.target)
    return None


def _resolve(an: Analyzer, args):
    def lookup(n: fx.Node):
        return an.values.get((an.graph_index, n))

    return fx.node.map_arg(args, lookup)


def _flatten(value):
    if isinstance(value, (tuple, list)) and not isinstance(value, TensorDims):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, slice):
        yield from _flatten((value.start, value.stop, value.step))
    else:
        yield value


from . import atenrules  # noqa: E402, F401  (registers the ATen operator rules)
