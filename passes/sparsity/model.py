"""``sparsify``: a model with mask nodes in its graph, driven from the user's training loop."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from spruce.passes.analysis import analyze
from spruce.passes.export import check_runs, remove_channels
from spruce.passes.graph import CapturedGraph
from spruce.passes.sparsity import method_modules  # noqa: F401  (registers every method)
from spruce.passes.sparsity.budget import DISTRIBUTIONS, layer_densities
from spruce.passes.sparsity.channels import channel_units, expand_channel_masks
from spruce.passes.sparsity.distributed import average_captured_grads, sync_from_rank0
from spruce.passes.sparsity.masking import (
    SPARSE_LAYER_TYPES,
    MaskedWeight,
    global_topk_masks,
    input_channel_dim,
    insert_masks,
    nm_groups,
    nm_mask,
    topk_mask,
)
from spruce.passes.sparsity.methods import METHODS
from torch import fx

__all__ = ["SparseModel", "SparseLayer", "STRUCTURES", "check_options", "sparsify_captured"]

STRUCTURES = ("unstructured", "channel", "n:m")


@dataclass
class SparseLayer:
    """One sparse layer: its module, its mask node and its target density."""

    name: str
    module: nn.Module
    masked: MaskedWeight
    density: float
    grown: torch.Tensor | None = field(default=None, repr=False)  # grown at the last update
    after_prune: torch.Tensor | None = field(default=None, repr=False)  # active set between prune and grow
    previous: torch.Tensor | None = field(default=None, repr=False)  # active set after the last update
    ever_active: torch.Tensor | None = field(default=None, repr=False)
    last_grown: torch.Tensor | None = field(default=None, repr=False)  # grown at the last recorded update
    batchnorm: nn.Module | None = field(default=None, repr=False)  # the BatchNorm right after, if any

    _TRACKED = ("previous", "ever_active", "last_grown", "grown", "after_prune")

    @property
    def in_dim(self) -> int:
        """The weight dimension of the input channels (N:M groups run along it)."""
        return input_channel_dim(self.module)


def _parse_structure(structure: str) -> tuple[str, int, int]:
    if structure in ("unstructured", "channel"):
        return structure, 0, 0
    if structure in ("n:m", "nm"):
        return "n:m", 2, 4
    parts = structure.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if not 0 < n < m:
            raise ValueError(f"n:m structure needs 0 < N < M, got {structure!r}")
        return "n:m", n, m
    raise ValueError(f"unknown structure {structure!r}; valid: unstructured, channel, n:m, N:M (e.g. 2:4)")


class SparseModel(nn.Module):
    """A traced model whose sparse layers take their weights through mask nodes.

    Call :meth:`step` after every ``optimizer.step()``; :meth:`attach` the optimizer so
    the state of pruned and regrown weights is reset. Invariant: after every step each
    layer keeps exactly its target number of active weights (N per group of M for
    N:M), and pruned weights are zero."""

    def __init__(self, source: nn.Module, graph: nn.Module, layers: list[SparseLayer], method,
                 total_steps: int | None, structure: str, n: int, m: int, distribution: str = "erk"):
        super().__init__()
        self.graph = graph
        # (eval graph, training graph) when the model's code differs between modes (dropout with
        # training=self.training, auxiliary heads): forward runs the one of the current mode.
        # Not registered: both share ``graph``'s submodules, parameters and masks.
        self._mode_graphs: tuple[nn.Module, nn.Module] | None = None
        self.layers = layers
        self.method = method
        self.total_steps = total_steps
        self.structure, self.n, self.m = structure, n, m
        self.distribution = distribution
        # what sparsify was called with, for checkpoints (spruce.compiler.checkpoint) to rebuild it
        self.sparsity: float | None = None
        self.exclude: tuple[str, ...] = ()
        self.input_spec: list[tuple[tuple[int, ...], str]] | None = None  # example inputs' shapes and dtypes
        self._example: tuple | None = None  # the example inputs, to check that compact() runs
        self.units: list = []  # ChannelUnits for structure="channel"
        self.analysis = None
        self.step_count = 0
        self.metrics: list[dict] = []
        self._source = [source]  # not a submodule: it shares every parameter with ``graph``
        self._optimizer: torch.optim.Optimizer | None = None

    # ---- training-loop API -----------------------------------------------------
    def forward(self, *args, **kwargs):
        capture = self.training and torch.is_grad_enabled() and self.method.wants_dense_grad(self, self.step_count + 1)
        for layer in self.layers:
            layer.masked.capture_dense_grad = capture
        graph = self.graph if self._mode_graphs is None else self._mode_graphs[int(self.training)]
        return graph(*args, **kwargs)

    def attach(self, optimizer: torch.optim.Optimizer) -> SparseModel:
        """Reset the optimizer state of weights that are pruned or regrown at each update."""
        self._optimizer = optimizer
        return self

    def step(self) -> None:
        """Advance one optimizer step: run the method's update, keep pruned weights at zero.

        Under torch.distributed (DDP) this is a collective: captured gradients are averaged
        over ranks first and rank 0's update is broadcast, so masks agree on every rank."""
        self.step_count += 1
        average_captured_grads(self.layers)
        self.method.on_step(self, self.step_count)
        due = self.method.is_update(self, self.step_count)
        completes = due and self.method.completes_update(self, self.step_count)
        if due:  # name a corrupt layer before its NaNs reach other layers' scores through gradients
            for layer in self.layers:
                _finite(layer.module.weight.detach(), layer, "weight")
        before = [layer.masked.mask.clone() for layer in self.layers] if due else []
        changed = due and self.method.update(self, self.step_count)
        if due:
            changed = sync_from_rank0(self, changed)
        for layer in self.layers:
            layer.masked.dense_grad = None
            layer.masked.capture_dense_grad = False
        self.apply_masks()
        if changed:
            if self.method.resets_optimizer_state:
                self._reset_optimizer_state(before)
            for layer, old in zip(self.layers, before):  # R counts the weights active before the first update
                if layer.ever_active is None:
                    layer.ever_active = old
            if completes:
                self._record(self.step_count)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight (methods whose forward keeps dense weights behind a
        straight-through estimator, like Feather, keep them)."""
        if self.method.keeps_pruned_weights:
            return
        for layer in self.layers:
            layer.module.weight.mul_(layer.masked.mask)  # NaN * 0 stays NaN: corrupt weights are not hidden

    def _reset_optimizer_state(self, before: list[torch.Tensor]) -> None:
        if self._optimizer is None:
            return
        for layer, old in zip(self.layers, before):
            changed = old ^ layer.masked.mask
            state = self._optimizer.state.get(layer.module.weight, {})
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == changed.shape:
                    value.masked_fill_(changed, 0.0)

    # ---- masks ---------------------------------------------------------------------
    def set_mask(self, layer: SparseLayer, mask: torch.Tensor) -> None:
        layer.masked.set_mask(mask)

    def _count(self, layer: SparseLayer, density: float) -> int:
        return int(round(density * layer.masked.mask_shape.numel()))

    def random_mask(self, layer: SparseLayer, density: float, generator: torch.Generator) -> torch.Tensor:
        scores = torch.rand(layer.masked.mask_shape, generator=generator)
        if self.structure == "n:m":
            return nm_mask(scores, self.n, self.m, layer.in_dim)
        return topk_mask(scores, self._count(layer, density))

    def magnitude_mask(self, layer: SparseLayer, density: float, within: torch.Tensor | None = None) -> torch.Tensor:
        scores = _finite(layer.module.weight.detach().abs().float(), layer, "weight magnitude")
        if self.structure == "n:m":
            return nm_mask(scores, self.n, self.m, layer.in_dim)
        if within is not None:
            scores = torch.where(within, scores, torch.full_like(scores, -1.0))
        return topk_mask(scores, self._count(layer, density))

    def global_magnitude_masks(self, density: float, within: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Masks keeping the ``density`` fraction of all sparse weights with the largest
        magnitudes, one threshold across layers (the ``global`` distribution); every layer
        keeps at least its largest weight."""
        scores = [layer.module.weight.detach().abs().float() for layer in self.layers]
        if within is not None:
            scores = [torch.where(w, s, torch.full_like(s, -1.0)) for s, w in zip(scores, within)]
        total = sum(s.numel() for s in scores)
        return global_topk_masks(scores, max(len(scores), int(round(density * total))))

    @torch.no_grad()
    def prune_grow(self, layer: SparseLayer, k: int, grow_scores: torch.Tensor, init: str = "zero") -> None:
        """Drop the ``k`` active weights of smallest magnitude, then grow the ``k`` inactive
        weights with the largest ``grow_scores``; the active count is unchanged."""
        if self.structure == "n:m":
            raise NotImplementedError(f"method {self.method.name!r} does not support N:M prune-grow yet")
        mask = layer.masked.mask
        if k <= 0:
            layer.grown = torch.zeros_like(mask)
            layer.after_prune = mask.clone()
            return
        weight = _finite(layer.module.weight.detach().abs().float(), layer, "weight magnitude")
        grow_scores = _finite(grow_scores, layer, "grow score")
        drop_scores = torch.where(mask, -weight, torch.full_like(weight, -math.inf))
        dropped = topk_mask(drop_scores, k)
        after_drop = mask & ~dropped
        candidates = torch.where(after_drop, torch.full_like(weight, -math.inf), grow_scores.float())
        grown = topk_mask(candidates, k)
        new = after_drop | grown
        if init == "zero":
            layer.module.weight.masked_fill_(grown & ~mask, 0.0)
        layer.grown = grown & ~mask
        layer.after_prune = after_drop
        self.set_mask(layer, new)

    # ---- channels ------------------------------------------------------------------------
    def set_channel_mask(self, unit, mask: torch.Tensor) -> None:
        """Set one channel unit's mask and re-derive the weight masks it reaches."""
        unit.mask.copy_(mask.to(torch.bool))
        expand_channel_masks(self.units, self.layers)

    def kept_channels(self) -> dict[int, np.ndarray]:
        """Kept channel indices per channel group (structure="channel")."""
        return {u.group.id: np.flatnonzero(u.mask.numpy()) for u in self.units if not bool(u.mask.all())}

    def compact(self) -> nn.Module:
        """For structure="channel": the physically smaller model (masked channels removed)
        with the current weights; it computes what this model computes in eval mode. It is
        run once on the example input before it is returned: raises
        :class:`~spruce.passes.export.CompactModelError` naming the node that fails."""
        if self.structure != "channel":
            raise ValueError("compact() needs structure='channel'; use fold() for other structures")
        compact = remove_channels(self.analysis, self._source[0], self.kept_channels())
        if self._example is not None:
            check_runs(compact, self._example, self._source[0], "compact model")
        return compact

    # ---- reporting -------------------------------------------------------------------
    def sparsities(self) -> dict[str, float]:
        """Fraction of pruned weights per layer."""
        return {layer.name: 1.0 - float(layer.masked.mask.float().mean()) for layer in self.layers}

    def _record(self, step: int) -> None:
        record: dict = {"step": step, "sparsity": self.sparsities(), "iou_prune": {}, "iou_grow": {},
                        "survival": {}, "exploration": {}}
        for layer in self.layers:
            mask = layer.masked.mask
            after_prune = layer.after_prune if layer.after_prune is not None else mask
            if layer.previous is not None:
                record["iou_prune"][layer.name] = _iou(after_prune, layer.previous)
                record["iou_grow"][layer.name] = _iou(mask, layer.previous)
            if layer.last_grown is not None and bool(layer.last_grown.any()):
                survived = int((layer.last_grown & after_prune).sum())
                record["survival"][layer.name] = survived / int(layer.last_grown.sum())
            layer.last_grown = layer.grown.clone() if layer.grown is not None else None
            layer.ever_active = mask.clone() if layer.ever_active is None else layer.ever_active | mask
            record["exploration"][layer.name] = float(layer.ever_active.float().mean())
            layer.previous = mask.clone()
        self.metrics.append(record)

    def summary(self) -> str:
        """A table of layers, shapes, target densities and current sparsity."""
        rows = [f"{'layer':40s} {'shape':>20s} {'density':>8s} {'sparsity':>9s}"]
        sparsities = self.sparsities()
        for layer in self.layers:
            shape = "x".join(str(s) for s in layer.masked.mask_shape)
            rows.append(f"{layer.name:40s} {shape:>20s} {layer.density:8.3f} {sparsities[layer.name]:9.3f}")
        rows.append(f"method {self.method.name}, structure {self.structure}, step {self.step_count}")
        return "\n".join(rows)

    def fold(self) -> nn.Module:
        """A plain copy of the original model whose weights are the effective (masked or
        thresholded) weights of the sparse layers: pruned weights are exact zeros."""
        folded = copy.deepcopy(self._source[0])
        modules = dict(folded.named_modules())
        with torch.no_grad():
            for layer in self.layers:
                modules[layer.name].weight.copy_(layer.masked(layer.module.weight) * layer.masked.mask)
        return folded

    # ---- state --------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        tracked = [{k: getattr(layer, k) for k in SparseLayer._TRACKED} for layer in self.layers]
        return {"step_count": self.step_count, "method": self.method.state_dict(), "metrics": self.metrics,
                "layers": tracked, "channels": [u.mask.clone() for u in self.units]}

    def set_extra_state(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self.method.load_state_dict(state["method"])
        self.metrics = state["metrics"]
        for layer, tracked in zip(self.layers, state["layers"]):
            for key, value in tracked.items():
                setattr(layer, key, value)
        for unit, mask in zip(self.units, state.get("channels", [])):
            unit.mask.copy_(mask)


def _following_batchnorms(gm, names) -> dict[str, nn.Module]:
    """The BatchNorm directly consuming each layer's output (for Taylor-BN importance)."""
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in names and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module":
                module = gm.get_submodule(user.target)
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                    found[node.target] = module
    return found


def _finite(scores: torch.Tensor, layer: SparseLayer, what: str) -> torch.Tensor:
    if not torch.isfinite(scores).all():
        raise ValueError(f"{what} is NaN/inf in layer {layer.name}: the model diverged or its weights are corrupt")
    return scores


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _standard_forward(module: nn.Module) -> bool:
    """Does the module compute what its base Conv/Linear class computes (no overridden forward)?
    The mask pass replaces the call with the base class's functional form."""
    base = next(t for t in SPARSE_LAYER_TYPES if isinstance(module, t))
    return all(getattr(type(module), name) is getattr(base, name)
               for name in ("forward", "_conv_forward") if hasattr(base, name))


def _called_with_extra_args(gm, name: str) -> bool:
    return any(n.op == "call_module" and n.target == name and (len(n.args) > 1 or n.kwargs)
               for n in gm.graph.nodes)


def _dense_by_design(gm, model: nn.Module, called: set[str], chosen: set[str], excluded: set[str]) -> list[str]:
    """Weight tensors (2+ dims) the model uses outside a maskable layer call: modules of other
    types (Embedding, MultiheadAttention, ...) and parameters read by the model's own code
    (``F.conv2d(x, self.filt)``, a Conv subclass with its own forward)."""
    out = []
    for name, module in model.named_modules():
        if name in called and name not in chosen and name not in excluded \
                and not isinstance(module, SPARSE_LAYER_TYPES) and "Norm" not in type(module).__name__ \
                and any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            out.append(f"{name} ({type(module).__name__} layers are not supported)")
    params = dict(model.named_parameters())
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        param = params.get(node.target)
        owner = node.target.rpartition(".")[0]
        if param is None or param.dim() < 2 or owner in excluded:
            continue
        users = ", ".join(sorted(f"'{u.name}'" for u in node.users))
        out.append(f"{node.target} (read by the model's code at node {users}, not through a layer call)")
    return out


def _select_layers(model: nn.Module, graphs: list, structure: str, m: int,
                   exclude: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The layers to mask (called in any of ``graphs``); every other layer with a weight is
    named in one warning, with why."""
    excluded = set(exclude)
    called = {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_module"}
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if name not in called or name in excluded or not isinstance(module, SPARSE_LAYER_TYPES):
            continue
        if not module.weight.requires_grad:  # a frozen layer's weights must not move: left dense, untouched
            skipped.append(f"{name} (frozen: requires_grad=False)")
            continue
        if not module.weight.is_floating_point():
            skipped.append(f"{name} (weight dtype {module.weight.dtype} is not floating point)")
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode != "zeros":
            skipped.append(f"{name} (padding_mode {module.padding_mode})")
            continue
        if not _standard_forward(module):
            skipped.append(f"{name} ({type(module).__name__} overrides forward)")
            continue
        if any(_called_with_extra_args(gm, name) for gm in graphs):
            skipped.append(f"{name} (called with arguments besides its input, e.g. output_size)")
            continue
        in_dim = input_channel_dim(module)
        if structure == "n:m" and nm_groups(tuple(module.weight.shape), m, in_dim) is None:
            skipped.append(f"{name} (input channels {module.weight.shape[in_dim]} not divisible by {m})")
            continue
        chosen.append((name, module))
    for gm in graphs:
        skipped += [s for s in _dense_by_design(gm, model, called, {name for name, _ in chosen}, excluded)
                    if s not in skipped]
    if skipped:
        warnings.warn("sparsify: layers kept dense: " + ", ".join(skipped), stacklevel=4)
    return chosen


def _input_spec(example_inputs: object) -> list[tuple[tuple[int, ...], str]] | None:
    """Shapes and dtypes of example inputs given as a tensor or a tuple/list of tensors."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        return None
    return [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in inputs]


def check_options(method: str, structure: str, sparsity: float, total_steps: int | None,
                  method_options: dict, distribution: str = "erk") -> tuple[object, str, int, int]:
    """Validate the options of :func:`sparsify_captured` before any graph work.

    Returns the method instance and the parsed structure ``(kind, n, m)``. Raises
    ``ValueError`` naming the option at fault."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(sorted(METHODS))}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    kind, n, m = _parse_structure(structure)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
    impl = METHODS[method].from_options(**method_options)
    if impl.scheduled and (total_steps is None or isinstance(total_steps, bool) or not isinstance(total_steps, int)
                           or total_steps < 1):
        raise ValueError(f"method {method!r} is scheduled: pass total_steps (a positive integer), got {total_steps!r}")
    return impl, kind, n, m


def sparsify_captured(
    captured: CapturedGraph,
    method: str = "static",
    structure: str = "unstructured",
    sparsity: float = 0.9,
    distribution: str = "erk",
    total_steps: int | None = None,
    exclude: Iterable[str] = (),
    budget: dict[str, float] | None = None,
    latency_table: object = None,
    **method_options,
) -> SparseModel:
    """Insert mask nodes for every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear weight of
    ``captured.root`` and set up ``method`` (see ``spruce.sparsify``, which captures the model
    and calls this).

    The returned :class:`SparseModel` shares its parameters with ``captured.root``: build the
    optimizer from either. ``budget`` ({"latency": f} with ``latency_table`` from
    ``spruce.profile``, {"flops": f} or {"params": f}; f a fraction of dense) drives the
    channel methods (halp, iee with structure="channel") instead of ``sparsity``.
    Every layer left dense, and every channel group kept whole because a dense weight
    reads it, is named in a warning. Every layer keeps at least one weight. Raises
    ``ValueError`` naming the option at fault (a ``uniform`` sparsity that would empty a
    layer names the layer and the highest feasible sparsity)."""
    exclude = tuple(exclude)
    impl, kind, n, m = check_options(method, structure, sparsity, total_steps, method_options, distribution)
    model, example_inputs = captured.root, captured.example_inputs
    # masks go into copies: the captured graphs stay what the analysis and channel removal read
    graphs = [fx.GraphModule(model, copy.deepcopy(g.graph), type(model).__name__) for g in captured.graphs]
    traced = CapturedGraph(graphs[0], graphs[1] if len(graphs) > 1 else None, model, captured.example_inputs)
    chosen = _select_layers(model, traced.graphs, kind, m, exclude)
    if not chosen:
        raise ValueError("sparsify: the model has no Conv/Linear layer to sparsify")
    if kind == "n:m":
        densities = [n / m] * len(chosen)
    elif kind == "channel":  # every channel unit keeps at least one channel
        densities = [1.0 - sparsity] * len(chosen)
    else:
        densities = layer_densities([tuple(mod.weight.shape) for _, mod in chosen], sparsity, distribution,
                                    [name for name, _ in chosen])
    masks = {name: MaskedWeight(torch.ones_like(mod.weight, dtype=torch.bool)) for name, mod in chosen}
    norms = _following_batchnorms(traced.eval, masks)
    for gm in traced.graphs:
        insert_masks(gm, masks)
    # the registered graph is the one of the model's mode now (its parameters, its state_dict keys)
    gm = traced.train if model.training and traced.train is not None else traced.eval
    layers = [
        SparseLayer(name, mod, masks[name], d, batchnorm=norms.get(name))
        for (name, mod), d in zip(chosen, densities)
    ]
    sm = SparseModel(model, gm, layers, impl, total_steps, kind, n, m, distribution)
    if traced.train is not None:
        sm._mode_graphs = (traced.eval, traced.train)
    sm.sparsity, sm.exclude, sm.input_spec = float(sparsity), exclude, _input_spec(example_inputs)
    sm._example = tuple(example_inputs)
    if kind == "channel":
        if distribution != "uniform" and budget is None and not getattr(impl, "budgeted", False):
            raise ValueError("structure='channel' removes the same fraction of every channel group: "
                             "use distribution='uniform'")
        sm.analysis = analyze(captured)
        sm.units, left_out = channel_units(sm.analysis, layers, 1.0 - sparsity)
        if left_out:
            warnings.warn("sparsify: channel groups kept whole: " + ", ".join(left_out), stacklevel=3)
        if not sm.units:
            raise ValueError("structure='channel': the model has no prunable channel group"
                             + (f" whose weights are all masked ({len(left_out)} left out, see the warning)"
                                if left_out else ""))
        if not impl.supports_channels:
            raise ValueError(f"method {method!r} does not support structure='channel' yet; "
                             f"use one of: {', '.join(sorted(k for k, v in METHODS.items() if v.supports_channels))}")
    sm.budget, sm.latency_table = budget, latency_table  # read by the budgeted channel methods
    if budget is not None and not getattr(impl, "budgeted", False):
        raise ValueError(f"method {method!r} takes no budget; use one of: "
                         f"{', '.join(sorted(k for k, v in METHODS.items() if getattr(v, 'budgeted', False)))}")
    impl.initialize(sm)
    sync_from_rank0(sm)  # one initial mask on every rank (no-op outside torch.distributed)
    sm.apply_masks()
    return sm.train(model.training)
