"""Joins, splits, slices and indexing (cat, stack, split, chunk, unbind, getitem, select,
slice, index_select): pieces are sub-ranges of a dim; partial slices and integer indices pin
it (fx and ATen rules, and the rewrite of split sizes)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..spaces import Analyzer, ShapeOf, SizeRead, TensorDims
from .common import dim_index, pin_new, schema_args, unknown
from .registry import Call, Resize, aten_rule, function_rule, method_rule

__all__ = ["index_tensor", "split_pieces", "split_sizes", "unbind_pieces"]

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# size rewrites
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# fx rules
# ---------------------------------------------------------------------------


@function_rule(torch.cat, torch.concat, torch.concatenate)
def cat(an: Analyzer, call: Call) -> object:
    tensors = [t for t in call.arg(0, "tensors") if isinstance(t, TensorDims)]
    shape = call.out_shape
    d = dim_index(int(call.arg(1, "dim", 0)), len(shape))
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
    d = dim_index(int(call.arg(1, "dim", 0)), len(shape))
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
    d = dim_index(int(d), len(x))
    parts = list(call.meta)
    if name == "unbind":
        return unbind_pieces(an, call, x, d)
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


def unbind_pieces(an: Analyzer, call: Call, x: TensorDims, d: int) -> tuple[TensorDims, ...]:
    """``x`` unbound along ``d``: that dim is pinned (each piece is one of its positions); one
    piece per output, with the other dims of ``x``."""
    an.pin(x[d], f"unbind over this dim at node '{call.node.name}'")
    return tuple(TensorDims(s for k, s in enumerate(x) if k != d) for _ in call.meta)


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


# ---------------------------------------------------------------------------
# ATen rules
# ---------------------------------------------------------------------------


@aten_rule("select.int")
def select(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = int(call.args[1]) % len(x)
    return index_tensor(an, call, x, tuple([slice(None)] * d + [0]))


def _slice_range(node: fx.Node, size: int, ndim: int) -> tuple[int, int, int] | None:
    """(dim, start, end) of an ``aten.slice.Tensor`` node with literal bounds and step 1 over a
    dim of ``size`` (bounds clamped as slicing does); None for any other node."""
    if node.op != "call_function" or node.target is not aten.slice.Tensor:
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    d, start, end, step = (node.kwargs.get(k, v) for k, v in zip(("dim", "start", "end", "step"), args[1:5]))
    d = 0 if d is None else d
    start, end, step = (0 if start is None else start), (size if end is None else end), (1 if step is None else step)
    if not all(isinstance(v, int) for v in (d, start, end, step)) or step != 1:
        return None
    start, end = (v + size if v < 0 else v for v in (start, end))
    start, end = max(0, min(start, size)), max(0, min(end, size))
    return d % ndim, start, max(start, end)


def _tiles(node: fx.Node, d: int, size: int, ndim: int) -> bool:
    """Do the literal slices of ``node``'s input along ``d`` (its users, ``node`` among them)
    cover the dim exactly once (Phi-3's fused ``qkv_proj`` cut into query, key and value)?"""
    ranges = []
    for user in node.args[0].users:
        found = _slice_range(user, size, ndim)
        if found is not None and found[0] == d and found[2] > found[1]:
            ranges.append(found[1:])
    ranges.sort()
    return bool(ranges) and ranges[0][0] == 0 and ranges[-1][1] == size and all(
        a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def _rewrite_slice(node: fx.Node, ctx: Resize) -> None:
    """A slice among slices that tile a dim takes the kept channels of its own sub-range: it
    starts after the kept channels before it."""
    piece = ctx.extra("piece")
    if piece is None:
        return
    before = ctx.extra("before")
    start = ctx.size(before) if before is not None else 0
    args = list(node.args) + [None] * (4 - len(node.args))
    node.args = (args[0], args[1], start, start + ctx.size(piece), *node.args[4:])
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("start", "end")}


@aten_rule("slice.Tensor", "narrow", shape_args=True, rewrite=_rewrite_slice)
def slice_op(an: Analyzer, call: Call) -> object:
    """A full slice keeps the dim's channels. Slices with literal bounds that together tile the
    dim are consecutive sub-ranges of it, as a split's pieces (each loses the channels removed
    in its range); any other partial slice pins them."""
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
    found = _slice_range(call.node, x[d].size, len(x))
    if found is not None and isinstance(call.node.args[0], fx.Node) and _tiles(call.node, d, x[d].size, len(x)):
        _, begin, stop = found
        piece = an.new_space(stop - begin, f"{call.node.name}[{d}]")
        an.slice_same(x[d], begin, piece, 0, stop - begin)
        an.note("piece", piece)
        if begin:
            before = an.new_space(begin, f"{call.node.name}.before[{d}]")
            an.slice_same(x[d], 0, before, 0, begin)
            an.note("before", before)
        return TensorDims(piece if k == d else s for k, s in enumerate(x))
    an.pin(x[d], f"partial slice at node '{call.node.name}'")
    dims = list(x)
    dims[d] = pin_new(an, an.new_space(call.out_shape[d], f"{call.node.name}[{d}]"), "partial slice")
    return TensorDims(dims)


def _is_bool(node: object) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


@aten_rule("index.Tensor")
def index_op(an: Analyzer, call: Call) -> object:
    """Advanced indexing by integer tensors (Swin's relative-position-bias table read at its
    position index): the indexed dims and the index tensors are pinned, the result's
    broadcast index dims are new pinned dims, and every dim not indexed passes through (the
    table's heads). Boolean masks have no rule."""
    x, indices = call.args[0], list(call.args[1])
    nodes = list(call.node.args[1])
    if not isinstance(x, TensorDims) or not hasattr(call.meta, "shape") or len(indices) > len(x):
        return unknown(an, call)
    indices += [None] * (len(x) - len(indices))
    indexed = [k for k, it in enumerate(indices) if it is not None]
    if not indexed or any(not isinstance(indices[k], TensorDims) or _is_bool(nodes[k]) for k in indexed):
        return unknown(an, call)
    where = f"node '{call.node.name}'"
    for k in indexed:
        an.pin(x[k], f"indexed dim at {where}")
    an.pin_value([indices[k] for k in indexed], f"index at {where}")
    shape = call.out_shape
    passed = [x[k] for k in range(len(x)) if indices[k] is None]
    at = indexed[0] if indexed == list(range(indexed[0], indexed[-1] + 1)) else 0
    count = len(shape) - len(passed)
    broadcast = [pin_new(an, an.new_space(shape[at + i], f"{call.node.name}[{at + i}]"), "indexed dim")
                 for i in range(count)]
    return TensorDims(passed[:at] + broadcast + passed[at:])


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
def split_op(an: Analyzer, call: Call) -> object:
    """Pieces along ``dim`` are consecutive sub-ranges of it."""
    x = call.args[0]
    d = int(schema_args(call).get("dim", 0)) % len(x)
    return split_pieces(an, call, x, d, list(call.meta))


@aten_rule("unbind.int")
def unbind(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = int(schema_args(call).get("dim", 0)) % len(x)
    return unbind_pieces(an, call, x, d)


@aten_rule("tensor_split.sections", "tensor_split.indices", "tensor_split.tensor_indices_or_sections")
def tensor_split(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = int(schema_args(call).get("dim", 0)) % len(x)
    an.pin(x[d], f"tensor_split at node '{call.node.name}'")
    return split_op(an, call)
