"""One-shot structured pruning: analyse, score, choose, remove."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from spruce.compiler.api import analyze_model
from spruce.compiler.capture import _failing_node, adapter_for, preserved_state
from spruce.passes.analysis import GQA_MODES, ChannelAnalysis, ChannelGroup
from spruce.passes.export import batch_literals, mask_channels, remove_channels
from spruce.passes.importance import IMPORTANCE, importance_scores, param_table
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["PruneResult", "prune", "select_channels"]


@dataclass
class PruneResult:
    """``model``: compact model; ``masked``: the original architecture with the removed
    channels zeroed (built on first access, from the model as it is then); the two
    compute the same function.
    ``kept[group.id]`` lists the kept channel indices of each pruned group (groups absent
    keep everything)."""

    model: nn.Module
    groups: list[ChannelGroup]
    kept: dict[int, np.ndarray]
    analysis: ChannelAnalysis
    source: nn.Module = field(repr=False)
    _masked: nn.Module | None = field(default=None, repr=False)

    @property
    def masked(self) -> nn.Module:
        if self._masked is None:
            self._masked = mask_channels(self.analysis, self.source, self.kept)
        return self._masked


def _validate(ratio: float, importance: str, round_to: int | None) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; valid: {', '.join(sorted(IMPORTANCE))}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")


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


def select_channels(
    model: nn.Module,
    groups: list[ChannelGroup],
    ratio: float,
    importance: str = "l1",
    round_to: int | None = None,
    ignore: Iterable[object] = (),
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Kept channel indices per prunable group: the top ``1 - ratio`` by importance
    (at least one channel; rounded up to a multiple of ``round_to``)."""
    _validate(ratio, importance, round_to)
    ignored = _ignored_members(model, ignore)
    params = param_table(model)
    rng = np.random.default_rng(seed)
    kept: dict[int, np.ndarray] = {}
    for group in groups:
        if not group.prunable or any((m.name, m.dim) in ignored for m in group.members):
            continue
        n_keep = max(1, math.ceil(round((1.0 - ratio) * group.size, 6)))
        if round_to:
            n_keep = min(group.size, math.ceil(n_keep / round_to) * round_to)
        if n_keep >= group.size:
            continue
        scores = importance_scores(importance, group, params, rng)
        order = np.argsort(-scores, kind="stable")
        kept[group.id] = np.sort(order[:n_keep])
    return kept


def prune(
    model: nn.Module,
    example_inputs: object,
    ratio: float = 0.5,
    importance: str = "l1",
    round_to: int | None = None,
    ignore: Iterable[object] = (),
    leaf_modules: Iterable[object] = (),
    seed: int = 0,
    dynamic_shapes: object = None,
    gqa: str = "query_heads",
) -> PruneResult:
    """Remove ``ratio`` of the channels of every prunable group, least important first.

    ``example_inputs`` is a tensor, a tuple of positional arguments or a dict of keyword
    arguments; the batch stays dynamic, other dims where ``dynamic_shapes`` (torch.export's
    format) declares them. Channels reaching a graph output or eager code are never removed.
    Attention prunes whole heads; under grouped-query attention ``gqa="query_heads"`` removes
    the same query heads from every key/value group, ``gqa="kv_groups"`` whole key/value
    groups with their query heads (either way ``num_attention_heads % num_key_value_heads``
    stays 0).
    The compact model is checked to run at a second batch size. Raises ``ValueError`` for a
    ratio outside [0, 1) or an unknown importance (listing the valid ones), and
    :class:`spruce.TraceError` for a model that cannot be captured."""
    _validate(ratio, importance, round_to)
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {', '.join(GQA_MODES)}, got {gqa!r}")
    analysis = analyze_model(model, example_inputs, leaf_modules, dynamic_shapes=dynamic_shapes, gqa=gqa)
    kept = select_channels(model, analysis.groups, ratio, importance, round_to, ignore, seed)
    compact = remove_channels(analysis, model, kept)
    check_second_batch(compact, analysis)
    return PruneResult(compact, analysis.groups, kept, analysis, source=model)


def check_second_batch(compact: nn.Module, analysis: ChannelAnalysis) -> None:
    """Check that ``compact`` runs at the captured second batch size. A plain-fx graph is
    symbolic in every size its code reads, so only a literal batch size in a size argument
    can fix it: that is read from the analysis (no run). Graphs from torch.export, and
    models captured in pieces, run at the second batch size (shapes only, on meta
    tensors, where possible). Raises ``RuntimeError`` naming the node at fault."""
    captured = analysis.captured
    if captured.second_inputs is None:
        return
    if captured.method == "fx":
        batch = adapter_for(captured.root).batch_size(captured.example_inputs, captured.example_kwargs)
        baked = batch_literals(analysis, batch) if batch else []
        if baked:
            raise RuntimeError(f"the compact model does not run at a second batch size: node '{baked[0]}' writes "
                               f"the example's batch size {batch} into its size argument")
        return
    args, kwargs = captured.second_inputs
    was_training = compact.training
    compact.eval()
    try:
        if captured.whole and _runs_on_meta(compact, args, kwargs):  # eager glue may cache what it computes
            return
        with torch.no_grad(), preserved_state(compact):
            compact(*args, **kwargs)
    except Exception as exc:
        where = f" at node '{_failing_node(exc)}'" if _failing_node(exc) else ""
        raise RuntimeError(f"the compact model does not run at a second batch size{where}: "
                           f"{type(exc).__name__}: {exc}") from exc
    finally:
        compact.train(was_training)


def _runs_on_meta(compact: nn.Module, args: tuple, kwargs: dict) -> bool:
    from torch.nn.utils.stateless import _reparametrize_module

    named = list(compact.named_parameters()) + list(compact.named_buffers())  # tied tensors once: tie_weights
    state = {name: torch.empty_like(t, device="meta") for name, t in named}
    meta_args, meta_kwargs = pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v,
                                             (args, kwargs))
    try:
        with torch.no_grad(), preserved_state(compact), _reparametrize_module(compact, state, tie_weights=True), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compact(*meta_args, **meta_kwargs)
        return True
    except Exception:  # noqa: BLE001 - an op without a meta kernel: run for real
        return False
