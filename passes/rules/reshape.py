"""Reshapes, views and dim reorders (view, reshape, flatten, squeeze, permute, transpose,
expand, repeat): aligned blocks of dims become row-major products; the rewrite of their size
arguments when channels are removed (fx and ATen)."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..spaces import Analyzer, Space, TensorDims
from .common import dim_index, dims_arg, pin_new, set_arg, unknown
from .registry import Call, Resize, Rewrite, aten_rule, function_rule, method_rule, module_rule

__all__ = ["reshape_to", "rewrite_size_list"]

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# size rewrites
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


# ---------------------------------------------------------------------------
# fx rules
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
        order = [dim_index(int(d), n) for d in order]
    elif name in ("transpose", "swapaxes", "swapdims"):
        a = dim_index(int(call.arg(1, "dim0")), n)
        b = dim_index(int(call.arg(2, "dim1")), n)
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
    elif name == "t":
        order = list(reversed(range(n)))
    else:  # movedim
        src = dims_arg(call.arg(1, "source"), n)
        dst = dims_arg(call.arg(2, "destination"), n)
        order = [-1] * n
        for s, d in zip(src, dst):
            order[d] = s
        rest_src = iter(d for d in range(n) if d not in src)
        order = [o if o >= 0 else next(rest_src) for o in order]
    return TensorDims(x[d] for d in order)


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
# ATen rules
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
