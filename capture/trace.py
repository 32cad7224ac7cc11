"""The public front door of capture: ``trace`` and ``capture``.

``trace`` returns one ``torch.fx.GraphModule`` whose tensor nodes carry
``meta["tensor_meta"]`` (shape, dtype): plain fx where it works, else the
``torch.export`` graph. ``capture`` returns the
:class:`~spruce.passes.graph.CapturedGraph` that passes take (see
:mod:`spruce.capture.capture` for how a model is captured, possibly in pieces).
:class:`TraceError` is what both raise when a model cannot be captured.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

from ..passes.graph import split_inputs
from .batch import second_batch
from .capture import capture
from .dynamic import root_dynamic_shapes
from .errors import FxFailure, TraceError, root_failure, trace_error
from .fxtrace import fx_trace
from .preserve import preserved_state
from .shapes import placeholder_values, propagate
from .torch_export import export_graph

__all__ = ["TraceError", "capture", "trace"]


def trace(
    model: torch.nn.Module,
    example_inputs: object,
    leaf_modules: Iterable[object] = (),
    dynamic_shapes: object = None,
) -> fx.GraphModule:
    """One graph of ``model`` in its current mode, every tensor node with shape/dtype meta.

    Plain fx symbolic tracing first (the graph calls the user's modules; ``leaf_modules``
    lists module types or qualified names kept as opaque calls), else ``torch.export``
    (ATen operators, dynamic batch). Raises :class:`TraceError` naming the module, the
    operation and the user's source line when neither captures the whole model (a model
    that only captures in pieces, like a detector with eager post-processing, goes through
    :func:`capture` instead), or the node where the example inputs stop fitting the model.
    """
    leaf_modules = list(leaf_modules)
    args, kwargs = split_inputs(example_inputs)
    was_training = model.training
    try:
        gm = fx_trace(model, leaf_modules)
    except FxFailure as fx_exc:
        if leaf_modules:
            raise trace_error(fx_exc.failure, model) from fx_exc
        return _trace_export(model, args, kwargs, dynamic_shapes, fx_exc)
    try:
        with preserved_state(model):
            gm.train(was_training)
            propagate(gm, placeholder_values(gm, model, args, kwargs))
    finally:
        model.train(was_training)
    return gm


def _trace_export(model, args, kwargs, dynamic_shapes, fx_exc: FxFailure) -> fx.GraphModule:
    paths = {id(m): p for p, m in model.named_modules()}
    second = second_batch(model, args, kwargs)
    trace_args, trace_kwargs = second if second is not None else (args, kwargs)
    was_training = model.training
    try:
        dyn = root_dynamic_shapes(model, trace_args, trace_kwargs, dynamic_shapes)
        gm = export_graph(model, trace_args, trace_kwargs, dyn, training=was_training)
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as a TraceError
        failure = root_failure(exc, paths)
        if failure.kind == "other" and fx_exc.failure.where:
            failure = fx_exc.failure  # fx's own failure names the module and line better
        raise trace_error(failure, model) from exc
    finally:
        model.train(was_training)
    with preserved_state(model):
        propagate(gm, placeholder_values(gm, model, args, kwargs))
    return gm
