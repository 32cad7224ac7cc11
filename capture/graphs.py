"""One module's graphs: its eval-mode graph and, where its code differs in training mode, its
train-mode graph, by plain fx else torch.export, shapes propagated at its call; a piece of a
model captured in pieces is checked against its recorded calls."""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..passes.graph import Piece
from .batch import adapter_for, resized_batch
from .dynamic import varying_dynamic_shapes
from .errors import Failure, FxFailure, TraceError, classify, user_frame
from .fxtrace import fx_trace, none_arguments
from .modes import may_branch_on_training, train_mode_changes_ops
from .preserve import preserved_state
from .record import RecordedCall
from .shapes import placeholder_values, propagate, propagate_from_vals
from .torch_export import export_graph

__all__ = ["capture_module", "graphs_export", "graphs_fx"]


def graphs_fx(module: nn.Module, args: tuple, kwargs: dict, leaf_modules, prefix: str):
    """(eval graph, train graph or None) by plain fx, shapes propagated at the call."""
    was_training = module.training
    try:
        module.eval()
        nones = none_arguments(module, args, kwargs)
        eval_gm = fx_trace(module, leaf_modules, prefix, nones)
        values = placeholder_values(eval_gm, module, args, kwargs)
        eval_gm.eval()
        propagate(eval_gm, values)
        if not may_branch_on_training(module, leaf_modules):
            return eval_gm, None
        module.train()
        train_gm = _train_graph(
            eval_gm, lambda: fx_trace(module, leaf_modules, prefix, nones),
            lambda gm: _propagate_train_fx(gm, eval_gm, module, args, kwargs, values), FxFailure,
            lambda exc: f"training-mode graph not traced, {_EVAL_ONLY}: {exc.failure.operation}")
        return eval_gm, train_gm
    finally:
        module.train(was_training)


_EVAL_ONLY = "the compact model will support eval mode only"


def _propagate_train_fx(train_gm: fx.GraphModule, eval_gm: fx.GraphModule, module: nn.Module, args: tuple,
                        kwargs: dict, values: list) -> None:
    """Shapes of an fx train-mode graph at the call (``values``), nodes it shares with
    ``eval_gm`` taken from there; at a batch of two where a batch of one does not run in
    training mode (BatchNorm after global pooling sees one value per channel: shapes that need
    a real run would fail there, and the user would be told the example does not fit)."""
    try:
        propagate(train_gm, values, known=eval_gm)
    except TraceError:
        if adapter_for(module).batch_size(args, kwargs) != 1:
            raise
        args2, kwargs2 = resized_batch(module, args, kwargs, 2)
        propagate(train_gm, placeholder_values(train_gm, module, args2, kwargs2))


def _train_graph(eval_gm: fx.GraphModule, capture_train, propagate_train, failure: type[Exception] | tuple,
                 say) -> fx.GraphModule | None:
    """The training-mode graph (``capture_train()``, shapes propagated by ``propagate_train``)
    when its code differs from ``eval_gm``'s; None when it is the same code, or when capturing
    it raised ``failure`` (then the compact model supports eval mode only, and a warning says
    ``say(exc)``)."""
    try:
        train_gm = capture_train()
    except failure as exc:
        warnings.warn(say(exc), stacklevel=5)
        return None
    if train_gm.code == eval_gm.code:
        return None
    train_gm.train()
    propagate_train(train_gm)
    return train_gm


def graphs_export(module: nn.Module, trace_args: tuple, trace_kwargs: dict, dynamic_shapes: object,
                   args: tuple, kwargs: dict, prefix: str):
    """(eval graph, train graph or None) by torch.export at ``trace_args`` (a batch of two or
    more), shapes propagated at ``args``. The train-mode graph is exported only where training
    mode runs other operators (:func:`~spruce.capture.modes.train_mode_changes_ops` at
    ``trace_args``), and kept where its code differs."""
    was_training = module.training
    try:
        eval_gm = export_graph(module, trace_args, trace_kwargs, dynamic_shapes, training=False)
        values = placeholder_values(eval_gm, module, args, kwargs)
        if not propagate_from_vals(eval_gm, values):
            with preserved_state(module):
                propagate(eval_gm, values)

        def propagate_train(train_gm: fx.GraphModule) -> None:
            if not propagate_from_vals(train_gm, placeholder_values(train_gm, module, args, kwargs)):
                with preserved_state(module):
                    propagate(train_gm, placeholder_values(train_gm, module, trace_args, trace_kwargs))

        if not train_mode_changes_ops(module, trace_args, trace_kwargs):
            return eval_gm, None  # one export: training mode runs the same operators
        # any exception: an eval-only compact model, said in a warning
        train_gm = _train_graph(
            eval_gm, lambda: export_graph(module, trace_args, trace_kwargs, dynamic_shapes, training=True),
            propagate_train, Exception,
            lambda exc: f"{prefix or 'model'}: training-mode graph not captured, {_EVAL_ONLY}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return eval_gm, train_gm
    finally:
        module.train(was_training)


def _matches(gm: fx.GraphModule, module: nn.Module, call: RecordedCall) -> bool:
    """Does the eval graph reproduce a recorded call (within 1e-4 of the output scale)?"""
    try:
        with torch.no_grad(), preserved_state(module):
            out = gm(*call.args, **call.kwargs)
    except Exception:  # noqa: BLE001 - a graph that cannot run the call does not match it
        return False
    got = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    want = [t for t in pytree.tree_leaves(call.output) if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return False
        if a.is_floating_point():
            scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
            if b.numel() and float((a - b).abs().max()) > 1e-4 * scale:
                return False
        elif not torch.equal(a, b):
            return False
    return True


def _same_structure(calls: list[RecordedCall]) -> bool:
    specs = {str(pytree.tree_structure((c.args, c.kwargs))) for c in calls}
    return len(specs) == 1


def _export_call(calls: list[RecordedCall]) -> int:
    """The recorded call to export at: the one whose dims are all at least 2 where possible."""
    def small(call: RecordedCall) -> int:
        return sum(1 for t in pytree.tree_leaves((call.args, call.kwargs))
                   if isinstance(t, torch.Tensor) for s in t.shape if s < 2)

    return min(range(len(calls)), key=lambda i: (small(calls[i]), -i))


def capture_module(module: nn.Module, path: str, calls: list[RecordedCall], leaf_modules) -> Piece | Failure:
    """One module at its recorded calls (the first at the example input): fx, else export."""
    first = calls[0]
    try:
        eval_gm, train_gm = graphs_fx(module, first.args, first.kwargs, leaf_modules, path)
        return Piece(path, eval_gm, train_gm, "fx", first.args, dict(first.kwargs))
    except (FxFailure, TraceError, TypeError):
        pass
    if not _same_structure(calls):
        return Failure("other", path, "its inputs change structure with the batch size (a list per image)", None)
    chosen = _export_call(calls)
    dyn = varying_dynamic_shapes(module, [(c.args, c.kwargs) for c in calls], chosen)
    try:
        eval_gm, train_gm = graphs_export(module, calls[chosen].args, calls[chosen].kwargs, dyn, first.args,
                                           first.kwargs, path)
    except Exception as exc:  # noqa: BLE001 - classified below
        where, line = user_frame(exc.__traceback__)
        return Failure(classify(exc), path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", where,
                        line, exc)
    if not all(_matches(eval_gm, module, c) for c in calls):
        return Failure("other", path, "its exported graph does not reproduce every recorded call", None)
    return Piece(path, eval_gm, train_gm, "export", first.args, dict(first.kwargs))
