"""Links between pieces: one more eager run finds which piece outputs feed other pieces as the
same tensor objects (:class:`~spruce.passes.graph.Link`) and which reach eager code (pinned,
per dim where eager code reads only some dims of a shape)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..passes.graph import CapturedGraph, Link, Piece, has_pytree_io, tensor_leaves
from .preserve import preserved_state
from .shapes import meta_tensors, placeholder_values

__all__ = ["find_links", "input_tensors", "output_tensors"]


def input_tensors(piece: Piece, gm: fx.GraphModule, module: nn.Module, args: tuple, kwargs: dict) -> list:
    """The input leaves of a call of ``piece`` in the contract's order (tensors only)."""
    values = placeholder_values(gm, module, args, kwargs)
    return [t for t in tensor_leaves(values) if isinstance(t, torch.Tensor)]


def output_tensors(gm: fx.GraphModule, output: object) -> list:
    """The output leaves of a call in the contract's order (tensors only)."""
    if has_pytree_io(gm.graph):
        leaves = pytree.tree_leaves(output)
    else:
        leaves = list(tensor_leaves(output))
    return [t for t in leaves if isinstance(t, torch.Tensor)]


_METADATA = {"dtype", "device", "is_cuda", "requires_grad", "layout", "is_sparse", "is_quantized", "is_meta",
             "dim", "ndim", "ndimension", "is_floating_point", "is_complex", "get_device", "element_size",
             "is_contiguous", "data_ptr", "__hash__", "__format__", "__repr__"}


def _function_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "") or name
    return name


class _ReadShape(tuple):
    """The shape of a piece output as eager code sees it: records which dims it reads
    (``x.shape[-2:]`` reads the spatial dims only), so only those keep their channels."""

    def __new__(cls, shape, read: Callable[[tuple[int, ...] | None], None]):
        obj = super().__new__(cls, shape)
        obj._read = read
        return obj

    def _dims(self, index) -> tuple[int, ...]:
        n = len(self)
        if isinstance(index, slice):
            return tuple(range(n))[index]
        return (index % n,) if n else ()

    def __getitem__(self, index):
        if isinstance(index, (int, slice)):
            self._read(self._dims(index))
            value = tuple.__getitem__(self, index)
            return torch.Size(value) if isinstance(index, slice) else value
        self._read(None)
        return tuple.__getitem__(self, index)

    def __iter__(self):
        self._read(None)
        return tuple.__iter__(self)

    def _all(self, *args):
        self._read(None)

    def __eq__(self, other):
        self._read(None)
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list)) else NotImplemented

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __hash__(self):
        self._read(None)
        return tuple.__hash__(self)

    def __repr__(self):
        self._read(None)
        return f"torch.Size({list(tuple.__iter__(self))})"

    def __add__(self, other):
        self._read(None)
        return torch.Size(tuple(tuple.__iter__(self)) + tuple(other))

    def numel(self) -> int:
        self._read(None)
        return torch.Size(tuple(tuple.__iter__(self))).numel()


class _GlueSpy(TorchFunctionMode):
    """Notes every piece output that eager code (outside any piece) touches, and how: a
    shape read pins the dims it reads, any other use pins the whole output."""

    def __init__(self, state: _LinkState, track_shapes: bool):
        super().__init__()
        self.state = state
        self.track_shapes = track_shapes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state.depth > 0:
            return func(*args, **kwargs)
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, _ReadShape):  # a recorded shape handed to torch: all of it counts
                leaf._read(None)
        name = _function_name(func)
        if name in _METADATA:
            return func(*args, **kwargs)
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        key = id(target) if target is not None else None
        if key in self.state.produced and name in ("shape", "size") and (len(args) == 1 and not kwargs):
            result = func(*args, **kwargs)
            if not self.track_shapes:
                self.state.glue(key, None, name)
                return result
            return _ReadShape(result, lambda dims, key=key, name=name: self.state.glue(key, dims, name))
        dims: tuple[int, ...] | None = None
        if name == "size" and len(args) > 1 and isinstance(args[1], int):
            dims = (args[1],)
        elif name == "__len__":
            dims = (0,)
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.state.produced:
                self.state.glue(id(leaf), dims, name)
        return func(*args, **kwargs)


@dataclass
class _LinkState:
    depth: int = 0
    produced: dict[int, tuple[int, int, torch.Tensor]] = field(default_factory=dict)
    reads: dict[tuple[int, int], tuple[set[int] | None, str]] = field(default_factory=dict)
    links: set[Link] = field(default_factory=set)
    eager_inputs: set[tuple[int, int]] = field(default_factory=set)
    output: object = None

    def glue(self, key: int, dims: tuple[int, ...] | None, name: str) -> None:
        src, leaf, tensor = self.produced[key]
        known, what = self.reads.get((src, leaf), (set(), name))
        if known is None or dims is None:
            merged = None
        else:
            merged = known | {d % max(tensor.dim(), 1) for d in dims}
        self.reads[(src, leaf)] = (merged, what)


def find_links(captured: CapturedGraph) -> None:
    """Run the model once more with hooks on the pieces: record which piece outputs reach
    which piece inputs as the same objects (links) and which reach eager code (pinned).
    Shape reads are tracked per dim; if the eager code does not run with the tracked
    shapes, it runs again with every shape read pinning the whole output."""
    try:
        state = _link_run(captured, track_shapes=True)
    except Exception:  # noqa: BLE001 - eager code that needs a real torch.Size
        state = _link_run(captured, track_shapes=False)
    _apply_links(captured, state)


def _link_run(captured: CapturedGraph, track_shapes: bool) -> _LinkState:
    model = captured.root
    state = _LinkState()
    handles = []
    for i, piece in enumerate(captured.pieces):
        module = model.get_submodule(piece.path)

        def pre(mod, a, k, i=i, piece=piece):
            for leaf, t in enumerate(input_tensors(piece, piece.eval, mod, a, k)):
                found = state.produced.get(id(t))
                if found is not None:
                    state.links.add(Link(found[0], found[1], i, leaf))
                else:
                    state.eager_inputs.add((i, leaf))
            state.depth += 1

        def post(mod, a, k, out, i=i, piece=piece):
            state.depth -= 1
            for leaf, t in enumerate(output_tensors(piece.eval, out)):
                state.produced.setdefault(id(t), (i, leaf, t))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    model.eval()
    try:
        with preserved_state(model), torch.no_grad(), _GlueSpy(state, track_shapes):
            output = model(*captured.example_inputs, **captured.example_kwargs)
    finally:
        for h in handles:
            h.remove()
    state.output = output
    return state


def _apply_links(captured: CapturedGraph, state: _LinkState) -> None:
    for leaf in pytree.tree_leaves(state.output):
        if isinstance(leaf, torch.Tensor) and id(leaf) in state.produced:
            src, out_leaf, _ = state.produced[id(leaf)]
            state.reads[(src, out_leaf)] = (None, "the model's output")
    linked_outputs = {(link.src, link.out_leaf) for link in state.links}
    for i, piece in enumerate(captured.pieces):
        for leaf in range(_output_leaf_count(piece)):
            read = state.reads.get((i, leaf))
            if read is not None:
                dims, what = read
                piece.pinned_outputs[leaf] = (f"output of '{piece.path}' read by eager code ({what})",
                                              None if dims is None else tuple(sorted(dims)))
            elif (i, leaf) not in linked_outputs:
                piece.pinned_outputs[leaf] = (f"output of '{piece.path}' unused in eval mode", None)
        for leaf in {leaf for (j, leaf) in state.eager_inputs if j == i}:
            piece.pinned_inputs[leaf] = f"input of '{piece.path}' computed by eager code"
    captured.links = sorted(state.links, key=lambda link: (link.dst, link.in_leaf, link.src, link.out_leaf))


def _output_leaf_count(piece: Piece) -> int:
    node = next(n for n in piece.eval.graph.nodes if n.op == "output")
    count = 0
    for value in tensor_leaves(node.args[0]):
        if isinstance(value, fx.Node) and "tensor_meta" in value.meta:
            meta = value.meta["tensor_meta"]
            count += sum(1 for _ in meta_tensors(meta))
    return count
