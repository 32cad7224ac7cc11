"""One-shot structured pruning: analyse, score, choose, remove."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..capture.batch import adapter_for
from ..capture.preserve import preserved_state
from ..capture.shapes import failing_node
from ..capture.transformers import mask_experts, moe_blocks
from ..passes.analysis import ChannelAnalysis, ChannelGroup
from ..passes.export import batch_literals, check_runs, mask_channels, remove_channels
from ..passes.graph import require_data, split_inputs
from ..passes.importance import GRADIENT_CRITERIA, importance_scores, param_table
from ..passes.sparsity.count_rules import CountRule, fit_counts
from .options import PruneConfig
from .transformers import hidden_width_rule
from .verbs import analyze_model, gc_paused

__all__ = ["PruneConfig", "PruneResult", "keep_top_channels", "prune"]


@dataclass
class PruneResult:
    """``model``: compact model; ``masked``: the original architecture with the removed
    channels zeroed (built on first access, from the model as it is then); the two
    compute the same function.
    ``kept[group.id]`` lists the kept channel indices of each pruned group (groups absent
    keep everything). Under ``normalised_widths`` the masked model computes a pruned
    LayerNorm / RMSNorm over the kept channels, so it (and the compact model) no longer
    computes the unpruned function even where no weight removed mattered:
    :meth:`errors` measures both distances."""

    model: nn.Module
    groups: list[ChannelGroup]
    kept: dict[int, np.ndarray]
    analysis: ChannelAnalysis
    source: nn.Module = field(repr=False)
    _masked: nn.Module | None = field(default=None, repr=False)
    example_inputs: object = field(default=None, repr=False)

    @property
    def masked(self) -> nn.Module:
        if self._masked is None:
            masked = mask_channels(self.analysis, self.source, self.kept)
            routers = [f"{name}.gate.weight" if name else "gate.weight" for name in moe_blocks(self.source)]
            keeps = {name: self.analysis.kept_entries(self.kept, name, 0) for name in routers}
            self._masked = mask_experts(masked, {k: v for k, v in keeps.items() if v is not None})
        return self._masked

    def errors(self, inputs: object = None) -> dict[str, float]:
        """The compact model's largest relative error (max |a - b| over the reference's
        scale, at least 1; see :func:`spruce.api.checks.head_error`) on ``inputs``
        (default: the example ``prune`` was given), all models in eval mode: ``"masked"``
        against the masked model (float rounding only: the exactness invariant) and
        ``"dense"`` against the unpruned model (what pruning changed). Models keep their mode."""
        from .checks import head_error

        inputs = self.example_inputs if inputs is None else inputs
        if inputs is None:
            raise ValueError("errors: no inputs given and no example recorded")
        models = (self.model, self.masked, self.source)
        modes = [m.training for m in models]
        try:
            return {"masked": head_error(self.masked, self.model, self.analysis.captured, inputs),
                    "dense": head_error(self.source, self.model, self.analysis.captured, inputs)}
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)


_DEFAULTS = PruneConfig()


def _validate(ratio: float, importance: str, round_to: int | None, gqa: str = _DEFAULTS.gqa,
              normalised_widths: bool = _DEFAULTS.normalised_widths) -> None:
    PruneConfig(ratio=ratio, importance=importance, round_to=round_to, gqa=gqa,
                normalised_widths=normalised_widths)


def _ignored_members(model: nn.Module, ignore: Iterable[object]) -> set[tuple[str, int]]:
    """(tensor name, dim) pairs whose channels must stay: the *output* channels of each
    ignored module (given as a name, a module or a module type), or every dim of an
    ignored parameter name. Inputs of an ignored module may still shrink."""
    modules = dict(model.named_modules())
    tensors = dict(model.named_parameters())
    chosen: list[str] = []
    pinned: set[tuple[str, int]] = set()
    for item in ignore:
        if isinstance(item, str) and item in tensors:
            pinned.update((item, d) for d in range(tensors[item].dim()))
        elif isinstance(item, str) and item in modules:
            chosen.append(item)
        elif isinstance(item, str):
            raise ValueError(f"ignore: {item!r} is neither a module nor a parameter of the model")
        elif isinstance(item, nn.Module):
            chosen.extend(n for n, m in modules.items() if m is item)
        elif isinstance(item, type):
            chosen.extend(n for n, m in modules.items() if isinstance(m, item))
        else:
            raise TypeError(f"ignore entries must be names, modules or module types, got {item!r}")
    for name in chosen:
        module = modules[name]
        out_dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
        prefix = f"{name}." if name else ""
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for pname, tensor in own:
            pinned.add((prefix + pname, out_dim if tensor.dim() > 1 else 0))
    return pinned


def keep_top_channels(
    model: nn.Module,
    groups: list[ChannelGroup],
    ratio: float,
    importance: str = _DEFAULTS.importance,
    round_to: int | None = _DEFAULTS.round_to,
    ignore: Iterable[object] = (),
    seed: int = 0,
    calibration: Iterable[object] | None = None,
    rule: CountRule | None = None,
) -> dict[int, np.ndarray]:
    """Kept channel indices per prunable group: the top ``1 - ratio`` by importance
    (at least one channel; rounded up to a multiple of ``round_to``). Groups that the
    rounding alone leaves whole (too few channels for ``round_to``) are named in a warning.
    Gradient criteria (``taylor``, ``taylor_bn``) read gradients over ``calibration`` (a
    list of inputs in ``prune``'s formats; see :func:`calibration_gradients`) where given,
    else the ``.grad`` the parameters already hold. ``rule`` (a
    :class:`~spruce.passes.sparsity.count_rules.CountRule`, e.g.
    :func:`~spruce.api.transformers.hidden_width_rule`) then moves its group's count to the
    nearest one it accepts (:func:`~spruce.passes.sparsity.count_rules.fit_counts`)."""
    _validate(ratio, importance, round_to)
    ignored = _ignored_members(model, ignore)
    params = param_table(model)
    grads = contextlib.nullcontext()  # without calibration, gradient criteria read the .grad already there
    if importance in GRADIENT_CRITERIA and calibration is not None:
        grads = calibration_gradients(model, list(calibration))
    rng = np.random.default_rng(seed)
    kept: dict[int, np.ndarray] = {}
    rounded_whole: list[str] = []
    counts: dict[int, int] = {}
    for group in groups:
        if not group.prunable or any((m.name, m.dim) in ignored for m in group.members):
            continue
        n_keep = max(group.min_keep, math.ceil(round((1.0 - ratio) * group.size, 6)))
        if round_to and n_keep < group.size:
            n_keep = min(group.size, math.ceil(n_keep / round_to) * round_to)
            if n_keep >= group.size:
                named = next((m for m in group.members if m.name.endswith("weight")), group.members[0])
                rounded_whole.append(f"group {group.id} ({named.name} dim {named.dim}, {group.size} channels)")
        counts[group.id] = n_keep
    if rule is not None and rule.group in counts:
        moved = next(g for g in groups if g.id == rule.group)
        every = {**{g.id: g.size for g in groups if g.prunable}, **counts}
        counts[rule.group] = fit_counts(every, rule, moved.size, moved.min_keep, round_to or 1)[rule.group]
    with grads:
        for group in groups:
            n_keep = counts.get(group.id, group.size)
            if n_keep >= group.size:
                continue
            scores = importance_scores(importance, group, params, rng)
            order = np.argsort(-scores, kind="stable")
            kept[group.id] = np.sort(order[:n_keep])
    if rounded_whole:
        warnings.warn(f"round_to={round_to} leaves {len(rounded_whole)} group(s) unpruned: keeping "
                      f"{1.0 - ratio:g} of their channels rounds up to all of them: {', '.join(rounded_whole)}",
                      stacklevel=2)
    return kept


@contextlib.contextmanager
def calibration_gradients(model: nn.Module, batches: list[object]) -> Iterator[None]:
    """While open, every parameter's ``.grad`` is the gradient of the loss summed over
    ``batches`` (eval mode): the model's own ``loss`` output where it returns one (a
    transformers model given ``labels``), else half the mean squared output. The
    parameters' previous ``.grad`` and the model's mode are restored on exit."""
    if not batches:
        raise ValueError("a gradient criterion needs calibration inputs (at least one batch)")
    params = [p for _, p in model.named_parameters()]
    saved = [p.grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            for batch in batches:
                args, kwargs = split_inputs(batch)
                out = model(*args, **kwargs)
                loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
                if not isinstance(loss, torch.Tensor):
                    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
                    loss = sum(0.5 * t.float().pow(2).mean() for t in leaves if t.is_floating_point())
                loss.backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        model.train(was_training)
        yield
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
        model.train(was_training)


def prune(
    model: nn.Module,
    example_inputs: object,
    ratio: float = _DEFAULTS.ratio,
    importance: str = _DEFAULTS.importance,
    round_to: int | None = _DEFAULTS.round_to,
    ignore: Iterable[object] = (),
    leaf_modules: Iterable[object] = (),
    seed: int = 0,
    dynamic_shapes: object = None,
    gqa: str = _DEFAULTS.gqa,
    calibration: Iterable[object] | None = None,
    normalised_widths: bool = _DEFAULTS.normalised_widths,
) -> PruneResult:
    """Remove ``ratio`` of the channels of every prunable group, least important first.

    ``example_inputs`` is a tensor, a tuple of positional arguments or a dict of keyword
    arguments; the batch stays dynamic, other dims where ``dynamic_shapes`` (torch.export's
    format) declares them. Channels reaching a graph output or eager code are never removed.
    Attention prunes whole heads; under grouped-query attention ``gqa="query_heads"`` removes
    the same query heads from every key/value group, ``gqa="kv_groups"`` whole key/value
    groups with their query heads (either way ``num_attention_heads % num_key_value_heads``
    stays 0). ``importance="taylor"`` scores channels (whole heads: their query, key, value
    and output entries together) by |sum w * dL/dw| over ``calibration`` inputs (default: the
    example; give a transformers model ``labels`` there for its own loss).
    ``normalised_widths=True`` prunes the widths LayerNorm / RMSNorm normalise over (the
    residual width of a transformer, with its embeddings), else pinned: the masked model
    computes those norms over the kept channels, so the compact model equals it but no
    longer the unpruned model (:meth:`PruneResult.errors` measures how far); for a transformers
    model the residual width then keeps a count its config takes beside the kept heads
    (:func:`~spruce.api.transformers.hidden_width_rule`: a ``LlamaConfig`` wants a multiple of
    ``num_attention_heads``), so the result writes back (:func:`~spruce.api.transformers.to_transformers`).
    The compact model is run once on ``example_inputs`` and checked to run at a second batch
    size before it is returned. Raises ``ValueError`` for a ratio outside [0, 1) or an unknown
    importance (listing the valid ones), :class:`spruce.TraceError` for a model that cannot be
    captured, and :class:`~spruce.passes.export.CompactModelError` naming the node when the
    compact model cannot run on the example input."""
    _validate(ratio, importance, round_to, gqa, normalised_widths)
    require_data(model, example_inputs, "prune")
    calibration = [example_inputs] if calibration is None else list(calibration)
    if importance in GRADIENT_CRITERIA and not calibration:
        raise ValueError(f"importance {importance!r} needs calibration inputs (at least one batch)")
    with gc_paused():
        analysis = analyze_model(model, example_inputs, leaf_modules, dynamic_shapes=dynamic_shapes, gqa=gqa,
                                 normalised_widths=normalised_widths)
        rule = hidden_width_rule(model, analysis.groups) if normalised_widths else None
        kept = keep_top_channels(model, analysis.groups, ratio, importance, round_to, ignore, seed, calibration, rule)
        compact = remove_channels(analysis, model, kept)
        args, kwargs = split_inputs(example_inputs)
        check_runs(compact, args, model, "pruned model", kwargs)
        check_second_batch(compact, analysis)
    return PruneResult(compact, analysis.groups, kept, analysis, source=model, example_inputs=example_inputs)


class SecondBatchError(RuntimeError):
    """The compact model does not run when the example's batch size changes (a user error:
    a batch size written into the model's code, or an example input whose dim 0 is no batch)."""


def check_second_batch(compact: nn.Module, analysis: ChannelAnalysis) -> None:
    """Check that ``compact`` runs at the captured second batch size (dim 0 of every input
    changed). A plain-fx graph is symbolic in every size its code reads, so a literal batch
    size in a size argument is read from the analysis first (no run) and named. Every graph
    then runs at the second batch size (shapes only, on meta tensors, where possible): an
    unbatched example input, whose dim 0 is a feature size, fails here.
    Raises :class:`SecondBatchError` (a ``RuntimeError``) naming the node at fault."""
    captured = analysis.captured
    if captured.second_inputs is None:
        return
    if captured.method == "fx":
        batch = adapter_for(captured.root).batch_size(captured.example_inputs, captured.example_kwargs)
        baked = batch_literals(analysis, batch) if batch else []
        if baked:
            raise SecondBatchError(f"the compact model does not run at a second batch size: node '{baked[0]}' "
                                   f"writes the example's batch size {batch} into its size argument")
    args, kwargs = captured.second_inputs
    was_training = compact.training
    compact.eval()
    try:
        if captured.whole and _runs_on_meta(compact, args, kwargs):  # eager glue may cache what it computes
            return
        with torch.no_grad(), preserved_state(compact):
            compact(*args, **kwargs)
    except Exception as exc:
        where = f" at node '{failing_node(exc)}'" if failing_node(exc) else ""
        raise SecondBatchError(f"the compact model does not run at a second batch size{where} (is dim 0 of the "
                               f"example input its batch?): {type(exc).__name__}: {exc}") from exc
    finally:
        compact.train(was_training)


def _runs_on_meta(compact: nn.Module, args: tuple, kwargs: dict) -> bool:
    from torch.nn.utils.stateless import _reparametrize_module

    # one name per (module, attribute), shared modules (a ModeSwitch's two graphs) once: torch
    # restores a module reached under two names from whichever name it swapped last, the meta
    # tensor. A tensor tied between two modules gets one meta tensor under both names.
    metas: dict[int, torch.Tensor] = {}
    state = {}
    for prefix, module in compact.named_modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is not None:
                meta = metas.setdefault(id(t), torch.empty_like(t, device="meta"))
                state[f"{prefix}.{name}" if prefix else name] = meta
    meta_args, meta_kwargs = pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v,
                                             (args, kwargs))
    try:
        with torch.no_grad(), preserved_state(compact), _reparametrize_module(compact, state), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compact(*meta_args, **meta_kwargs)
        return True
    except Exception:  # noqa: BLE001 - an op without a meta kernel: run for real
        return False
