"""The vocabulary shared by the channel analysis and the operator rules: spaces and the
analysis values built from them, and the :class:`Analyzer` that records how spaces relate.

Every dimension of every tensor in a traced graph (and of every parameter) is a
:class:`Space` of ``size`` elements. A rule (:mod:`spruce.passes.rules`) sees the value of
each argument of its node (:class:`TensorDims` for a tensor, :class:`ShapeOf` for a
``torch.Size``, :class:`SizeRead` for a number computed from sizes) and relates spaces
through the :class:`Analyzer`: identical, a sub-range of one another, a row-major product
of smaller spaces, or pinned. :meth:`Analyzer.resolve` settles the products and labels
every element with its connected component; :func:`spruce.passes.analysis.solve` turns
that into channel groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["GQA_MODES", "Analyzer", "ShapeOf", "SizeRead", "Space", "TensorDims", "iter_spaces"]


GQA_MODES = ("query_heads", "kv_groups")


class Space:
    """One dimension (of a tensor in the graph, of a parameter, or a factor of either)."""

    __slots__ = ("id", "label", "size", "start")

    def __init__(self, id: int, size: int, start: int, label: str):
        self.id = id
        self.size = size
        self.start = start
        self.label = label

    @property
    def elements(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size, dtype=np.int64)

    def __repr__(self) -> str:
        return f"Space({self.label}, size={self.size})"


class TensorDims(tuple):
    """The spaces of a tensor value, one per dimension."""


@dataclass(frozen=True)
class SizeRead:
    """A Python number computed from tensor sizes (``x.size(1) // 4``)."""

    spaces: frozenset


@dataclass(frozen=True)
class ShapeOf:
    """A ``torch.Size`` value read from a tensor."""

    dims: TensorDims




def _union_find(n: int, us: np.ndarray, vs: np.ndarray) -> np.ndarray:
    """Component label (the smallest element id) of each of ``n`` elements."""
    parent = np.arange(n, dtype=np.int64)
    if len(us) == 0:
        return parent
    while True:
        pu, pv = parent[us], parent[vs]
        if np.array_equal(pu, pv):
            return parent
        low = np.minimum(pu, pv)
        np.minimum.at(parent, pu, low)
        np.minimum.at(parent, pv, low)
        while True:  # pointer jumping until every element points at a root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def _fully_pinned(space: Space, labels: np.ndarray, pinned: np.ndarray) -> bool:
    return bool((pinned[labels[space.start : space.start + space.size]] >= 0).all())


@dataclass
class _Product:
    whole: Space
    factors: tuple[Space, ...]
    where: str
    resolved: bool = False


class Analyzer:
    """Builds the space graph of one or more traced graphs sharing one model.

    Operator rules call the relation methods (:meth:`same`, :meth:`slice_same`,
    :meth:`product`, :meth:`pin`); :meth:`resolve` settles them."""

    def __init__(self, model: torch.nn.Module, gqa: str = "query_heads", normalised_widths: bool = False,
                 hand_written_norms: bool = True):
        if gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {', '.join(GQA_MODES)}, got {gqa!r}")
        self.gqa = gqa
        # LayerNorm / RMSNorm widths prune (a masked norm: statistics over the kept channels)
        self.normalised_widths = bool(normalised_widths)
        # space ids of the weights (dim 0) of the norms whose normalised dim is left free
        self.norm_spaces: set[int] = set()
        # RMSNorms computed by hand (x.pow(2).mean(-1)) count too, where the masked model can
        # run hooks on their modules (prune); their weights' spaces
        self.hand_written_norms = bool(hand_written_norms)
        self.hand_norm_spaces: set[int] = set()
        self.model = model
        self.copy_space_ids: set[int] = set()
        self.spaces: list[Space] = []
        self.n_elements = 0
        self._edges_u: list[np.ndarray] = []
        self._edges_v: list[np.ndarray] = []
        self._products: list[_Product] = []
        self._pins: list[tuple[np.ndarray, int]] = []
        self.reasons: list[str] = []
        self._reason_ids: dict[str, int] = {}
        self.graph = nx.Graph()
        self.values: dict[tuple[int, fx.Node], object] = {}
        self.param_spaces: dict[tuple[int, int], Space] = {}
        self.tensor_names: dict[int, str] = {}
        self.tensors: dict[int, torch.Tensor] = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)
        ):
            self.tensor_names.setdefault(id(t), name)
            self.tensors[id(t)] = t
        self.param_space_ids: set[int] = set()
        self.input_space_ids: set[int] = set()
        self.pinned_space_ids: set[int] = set()
        self.graph_index = 0
        self.training = False  # is the graph being analysed the training-mode graph?
        self.current: fx.Node | None = None
        # (space, count): at least count of the space's channels stay (a router's top_k experts)
        self.min_keeps: list[tuple[Space, int]] = []
        # per node: spaces a rule names for the rewrite of its size arguments ("groups")
        self.extras: dict[tuple[int, fx.Node], dict[str, object]] = {}

    # ---- spaces -------------------------------------------------------------
    def new_space(self, size: int, label: str) -> Space:
        space = Space(len(self.spaces), int(size), self.n_elements, label)
        self.spaces.append(space)
        self.n_elements += space.size
        self.graph.add_node(space.id, label=label, size=space.size)
        return space

    def copies(self, size: int, label: str) -> Space:
        """A dim of ``size`` identical copies (an ``expand`` of a size-1 or new dim).

        Removing copies is exact, so the dim is free where ``gqa="query_heads"``: grouped-
        query attention's ``repeat_kv`` (key/value heads expanded to their query heads, then
        reshaped) then prunes the same query heads in every key/value group; a product with
        a copies factor keeps that factor free. ``gqa="kv_groups"`` pins copies, so whole
        key/value groups (with their query heads) are what prunes."""
        space = self.new_space(size, label)
        self.copy_space_ids.add(space.id)
        if self.gqa == "kv_groups" and size != 1:
            self.pin(space, f"expanded dim at {self.where()}")
        return space

    def new_dims(self, shape: Sequence[int], label: str) -> TensorDims:
        return TensorDims(self.new_space(s, f"{label}[{d}]") for d, s in enumerate(shape))

    def fresh(self, meta: object, label: str) -> object:
        """New spaces mirroring a node's ``tensor_meta`` structure."""
        if isinstance(meta, TensorMetadata):
            return self.new_dims(tuple(meta.shape), label)
        if isinstance(meta, (tuple, list)):
            return tuple(self.fresh(m, f"{label}.{i}") for i, m in enumerate(meta))
        if isinstance(meta, dict):
            return {k: self.fresh(m, f"{label}.{k}") for k, m in meta.items()}
        return None

    def tensor_dims(self, tensor: torch.Tensor, name: str | None = None) -> TensorDims:
        """Spaces of a parameter/buffer/constant tensor, shared by every use of it."""
        key = id(tensor)
        if key not in self.tensor_names:
            self.tensor_names[key] = name or f"<constant {key}>"
            self.tensors[key] = tensor
        dims = []
        for d, size in enumerate(tensor.shape):
            space = self.param_spaces.get((key, d))
            if space is None:
                space = self.new_space(size, f"{self.tensor_names[key]}[{d}]")
                self.param_spaces[(key, d)] = space
                self.param_space_ids.add(space.id)
            dims.append(space)
        return TensorDims(dims)

    # ---- relations ----------------------------------------------------------
    def reason_id(self, reason: str) -> int:
        rid = self._reason_ids.get(reason)
        if rid is None:
            rid = self._reason_ids[reason] = len(self.reasons)
            self.reasons.append(reason)
        return rid

    def note(self, name: str, value: object) -> None:
        """Remember ``value`` (a space) under ``name`` for the current node: what the rewrite
        of its size arguments reads (the group count of a convolution, of a group norm)."""
        self.extras.setdefault((self.graph_index, self.current), {})[name] = value

    def where(self) -> str:
        return f"node '{self.current.name}'" if self.current is not None else "model"

    def same(self, a: Space, b: Space) -> None:
        """Every element of ``a`` is the same channel as the element of ``b``."""
        if a is b:
            return
        if a.size != b.size:
            raise AssertionError(f"{self.where()}: relating {a} with {b} of another size")
        self._edges_u.append(a.elements)
        self._edges_v.append(b.elements)
        self.graph.add_edge(a.id, b.id, kind="same")

    def slice_same(self, a: Space, a_off: int, b: Space, b_off: int, length: int) -> None:
        """``a[a_off + i]`` is the same channel as ``b[b_off + i]`` for ``i < length``."""
        if length <= 0:
            return
        self._edges_u.append(np.arange(a.start + a_off, a.start + a_off + length, dtype=np.int64))
        self._edges_v.append(np.arange(b.start + b_off, b.start + b_off + length, dtype=np.int64))
        self.graph.add_edge(a.id, b.id, kind="slice")

    def product(self, whole: Space, factors: Sequence[Space]) -> None:
        """``whole`` enumerates the row-major product of ``factors``."""
        nontrivial = [f for f in factors if f.size != 1]
        if len(nontrivial) == 1:
            self.same(whole, nontrivial[0])
            return
        if not nontrivial:
            self.pin(whole, f"size-1 dimension at {self.where()}")
            return
        self._products.append(_Product(whole, tuple(factors), self.where()))
        for f in factors:
            self.graph.add_edge(whole.id, f.id, kind="product")

    def keep_at_least(self, space: Space, count: int, reason: str) -> None:
        """At least ``count`` channels of ``space`` must stay (all of them when it has no more,
        pinned with ``reason``)."""
        if count >= space.size:
            self.pin(space, reason)
        elif count > 1:
            self.min_keeps.append((space, int(count)))

    def pin(self, space: Space, reason: str) -> None:
        """Every element of ``space`` must be kept."""
        self._pins.append((space.elements, self.reason_id(reason)))
        self.pinned_space_ids.add(space.id)

    def pin_value(self, value: object, reason: str) -> None:
        for space in iter_spaces(value):
            self.pin(space, reason)

    # ---- solving ------------------------------------------------------------
    def _components(self) -> np.ndarray:
        us = np.concatenate(self._edges_u) if self._edges_u else np.zeros(0, dtype=np.int64)
        vs = np.concatenate(self._edges_v) if self._edges_v else np.zeros(0, dtype=np.int64)
        return _union_find(self.n_elements, us, vs)

    def _pinned_labels(self, labels: np.ndarray) -> np.ndarray:
        """Reason id per component label (-1 when the component is free)."""
        reason = np.full(self.n_elements, np.iinfo(np.int64).max, dtype=np.int64)
        for elements, rid in self._pins:
            np.minimum.at(reason, labels[elements], rid)
        reason[reason == np.iinfo(np.int64).max] = -1
        return reason

    def resolve(self) -> tuple[np.ndarray, np.ndarray]:
        """Settle every product (alias it to its one free factor, or pin factors until one is
        left) and return, per element, its component label and the reason id pinning that
        component (-1 where it is free)."""
        while True:
            labels = self._components()
            pinned = self._pinned_labels(labels)

            progress = False
            stuck: list[tuple[_Product, list[Space]]] = []
            for prod in self._products:
                if prod.resolved:
                    continue
                free = [f for f in prod.factors if f.size != 1 and not _fully_pinned(f, labels, pinned)]
                if not free:
                    self.pin(prod.whole, f"every factor of a reshape is fixed at {prod.where}")
                    prod.resolved = progress = True
                elif len(free) == 1:
                    self._alias(prod, free[0])
                    prod.resolved = progress = True
                else:
                    stuck.append((prod, free))
            if progress:
                continue
            if not stuck:
                return labels, pinned
            # products sharing channels are decided one per round, so the choice made for one
            # propagates to the next (channel shuffle: view into (g, c/g), then back from (c/g, g));
            # independent products are decided together
            touched: set[int] = set()
            for prod, free in stuck:
                comps = {int(c) for f in prod.factors for c in np.unique(labels[f.start : f.start + f.size])}
                if comps & touched:
                    continue
                touched |= comps
                # copies (GQA's query heads per key/value group) first, then the largest; ties:
                # the innermost factor
                keep = max(reversed(free), key=lambda f: (f.id in self.copy_space_ids, f.size))
                for f in free:
                    if f is not keep:
                        self.pin(f, f"split of a dimension into several prunable factors at {prod.where}")

    def _alias(self, prod: _Product, free: Space) -> None:
        sizes = [f.size for f in prod.factors]
        pos = prod.factors.index(free)
        inner = int(np.prod(sizes[pos + 1 :], dtype=np.int64))
        idx = (np.arange(prod.whole.size, dtype=np.int64) // inner) % free.size
        self._edges_u.append(prod.whole.elements)
        self._edges_v.append(free.start + idx)


def iter_spaces(value: object) -> Iterable[Space]:
    """Every space inside a (possibly nested) analysis value."""
    if isinstance(value, TensorDims):
        yield from value
    elif isinstance(value, ShapeOf):
        yield from value.dims
    elif isinstance(value, SizeRead):
        yield from value.spaces
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_spaces(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_spaces(v)
