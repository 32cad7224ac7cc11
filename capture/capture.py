"""Capture: a model at its example input becomes the graphs that passes take.

The user never chooses how. In order:

1. **Plain fx** symbolic tracing of the root, the fast path: its graph calls the
   user's modules (what masks and latency tables key on) and is symbolic in every
   shape, so the batch stays dynamic by construction.
2. **torch.export** (non-strict) of the root, when fx fails (``*args`` wrappers,
   iteration over chunks or shapes, branches on a shape, dtype or device, list/dict
   inputs...): the user's Python runs at the example's shapes and the graph is ATen
   operators on the user's parameters. The batch dimension (dim 0 of every input
   tensor) is dynamic, other dims where the user declares them (``dynamic_shapes``, as
   in ``torch.export``). A batch of one cannot be marked dynamic (0/1 specialisation),
   so the model is exported at a second batch size (the example tiled) and shapes are
   then propagated at the example.
3. **Pieces**, when the root cannot be captured whole because it filters by data
   (detection post-processing: NMS, top-k, thresholds, anchor matching) or runs a
   module listed in ``leaf_modules``: the model is run eagerly at the example and at a
   second batch size with hooks; every module owning parameters that was called is
   captured (fx, else export) if it can be, else its children are tried. Dims that
   differ between the recorded calls (batch, number of proposals) are dynamic. Each
   piece is checked against its recorded calls. A third eager run finds which piece
   outputs feed other pieces as the same tensor objects (coupled channels: a
   :class:`~spruce.passes.graph.Link`) and which reach eager code (pinned). The glue
   code keeps running eagerly in the compact model.

Only truly data-dependent control flow (a Python branch on a tensor *value*) fails:
:class:`TraceError` names the module, the file:line and the right hint (``torch.cond``,
``torch.where``, a leaf module, or leaving post-processing out of the model). Data-
dependent *shapes* (filtering) are post-processing and stay eager.

Each module is captured in eval mode; its train-mode graph is traced too only where training
mode changes it (BatchNorm, dropout with p > 0, a branch on ``self.training``: see
:mod:`.modes`), so a model without such modules is exported once. Neither the model's mode,
its buffers, its Python attributes nor the global RNG state change.

This module orchestrates; its steps live beside it: :mod:`.fxtrace` (plain fx),
:mod:`.torch_export` and :mod:`.dynamic` (torch.export and its dynamic dims), :mod:`.shapes`
(shape propagation), :mod:`.record` (eager recording), :mod:`.graphs` (one module's eval and
train graphs; :mod:`.modes` says when a train graph is needed), :mod:`.links` (links between
pieces), :mod:`.batch` (input adapters), :mod:`.preserve` (running the model without changing
it) and :mod:`.errors` (what the user is told).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import fx, nn

from ..passes.graph import CapturedGraph, Piece, split_inputs
from .batch import second_batch
from .dynamic import root_dynamic_shapes
from .errors import Failure, FxFailure, TraceError, failure_note, module_chain, root_failure, trace_error, user_frame
from .graphs import capture_module, graphs_export, graphs_fx
from .links import find_links
from .preserve import preserved_state
from .record import record_calls
from .transformers import capture_settings

__all__ = ["capture"]


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_leaf(path: str, module: nn.Module, leaf_modules: Sequence[object]) -> bool:
    return any((isinstance(m, str) and m == path) or (isinstance(m, type) and isinstance(module, m))
               for m in leaf_modules)


def _contains_leaf(path: str, module: nn.Module, leaf_modules: Sequence[object]) -> bool:
    if not leaf_modules:
        return False
    prefix = f"{path}." if path else ""
    return any(_is_leaf(prefix + name if name else path, m, leaf_modules) for name, m in module.named_modules())


def capture(
    model: nn.Module,
    example_inputs: object,
    leaf_modules: Iterable[object] = (),
    dynamic_shapes: object = None,
    see_through_wrapped: bool = False,
) -> CapturedGraph:
    """Capture ``model`` at ``example_inputs`` (a tensor, a tuple of positional arguments, or
    a dict of keyword arguments) into the graphs passes take (see the module docstring and
    :mod:`spruce.passes.graph`). ``dynamic_shapes`` declares dims other than the batch as
    dynamic, in ``torch.export``'s format. ``see_through_wrapped``: where plain fx keeps a
    function registered with ``torch.fx.wrap`` opaque (torchvision's Swin attention and patch
    merging), capture the whole model by torch.export instead, which traces through it (the
    fx graph stays where export cannot take the model whole). Raises :class:`TraceError`
    for data-dependent control flow and for inputs that do not fit the model."""
    leaf_modules = list(leaf_modules)
    args, kwargs = split_inputs(example_inputs)
    was_training = model.training
    with capture_settings(model):
        captured = _capture(model, args, kwargs, leaf_modules, dynamic_shapes, was_training, see_through_wrapped)
    captured.dynamic_shapes = dynamic_shapes
    return captured


def _fx_wrapped_calls(gm: fx.GraphModule) -> list[str]:
    """Nodes of ``gm`` calling a function that ``torch.fx.wrap`` keeps opaque to fx and that
    has no channel rule (torchvision's ``stochastic_depth`` has one)."""
    from torch.fx._symbolic_trace import _wrapped_fns_to_patch

    from ..passes.rules.registry import FUNCTION_RULES

    wrapped = {id(scope[name]) for (_, name), scope in _wrapped_fns_to_patch.items() if name in scope}
    return [n.name for n in gm.graph.nodes
            if n.op == "call_function" and id(n.target) in wrapped and n.target not in FUNCTION_RULES]


def _capture(model, args, kwargs, leaf_modules, dynamic_shapes, was_training,
             see_through_wrapped: bool = False) -> CapturedGraph:
    try:
        second = second_batch(model, args, kwargs)
        fx_failure: Failure | None = None
        try:
            eval_gm, train_gm = graphs_fx(model, args, kwargs, leaf_modules, "")
            captured = CapturedGraph([Piece("", eval_gm, train_gm, "fx", args, kwargs)], model, args, kwargs,
                                     second_inputs=second)
            if see_through_wrapped and _fx_wrapped_calls(eval_gm):
                try:
                    exported = _capture_by_export(model, args, kwargs, second, leaf_modules, dynamic_shapes, None)
                except Exception:  # noqa: BLE001 - the fx graph stays
                    exported = None
                finally:
                    model.train(was_training)
                if exported is not None and exported.whole:
                    return exported
            return captured
        except FxFailure as exc:
            fx_failure = exc.failure
        except TypeError as exc:  # keyword inputs fx cannot bind
            fx_failure = Failure("other", "<root>", str(exc), None)
        return _capture_by_export(model, args, kwargs, second, leaf_modules, dynamic_shapes, fx_failure)
    finally:
        model.train(was_training)


def _capture_by_export(model, args, kwargs, second, leaf_modules, dynamic_shapes, fx_failure) -> CapturedGraph:
    paths = {id(m): p for p, m in model.named_modules()}
    model.eval()
    with preserved_state(model):
        try:
            rec = record_calls(model, args, kwargs, keep=lambda p, m: _owns_parameters(m))
        except Exception as exc:
            where, _ = user_frame(exc.__traceback__)
            raise TraceError(f"example inputs do not fit the model: {type(exc).__name__}: {exc}"
                             + (f"\n  at {where}" if where else ""), operation=str(exc)) from exc
    notes: list[str] = []
    if "" not in rec.filters and not _contains_leaf("", model, leaf_modules):
        trace_args, trace_kwargs = second if second is not None else (args, kwargs)
        dyn = root_dynamic_shapes(model, trace_args, trace_kwargs, dynamic_shapes)
        try:
            eval_gm, train_gm = graphs_export(model, trace_args, trace_kwargs, dyn, args, kwargs, "")
        except TraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified: an error, or capture in pieces
            failure = root_failure(exc, paths)
            if failure.kind == "value" and _owns_parameters(model.get_submodule(failure.path or "")):
                raise trace_error(failure, model) from exc
            notes.append(failure_note(failure))
        else:
            return CapturedGraph([Piece("", eval_gm, train_gm, "export", args, kwargs)], model, args, kwargs,
                                 second_inputs=second, notes=[])
    else:
        notes.append("the model's forward filters by data (data-dependent shapes: NMS, boolean masks...); "
                     "that code stays eager" if "" in rec.filters else "leaf modules stay eager")
    return _capture_in_pieces(model, args, kwargs, second, rec, leaf_modules, notes, fx_failure)


def _capture_in_pieces(model, args, kwargs, second, rec, leaf_modules, notes, fx_failure) -> CapturedGraph:
    rec2 = None
    if second is not None:
        with preserved_state(model):
            try:
                rec2 = record_calls(model, second[0], second[1], keep=lambda p, m: _owns_parameters(m))
            except Exception as exc:  # noqa: BLE001 - the second batch is an extra, not a requirement
                notes.append(f"the model does not run at a second batch size ({type(exc).__name__}: {exc})")
    pieces: list[Piece] = []

    def visit(path: str, module: nn.Module) -> None:
        calls = rec.calls.get(path)
        if not calls or not _owns_parameters(module):
            return
        if _is_leaf(path, module, leaf_modules):
            notes.append(f"leaf module '{path}' runs eagerly")
            return
        if path and path not in rec.filters and not _contains_leaf(path, module, leaf_modules):
            all_calls = calls + (rec2.calls.get(path, []) if rec2 is not None else [])
            found = capture_module(module, path, all_calls, leaf_modules)
            if isinstance(found, Piece):
                pieces.append(found)
                return
            if found.kind == "value":
                owner = found.path
                chain = module_chain(found.exc.__traceback__, {id(m): p for p, m in model.named_modules()}) \
                    if found.exc is not None else []
                owner = chain[-1] if chain else path
                if _owns_parameters(model.get_submodule(owner)):
                    found.path = owner
                    raise trace_error(found, model) from found.exc
            notes.append(failure_note(found))
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    if not pieces:
        failure = fx_failure or Failure("other", "<root>", "no part of the model could be captured", None)
        raise trace_error(failure, model)
    captured = CapturedGraph(pieces, model, args, kwargs, second_inputs=second, notes=notes)
    find_links(captured)
    return captured
