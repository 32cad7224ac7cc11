"""``sparsify``: a model with mask nodes in its graph, driven from the user's training loop."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import fx
from torch.nn.utils.parametrize import ParametrizationList

from ..analysis import ChannelAnalysis, analyze
from ..config import check_choice, short_repr
from ..export import check_runs, remove_channels
from ..graph import CapturedGraph
from ..maskednorm import install_masked_norms, masked_norms
from .budget import DEFAULT_DISTRIBUTION, DISTRIBUTIONS, layer_densities
from .channels import ChannelUnit, channel_units
from .context import MethodContext, Structure
from .distributed import average_captured_grads, sync_from_rank0
from .knapsack import Budget
from .layers import TRACKED, SparseLayer, check_finite
from .loss_guard import LossGuard, guard_window
from .masking import SPARSE_LAYER_TYPES, MaskedWeight, input_channel_dim, insert_masks, nm_groups
from .method import Method, MethodConfig, RunLength
from .registry import SPARSIFY_DEFAULT, method_names, resolve_method
from .stale import OPTIMIZER_REMEDY as _OPTIMIZER_REMEDY
from .stale import StaleOptimizerWarning, StaleOptimizerWatch
from .stale import held_by as _held_by

__all__ = ["SparseModel", "SparseLayer", "SparsifySpec", "STRUCTURES", "StaleOptimizerWarning", "check_combination",
           "check_options", "sparsify_captured"]

STRUCTURES = ("unstructured", "channel", "n:m")


def _loader_length(loader: object) -> int | None:
    """``len(loader)``, or None for a loader without a length (an iterable dataset)."""
    try:
        return len(loader)
    except TypeError:
        return None


@dataclass(frozen=True)
class SparsifySpec:
    """What ``sparsify`` was called with: enough to rebuild the SparseModel around a fresh
    model (checkpoints). ``method`` is the method's config; ``input_spec`` the example inputs'
    shapes and dtypes (None when they were not plain tensors)."""

    method: MethodConfig
    structure: str
    sparsity: float
    distribution: str
    total_steps: int | None
    exclude: tuple[str, ...] = ()
    budget: dict[str, float] | None = None
    input_spec: list[tuple[tuple[int, ...], str]] | None = None
    normalised_widths: bool = False


class SparseModel(nn.Module):
    """A traced model whose sparse layers take their weights through mask nodes.

    Call :meth:`step` after every ``optimizer.step()``; :meth:`attach` the optimizer so
    the state of pruned and regrown weights is reset. Invariant: after every step each
    layer keeps exactly its target number of active weights (N per group of M for
    N:M), and pruned weights are zero.

    Built complete by ``sparsify``: the frozen :class:`MethodContext` the method received
    (``context``), the method's handler (``method``) and the call that made it (``spec``);
    ``mode_graphs`` (the masked eval and training graphs) when the model's code differs
    between modes, and the ``example_inputs`` that :meth:`compact` checks its result on."""

    def __init__(self, context: MethodContext, method: Method, spec: SparsifySpec, *,
                 mode_graphs: tuple[fx.GraphModule, fx.GraphModule] | None = None,
                 example_inputs: tuple | None = None):
        super().__init__()
        self.graph = context.graph
        self.context = context
        self.method = method
        self.spec = spec
        # (eval graph, training graph) when the model's code differs between modes (dropout with
        # training=self.training, auxiliary heads): forward runs the one of the current mode.
        # Not registered: both share ``graph``'s submodules, parameters and masks.
        self._mode_graphs = mode_graphs
        self._example_inputs = example_inputs  # compact() runs the compact model on them once
        self.step_count = 0
        self.metrics: list[dict] = []
        self.checkpoint_extra: Any = None  # the user data of the checkpoint it was loaded from (spruce.load)
        self._optimizer: torch.optim.Optimizer | None = None
        self._stale_watch = StaleOptimizerWatch()
        self.loss_guard = LossGuard(guard_window(context.total_steps), method.name)

    # ---- what sparsify set up (read-only) ------------------------------------------------
    @property
    def layers(self) -> tuple[SparseLayer, ...]:
        return self.context.layers

    @property
    def units(self) -> tuple[ChannelUnit, ...]:
        """The channel masks (structure="channel")."""
        return self.context.units

    @property
    def analysis(self) -> ChannelAnalysis | None:
        return self.context.analysis

    @property
    def structure(self) -> str:
        """``unstructured``, ``channel`` or ``n:m`` (with :attr:`n` and :attr:`m`)."""
        return self.context.structure.kind

    @property
    def n(self) -> int:
        return self.context.structure.n

    @property
    def m(self) -> int:
        return self.context.structure.m

    @property
    def distribution(self) -> str:
        return self.context.distribution

    @property
    def total_steps(self) -> int | None:
        return self.context.total_steps

    @property
    def sparsity(self) -> float:
        return self.context.sparsity

    @property
    def budget(self) -> dict[str, float] | None:
        return self.spec.budget

    @property
    def latency_table(self) -> Any:
        return self.context.latency_table

    @property
    def exclude(self) -> tuple[str, ...]:
        return self.spec.exclude

    @property
    def input_spec(self) -> list[tuple[tuple[int, ...], str]] | None:
        return self.spec.input_spec

    # ---- training-loop API -----------------------------------------------------
    def forward(self, *args, **kwargs):
        capture = self.training and torch.is_grad_enabled() and self.method.wants_dense_grad(self.step_count + 1)
        for layer in self.layers:
            layer.masked.capture_dense_grad = capture
        graph = self.graph if self._mode_graphs is None else self._mode_graphs[int(self.training)]
        with masked_norms(graph, self.norm_keeps()):
            return graph(*args, **kwargs)

    def norm_keeps(self) -> dict[str, torch.Tensor]:
        """structure="channel" with ``normalised_widths``: for every LayerNorm / RMSNorm weight
        (by name) a channel unit masks, a bool per channel, True where kept; the forward
        computes those norms over the kept channels (:mod:`spruce.passes.maskednorm`), as
        the compact model does. Empty otherwise."""
        analysis = self.context.analysis
        if analysis is None or not self.units or not analysis.analyzer.norm_spaces:
            return {}
        names = self.__dict__.get("_norm_weights")
        if names is None:  # the analysis does not change: read once
            names = self.__dict__["_norm_weights"] = analysis.norm_weights()
        keeps: dict[str, torch.Tensor] = {}
        for unit in self.units:
            dead = ~unit.mask.numpy()
            if not names or not dead.any():
                continue
            for member in unit.group.members:
                if member.name in names:
                    keep = keeps.setdefault(member.name, torch.ones(names[member.name], dtype=torch.bool))
                    keep[torch.as_tensor(member.index[dead].reshape(-1))] = False
        return keeps

    def attach(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None = None,
               loader: Sized | None = None) -> SparseModel:
        """Reset the optimizer state of weights that are pruned or regrown at each update.

        ``steps_per_epoch`` (optional): optimizer steps in one epoch, for methods whose
        schedule counts epochs (OptG) when ``sparsify`` was not given it; or ``loader``, whose
        ``len()`` is taken as that (one optimizer step per batch). Raises ``ValueError``, before
        any training, when the method needs a value it still lacks (OptG without an epoch
        length), or for a ``steps_per_epoch`` that is not a positive integer or disagrees.

        Warns (:class:`StaleOptimizerWarning`) when ``optimizer`` does not hold the weights of
        every trainable sparse layer: built on other tensors (a copy of the model, a model
        from before a compact()), it would update nothing there."""
        if loader is not None:
            length = _loader_length(loader)
            if length is None:
                if "steps_per_epoch" in self.method.config.needs and steps_per_epoch is None:
                    raise ValueError(f"attach: the loader ({type(loader).__name__}) has no len(): pass "
                                     "steps_per_epoch= (optimizer steps per epoch)")
            elif steps_per_epoch is not None and steps_per_epoch != length:
                raise ValueError(f"attach: steps_per_epoch={steps_per_epoch!r} disagrees with len(loader)={length}")
            else:
                steps_per_epoch = length
        if steps_per_epoch is not None:
            if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
                raise ValueError(f"attach: steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
            self.method.set_steps_per_epoch(steps_per_epoch)
        self.method.attach(optimizer)
        held = _held_by(optimizer)
        missing = [layer.name for layer in self.layers
                   if layer.module.weight.requires_grad and id(layer.module.weight) not in held]
        if missing:
            warnings.warn(StaleOptimizerWarning(
                f"attach: the optimizer does not hold the weights of {len(missing)} of the {len(self.layers)} "
                f"sparse layers ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}), so training "
                f"updates nothing there: {_OPTIMIZER_REMEDY}"), stacklevel=2)
        self._stale_watch.stop()
        self._optimizer = optimizer
        return self

    def end_epoch(self) -> None:
        """Tell the method an epoch of the training loop ended (after its last ``step()``).

        Optional: a hook for methods that act at epoch ends (:meth:`Method.on_epoch_end`); the
        built-in ones ignore it (OptG takes its epoch length at :meth:`attach`). Collective under
        torch.distributed, like :meth:`step`."""
        step = self.step_count
        if self.method.on_epoch_end(step):
            self._update(step, due=True)

    def _watch_optimizer(self, model: nn.Module) -> None:
        """After ``compact()`` / ``fold()``: watch the attached optimizer for being used on
        ``model``, whose parameters it does not hold (:class:`StaleOptimizerWatch`)."""
        if self._optimizer is not None:
            self._stale_watch.watch(self._optimizer, model)

    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """Advance one optimizer step: run the method's update, keep pruned weights at zero.

        ``loss`` (optional): this step's training loss (a float or a one-element tensor). Given,
        it feeds :attr:`loss_guard`, which warns (:class:`~spruce.passes.sparsity.loss_guard.
        LossAboveStartWarning`, once) when the loss stays above its level over the run's first
        steps for a sustained window: a diverging or collapsed run.

        Under torch.distributed (DDP) this is a collective: captured gradients are averaged
        over ranks first and rank 0's update is broadcast, so masks agree on every rank."""
        if loss is not None:
            self.loss_guard.observe(loss)
        self.step_count += 1
        step = self.step_count
        average_captured_grads(self.layers)
        self.method.on_step(step)
        self._update(step, self.method.is_update(step))

    def _update(self, step: int, due: bool) -> None:
        """The method's update after step ``step`` when ``due``; then pruned weights to zero,
        optimizer state reset for flipped weights, metrics."""
        completes = due and self.method.completes_update(step)
        if due:  # name a corrupt layer before its NaNs reach other layers' scores through gradients
            for layer in self.layers:
                check_finite(layer.module.weight.detach(), layer, "weight")
        before = [layer.masked.mask.clone() for layer in self.layers] if due else []
        changed = due and self.method.update(step)
        if due:
            changed = sync_from_rank0(self.layers, self.units, self.method, changed)
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
                self._record(step)

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

    # ---- channels ------------------------------------------------------------------------
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
        compact = remove_channels(self.analysis, self.context.source, self.kept_channels())
        if self._example_inputs is not None:
            check_runs(compact, self._example_inputs, self.context.source, "compact model")
        self._watch_optimizer(compact)
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
        folded = copy.deepcopy(self.context.source)
        modules = dict(folded.named_modules())
        with torch.no_grad():
            for layer in self.layers:
                modules[layer.name].weight.copy_(layer.masked(layer.module.weight) * layer.masked.mask)
        install_masked_norms(folded, self.norm_keeps())
        self._watch_optimizer(folded)
        return folded

    # ---- state --------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        tracked = [{k: getattr(layer, k) for k in TRACKED} for layer in self.layers]
        return {"step_count": self.step_count, "method": self.method.state_dict(), "metrics": self.metrics,
                "layers": tracked, "channels": [u.mask.clone() for u in self.units],
                "loss_guard": self.loss_guard.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self.method.load_state_dict(state["method"])
        self.metrics = state["metrics"]
        for layer, tracked in zip(self.layers, state["layers"]):
            for key, value in tracked.items():
                setattr(layer, key, value)
        for unit, mask in zip(self.units, state.get("channels", [])):
            unit.mask.copy_(mask)
        if "loss_guard" in state:  # checkpoints from before the guard start it afresh
            self.loss_guard.load_state_dict(state["loss_guard"])


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
            if isinstance(module, ParametrizationList):  # weight_norm, spectral_norm, orthogonal, ...
                owner, _, tensor = name.rpartition(".parametrizations.")
                kinds = ", ".join(type(p).__name__.lstrip("_") for p in module)
                out.append(f"{owner} (its {tensor} is computed in forward by a parametrization: {kinds})")
                continue
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


def check_options(method: str | MethodConfig | Mapping[str, Any], structure: str, sparsity: float,
                  total_steps: int | None, method_options: Mapping[str, Any] | None = None,
                  distribution: str = DEFAULT_DISTRIBUTION, budget: Mapping[str, float] | None = None,
                  ) -> tuple[MethodConfig, Structure, Budget | None]:
    """Validate the options of :func:`sparsify_captured` before any graph work.

    Returns the method's config (from a config object, a name with ``method_options``, or
    a ``{"name": ...}`` mapping) scaled to the run when ``total_steps`` is given (the
    defaults of the options the user did not set, :meth:`MethodConfig.for_run`, as
    ``spruce compile`` scales them; kept channel counts are not rounded to kernel widths
    here), the parsed structure and budget. Raises ``ValueError`` naming the option at
    fault, also for a config that cannot fit the run (:meth:`MethodConfig.check_fits`)."""
    config = resolve_method(method, method_options)
    parsed, parsed_budget = check_combination(config, structure, sparsity, distribution, budget)
    config.check_run(total_steps)
    if total_steps is not None:
        run = RunLength(total_steps, structure=parsed.kind, kernel_widths=False)
        config = config.for_run(run)
        config.check_fits(run)
    return config, parsed, parsed_budget


def check_normalised_widths(value: object, structure: Structure) -> None:
    """``normalised_widths`` is a bool, and True only with structure="channel" (norm widths are
    channels). Raises ``ValueError`` naming the option."""
    if not isinstance(value, bool):
        raise ValueError(f"normalised_widths must be True or False, got {short_repr(value)}")
    if value and structure.kind != "channel":
        raise ValueError(f"normalised_widths=True prunes norm widths: it needs structure='channel', "
                         f"got {str(structure)!r}")


def check_combination(config: MethodConfig, structure: str, sparsity: float, distribution: str = DEFAULT_DISTRIBUTION,
                      budget: Mapping[str, float] | None = None) -> tuple[Structure, Budget | None]:
    """Check that ``config``'s method supports ``structure`` and ``budget`` (its declared
    capabilities) and that the numbers are in range; returns the parsed structure and
    budget. Needs no model and no run length, so recipes call it when they load."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {short_repr(sparsity)}")
    parsed = Structure.parse(structure)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if parsed.kind not in config.structures:
        valid = [name for name, cls in _configs().items() if parsed.kind in cls.structures]
        raise ValueError(f"method {config.name!r} does not support structure={str(parsed)!r}; use structure="
                         + " or ".join(repr(s) for s in config.structures)
                         + f" (methods for {parsed.kind}: {', '.join(valid)})")
    parsed_budget = None
    if budget is not None:
        if not config.budgeted:
            raise ValueError(f"method {config.name!r} takes no budget; use one of: "
                             f"{', '.join(n for n, cls in _configs().items() if cls.budgeted)}")
        if parsed.kind != "channel":
            raise ValueError(f"{config.name}: a cost budget selects channels: use structure='channel' "
                             "(unstructured and N:M sparsity take sparsity=)")
        parsed_budget = Budget.parse(dict(budget))
    elif parsed.kind == "channel" and config.budgeted:
        raise ValueError(f"{config.name} with structure='channel' needs a budget: sparsify(..., "
                         "budget={'latency': f}, latency_table=spruce.profile(...)) or {'flops': f} / "
                         "{'params': f}, f a fraction of the dense model")
    elif parsed.kind == "channel" and distribution != "uniform":
        raise ValueError("structure='channel' removes the same fraction of every channel group: "
                         "use distribution='uniform'")
    return parsed, parsed_budget


def _configs() -> dict[str, type[MethodConfig]]:
    from .method import METHODS

    return {name: METHODS[name].Config for name in method_names()}


def sparsify_captured(
    captured: CapturedGraph,
    method: str | MethodConfig | Mapping[str, Any] = SPARSIFY_DEFAULT,
    structure: str = "unstructured",
    sparsity: float = 0.9,
    distribution: str = DEFAULT_DISTRIBUTION,
    total_steps: int | None = None,
    exclude: Iterable[str] = (),
    budget: dict[str, float] | None = None,
    latency_table: object = None,
    normalised_widths: bool = False,
    **method_options,
) -> SparseModel:
    """Insert mask nodes for every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear weight of
    ``captured.root`` and set up ``method`` (see ``spruce.sparsify``, which captures the model
    and calls this).

    ``normalised_widths`` (structure="channel" only) lets the widths LayerNorm / RMSNorm
    normalise over prune: the model then trains with masked norms (statistics over the kept
    channels; :meth:`SparseModel.norm_keeps`), which is what :meth:`SparseModel.compact` computes.

    ``method`` is a method config (``IEEConfig(h=150)``), or a method name with its options
    as keyword arguments. The returned :class:`SparseModel` shares its parameters with
    ``captured.root``: build the optimizer from either. ``budget`` ({"latency": f} with
    ``latency_table`` from ``spruce.profile``, {"flops": f} or {"params": f}; f a fraction of
    dense) drives the budgeted channel methods (halp, iee with structure="channel") instead
    of ``sparsity``. Every layer left dense, and every channel group kept whole because a
    dense weight reads it, is named in a warning. Every layer keeps at least one weight.
    Raises ``ValueError`` naming the option at fault (a ``uniform`` sparsity that would empty
    a layer names the layer and the highest feasible sparsity), and for a model that was not
    captured by plain fx (masks go on its module calls)."""
    exclude = tuple(exclude)
    config, parsed, parsed_budget = check_options(method, structure, sparsity, total_steps, method_options,
                                                  distribution, budget)
    check_normalised_widths(normalised_widths, parsed)
    if captured.method != "fx":
        raise ValueError(f"sparsify needs a model plain torch.fx can trace (masks go on its module calls); "
                         f"{type(captured.root).__name__} was captured by {captured.method}"
                         + (f" ({'; '.join(captured.notes)})" if captured.notes else "")
                         + ": use spruce.prune for one-shot channel pruning of it")
    model, example_inputs = captured.root, captured.example_inputs
    # masks go into copies: the captured graphs stay what the analysis and channel removal read
    graphs = [fx.GraphModule(model, copy.deepcopy(g.graph), type(model).__name__) for g in captured.graphs]
    piece = dataclasses.replace(captured.pieces[0], eval=graphs[0], train=graphs[1] if len(graphs) > 1 else None)
    traced = dataclasses.replace(captured, pieces=[piece])
    chosen = _select_layers(model, traced.graphs, parsed.kind, parsed.m, exclude)
    if not chosen:
        raise ValueError("sparsify: the model has no Conv/Linear layer to sparsify")
    if parsed.kind == "n:m":
        densities = [parsed.n / parsed.m] * len(chosen)
    elif parsed.kind == "channel":  # every channel unit keeps at least one channel
        densities = [1.0 - sparsity] * len(chosen)
    else:
        densities = layer_densities([tuple(mod.weight.shape) for _, mod in chosen], sparsity, distribution,
                                    [name for name, _ in chosen])
    masks = {name: MaskedWeight(torch.ones_like(mod.weight, dtype=torch.bool)) for name, mod in chosen}
    norms = _following_batchnorms(traced.eval, masks)
    for graph in traced.graphs:
        insert_masks(graph, masks)
    # the registered graph is the one of the model's mode now (its parameters, its state_dict keys)
    gm = traced.train if model.training and traced.train is not None else traced.eval
    layers = tuple(SparseLayer(name, mod, masks[name], d, batchnorm=norms.get(name))
                   for (name, mod), d in zip(chosen, densities))
    analysis, units = None, ()
    if parsed.kind == "channel":
        analysis = analyze(captured, normalised_widths=normalised_widths, hand_written_norms=False)
        found, left_out = channel_units(analysis, list(layers), 1.0 - sparsity)
        units = tuple(found)
        if left_out:
            warnings.warn("sparsify: channel groups kept whole: " + ", ".join(left_out), stacklevel=3)
        if not units:
            raise ValueError("structure='channel': the model has no prunable channel group"
                             + (f" whose weights are all masked ({len(left_out)} left out, see the warning)"
                                if left_out else ""))
    context = MethodContext(source=model, graph=gm, layers=layers, structure=parsed, distribution=distribution,
                            sparsity=float(sparsity), total_steps=total_steps, units=units, analysis=analysis,
                            budget=parsed_budget, latency_table=latency_table)
    spec = SparsifySpec(method=config, structure=str(parsed), sparsity=float(sparsity), distribution=distribution,
                        total_steps=total_steps, exclude=exclude, budget=None if budget is None else dict(budget),
                        input_spec=_input_spec(example_inputs), normalised_widths=normalised_widths)
    handler = config.build()
    sm = SparseModel(context, handler, spec,
                     mode_graphs=None if traced.train is None else (traced.eval, traced.train),
                     example_inputs=tuple(example_inputs))
    handler.initialize(context)
    sync_from_rank0(sm.layers, sm.units, sm.method)  # one initial mask on every rank (no-op outside torch.distributed)
    sm.apply_masks()
    return sm.train(model.training)
