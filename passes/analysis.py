"""Channel dependency analysis: which channels of which parameters must be removed together.

Every dimension of every tensor in the traced graph (and of every parameter) is a
*space* of ``size`` elements. Operator rules (``spruce.passes.rules``) state how
spaces relate: identical (residual add, activations), a sub-range of one another
(cat/split), a row-major product of smaller spaces (flatten, head reshapes, group
convolutions, channel shuffle), or *pinned* (must keep every element: graph
inputs/outputs, spatial dims, normalised dims, unknown operators...).

Relations are solved at element level with a union-find: each unpinned connected
component of elements is one prunable channel (an *atom*); it carries a slice of
every parameter dimension it touches. Atoms that touch the same parameter
dimensions form a :class:`ChannelGroup`. A product ``M = F1 x F2 x ...`` becomes
exact element aliasing once all but one factor are pinned (an element of ``M``
lives iff its element of the free factor lives); when several factors stay free,
all but the largest are pinned, which is always safe.

The space graph itself is a ``networkx`` graph (``ChannelAnalysis.space_graph``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .graph import CapturedGraph
from .rules import apply_rules
from .spaces import GQA_MODES, Analyzer, ShapeOf, SizeRead, Space, TensorDims

__all__ = [
    "GQA_MODES",
    "Analyzer",
    "ChannelAnalysis",
    "ChannelGroup",
    "Member",
    "ShapeOf",
    "SizeRead",
    "Space",
    "TensorDims",
    "analyze",
    "leaves",
    "solve",
]


@dataclass(frozen=True)
class Member:
    """One parameter/buffer dimension carrying a group's channels.

    ``index[c]`` lists the entries of dimension ``dim`` of ``name`` that belong to
    channel ``c`` of the group (more than one entry per channel after a flatten
    into a linear layer, for example)."""

    name: str
    dim: int
    index: np.ndarray

    def __repr__(self) -> str:
        return f"Member({self.name}, dim={self.dim}, per_channel={self.index.shape[1]})"


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together across ``members``.

    ``size`` channels; ``prunable`` is False with a ``reason`` when any of them is
    pinned (reaches a graph output, an unknown operator, a normalisation...)."""

    id: int
    size: int
    members: tuple[Member, ...]
    prunable: bool
    reason: str | None = None
    atoms: np.ndarray = field(default=None, repr=False)  # component label of each channel
    min_keep: int = 1  # channels that must stay at least (a router's top_k experts)

    def member(self, name: str, dim: int | None = None) -> Member:
        for m in self.members:
            if m.name == name and (dim is None or m.dim == dim):
                return m
        raise KeyError(f"group {self.id} has no member {name}" + ("" if dim is None else f" dim {dim}"))



@dataclass
class ChannelAnalysis:
    """Result of the analysis: the groups plus what export needs to shrink the graph."""

    groups: list[ChannelGroup]
    analyzer: Analyzer
    labels: np.ndarray
    pinned: np.ndarray
    captured: CapturedGraph | None = None

    @property
    def space_graph(self) -> nx.Graph:
        return self.analyzer.graph

    def alive_mask(self, kept: dict[int, np.ndarray]) -> np.ndarray:
        """Per element: does it survive when each group keeps ``kept[group.id]``?

        Groups absent from ``kept`` keep everything."""
        dead_labels = np.zeros(self.analyzer.n_elements, dtype=bool)
        for group in self.groups:
            if group.id not in kept:
                continue
            keep = np.zeros(group.size, dtype=bool)
            keep[np.asarray(kept[group.id], dtype=np.int64)] = True
            dead_labels[group.atoms[~keep]] = True
        return ~dead_labels[self.labels]

    def kept_entries(self, kept: dict[int, np.ndarray], name: str, dim: int) -> np.ndarray | None:
        """A bool per entry of dim ``dim`` of the parameter/buffer ``name``: does it survive when
        each group keeps ``kept[group.id]``? None when the analysis never saw that dim."""
        an = self.analyzer
        for (key, d), space in an.param_spaces.items():
            if d == dim and an.tensor_names[key] == name:
                return self.alive_mask(kept)[space.start : space.start + space.size].copy()
        return None

    def norm_weights(self) -> dict[str, int]:
        """Name -> channel count of the LayerNorm / RMSNorm weights whose normalised dim is
        left free (``normalised_widths``)."""
        an = self.analyzer
        return {an.tensor_names[key]: space.size for (key, d), space in an.param_spaces.items()
                if d == 0 and space.id in an.norm_spaces and an.tensors[key].dim() == 1}

    def hand_written_norms(self) -> set[str]:
        """Names of the weights of the RMSNorms computed by hand among :meth:`norm_weights`."""
        an = self.analyzer
        return {an.tensor_names[key] for (key, d), space in an.param_spaces.items()
                if d == 0 and space.id in an.hand_norm_spaces and an.tensors[key].dim() == 1}

    def norm_keeps(self, kept: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """For every LayerNorm / RMSNorm weight (by parameter name) whose normalised channels
        shrink when each group keeps ``kept[group.id]`` (only under ``normalised_widths``): a
        bool per channel, True where it is kept. The masked model computes those norms over
        the kept channels (:func:`spruce.passes.maskednorm.install_masked_norms`)."""
        an = self.analyzer
        if not an.norm_spaces:
            return {}
        alive = self.alive_mask(kept)
        keeps: dict[str, np.ndarray] = {}
        for (key, d), space in an.param_spaces.items():
            if d != 0 or space.id not in an.norm_spaces or an.tensors[key].dim() != 1:
                continue
            keep = alive[space.start : space.start + space.size]
            if not keep.all():
                keeps[an.tensor_names[key]] = keep.copy()
        return keeps


def solve(an: Analyzer) -> ChannelAnalysis:
    """The channel groups of everything ``an`` recorded (:meth:`Analyzer.resolve`, then one
    :class:`ChannelGroup` per set of atoms touching the same parameter dims)."""
    labels, pinned = an.resolve()
    return _build_groups(an, labels, pinned)


def _build_groups(an: Analyzer, labels: np.ndarray, pinned: np.ndarray) -> ChannelAnalysis:
    is_param = np.zeros(an.n_elements, dtype=bool)
    for space in an.param_spaces.values():
        is_param[space.start : space.start + space.size] = True
    # components made only of parameter elements (kernel dims, unused rows) carry no channel
    has_node = np.zeros(an.n_elements, dtype=bool)
    has_node[labels[~is_param]] = True

    rows_label, rows_member, rows_index = [], [], []
    member_keys: list[tuple[int, int]] = []
    for key, space in an.param_spaces.items():
        mk = len(member_keys)
        member_keys.append(key)
        rows_label.append(labels[space.start : space.start + space.size])
        rows_member.append(np.full(space.size, mk, dtype=np.int64))
        rows_index.append(np.arange(space.size, dtype=np.int64))
    if not rows_label:
        return ChannelAnalysis([], an, labels, pinned)
    lab = np.concatenate(rows_label)
    mem = np.concatenate(rows_member)
    idx = np.concatenate(rows_index)
    keep = has_node[lab]
    lab, mem, idx = lab[keep], mem[keep], idx[keep]
    order = np.lexsort((idx, mem, lab))
    lab, mem, idx = lab[order], mem[order], idx[order]
    if len(lab) == 0:
        return ChannelAnalysis([], an, labels, pinned)
    bounds = np.flatnonzero(np.diff(lab)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    ends = np.concatenate([bounds, [len(lab)]]).astype(np.int64)

    # an atom's signature: the member dims it touches, entries in each, pinned or not
    by_signature = _signatures(lab, mem, starts, ends, pinned, len(member_keys))
    groups: list[ChannelGroup] = []
    for (layout, is_pinned), first in by_signature.items():
        atom_starts = first
        width = sum(k for _, k in layout)
        rows = idx[first[:, None] + np.arange(width, dtype=np.int64)[None, :]]
        atom_labels = lab[first]
        members, col = [], 0
        for mk, k in layout:
            key, dim = member_keys[mk]
            members.append(Member(an.tensor_names[key], dim, rows[:, col : col + k]))
            col += k
        order = np.argsort(members[0].index[:, 0], kind="stable")
        members = [Member(m.name, m.dim, np.ascontiguousarray(m.index[order])) for m in members]
        atom_labels = atom_labels[order]
        reason = None
        if is_pinned:
            reasons = sorted({int(r) for r in np.unique(pinned[atom_labels])})
            reason = "; ".join(an.reasons[r] for r in reasons[:3])
            if len(reasons) > 3:
                reason += f"; and {len(reasons) - 3} more"
        groups.append(
            ChannelGroup(
                id=0,
                size=len(atom_starts),
                members=tuple(sorted(members, key=lambda m: (m.name, m.dim))),
                prunable=not is_pinned,
                reason=reason,
                atoms=atom_labels,
            )
        )
    for space, count in an.min_keeps:
        space_labels = labels[space.start : space.start + space.size]
        for g in groups:
            if np.isin(g.atoms, space_labels).any():
                g.min_keep = max(g.min_keep, count)
    groups.sort(key=lambda g: (not g.prunable, g.members[0].name, g.members[0].dim))
    for i, g in enumerate(groups):
        g.id = i
    return ChannelAnalysis(groups, an, labels, pinned)


def _layout(members: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(member, entries) runs of one atom's sorted member ids."""
    cut = np.flatnonzero(np.diff(members)) + 1
    begins = np.concatenate([[0], cut])
    counts = np.diff(np.concatenate([begins, [len(members)]]))
    return tuple(zip(members[begins].tolist(), counts.tolist()))


def _signatures(lab, mem, starts, ends, pinned, n_members) -> dict[tuple, np.ndarray]:
    """Atoms (given by their first row) grouped by layout and pinned flag.

    Vectorised: a multiset hash of each atom's member ids proposes the groups, and an
    exact comparison of every atom's member sequence with its group's first confirms
    them (a hash collision falls back to splitting that group exactly)."""
    weights = np.random.default_rng(0x5EED).integers(1, 2**62, size=n_members, dtype=np.int64)
    atom_hash = np.add.reduceat(weights[mem], starts)
    widths = ends - starts
    flags = (pinned[lab[starts]] >= 0).astype(np.int64)
    keys = np.stack([atom_hash, widths, flags], axis=1)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out: dict[tuple, list[np.ndarray]] = defaultdict(list)
    order = np.argsort(inverse, kind="stable")
    cuts = np.flatnonzero(np.diff(inverse[order])) + 1
    for members_of_key in np.split(order, cuts):
        first = starts[members_of_key]
        width = int(widths[members_of_key[0]])
        rows = mem[first[:, None] + np.arange(width, dtype=np.int64)[None, :]]
        same = (rows == rows[0]).all(axis=1)
        pending = [(first[same], rows[0])]
        if not same.all():  # hash collision: split exactly
            for s in first[~same].tolist():
                pending.append((np.array([s], dtype=np.int64), mem[s : s + width]))
        for atoms, row in pending:
            out[(_layout(row), bool(flags[members_of_key[0]]))].append(atoms)
    return {key: np.concatenate(parts) for key, parts in out.items()}


def leaves(value: object) -> list[TensorDims | None]:
    """The tensor leaves of an analysis value in the graph contract's order
    (:func:`spruce.passes.graph.tensor_leaves`): one entry per tensor."""
    out: list = []

    def walk(v):
        if isinstance(v, TensorDims):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(value)
    return out


def _relate_leaves(an: Analyzer, a: TensorDims, b: TensorDims, reason: str) -> None:
    if len(a) != len(b):
        an.pin_value((a, b), reason)
        return
    for sa, sb in zip(a, b):
        if sa.size == sb.size:
            an.same(sa, sb)
        else:  # a dim that varies between calls (spatial size per level, batch)
            an.pin(sa, reason)
            an.pin(sb, reason)


def analyze(captured: CapturedGraph, pin_boundary: bool = True, gqa: str = "query_heads",
            normalised_widths: bool = False, hand_written_norms: bool = True) -> ChannelAnalysis:
    """Run the operator rules over every graph of ``captured`` and solve.

    Returns the :class:`ChannelAnalysis`: every set of coupled channels of
    ``captured.root`` as :class:`ChannelGroup`\\ s (unprunable groups say why). Graph
    inputs and outputs keep their channels (they cross eager code or the model's
    interface), except where a :class:`~spruce.passes.graph.Link` couples a piece's output
    with another piece's input. ``pin_boundary=False`` pins nothing at the boundary (the
    soundness tests of single operators use it). ``gqa`` chooses what grouped-query attention
    prunes (:data:`GQA_MODES`): ``"query_heads"`` the same query heads in every key/value
    group, ``"kv_groups"`` whole key/value groups with their query heads.
    ``normalised_widths`` leaves the dim a LayerNorm / RMSNorm with a weight normalises over
    free (else pinned): the masked model then computes the norm's statistics over the kept
    channels only (:mod:`spruce.passes.maskednorm`), which is what the compact model's
    smaller norm computes. RMSNorm modules computed by hand (``x.pow(2).mean(-1)``, as Llama's)
    count too unless ``hand_written_norms=False`` (their masked mean runs as a hook on the
    module: a model run as one graph, like sparsify's, cannot)."""
    an = Analyzer(captured.root, gqa=gqa, normalised_widths=normalised_widths,
                  hand_written_norms=hand_written_norms)
    io: dict[tuple[int, bool], tuple[list, list]] = {}
    gi = 0
    for pi, piece in enumerate(captured.pieces):
        for training, gm in ((False, piece.eval), (True, piece.train)):
            if gm is None:
                io[(pi, True)] = io[(pi, False)]
                continue
            an.graph_index = gi
            an.training = training
            gi += 1
            inputs, output = apply_rules(an, gm)
            io[(pi, training)] = (leaves(inputs), leaves(output))
    if pin_boundary:
        _pin_boundary(an, captured, io)
    result = solve(an)
    result.captured = captured
    return result


def _pin_boundary(an: Analyzer, captured: CapturedGraph, io: dict) -> None:
    linked_in = {(link.dst, link.in_leaf) for link in captured.links}
    linked_out = {(link.src, link.out_leaf) for link in captured.links}
    whole = captured.whole
    for pi, piece in enumerate(captured.pieces):
        names = [n.name for n in piece.eval.graph.nodes if n.op == "placeholder"]
        for training in (False, True):
            if training and piece.train is None:
                continue
            inputs, outputs = io[(pi, training)]
            for leaf, dims in enumerate(inputs):
                reason = piece.pinned_inputs.get(leaf)
                if reason is None and (pi, leaf) in linked_in:
                    continue
                what = f"graph input '{names[leaf]}'" if whole and leaf < len(names) else (
                    reason or f"input of '{piece.path}' computed by eager code")
                an.pin_value(dims, what)
            for leaf, dims in enumerate(outputs):
                pinned = piece.pinned_outputs.get(leaf)
                if whole or (pinned is None and (pi, leaf) not in linked_out):
                    an.pin_value(dims, "reaches a graph output" if whole else
                                 f"output of '{piece.path}' reaches eager code")
                elif pinned is not None:
                    reason, which = pinned
                    for d in range(len(dims)) if which is None else which:
                        if d < len(dims):
                            an.pin(dims[d], reason)
    for link in captured.links:
        for training in (False, True):
            src_out = io[(link.src, training)][1]
            dst_in = io[(link.dst, training)][0]
            if link.out_leaf < len(src_out) and link.in_leaf < len(dst_in):
                _relate_leaves(an, src_out[link.out_leaf], dst_in[link.in_leaf],
                               f"dim varies between calls of '{captured.pieces[link.dst].path}'")
