"""The public entry points that take a model: each captures it, then hands the graph to a pass.

Passes never capture models (they take a :class:`~spruce.passes.graph.CapturedGraph`);
these functions are where a model becomes a graph.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from ..capture.trace import capture, trace
from ..passes.analysis import ChannelAnalysis, ChannelGroup, analyze
from ..passes.graph import CapturedGraph, require_data
from ..passes.sparsity.budget import DEFAULT_DISTRIBUTION
from ..passes.sparsity.context import Structure
from ..passes.sparsity.method import MethodConfig
from ..passes.sparsity.model import SparseModel, check_normalised_widths, check_options, sparsify_captured
from ..passes.sparsity.registry import SPARSIFY_DEFAULT
from ..runtime.profile import profile as profile_captured
from ..runtime.table import LatencyTable

__all__ = ["analyze_model", "channel_groups", "gc_paused", "profile", "sparsify"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was, after it). Capturing and
    rewriting graphs allocates hundreds of thousands of small objects, which set off full
    collections of the whole process (a second each with torch and a model loaded, measured)
    in the middle of the pass; paused, they come later, once, when the process allocates next.
    Reference counting still frees everything that is not in a cycle."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def analyze_model(model: nn.Module, example_inputs: object, leaf_modules: Iterable[object] = (),
                  dynamic_shapes: object = None, gqa: str = "query_heads",
                  normalised_widths: bool = False) -> ChannelAnalysis:
    """Capture ``model`` (eval and, where it differs, training mode; see
    :func:`spruce.capture.capture.capture`) and analyse its channels (``gqa``,
    ``normalised_widths``: see :func:`spruce.passes.analysis.analyze`; with it, a model whose
    fx graph keeps an ``fx.wrap``-ed function opaque is captured by torch.export, which sees
    the widths through it).

    Raises :class:`spruce.TraceError` when the model cannot be captured."""
    with gc_paused():
        captured = capture(model, example_inputs, leaf_modules, dynamic_shapes, see_through_wrapped=normalised_widths)
        return analyze(captured, gqa=gqa, normalised_widths=normalised_widths)


def channel_groups(model: nn.Module, example_inputs: object, leaf_modules: Iterable[object] = (),
                   dynamic_shapes: object = None) -> list[ChannelGroup]:
    """Every set of coupled channels of ``model``.

    Each :class:`ChannelGroup` lists the parameter/buffer dimensions (with index
    mapping) that must lose the same channels; unprunable groups say why."""
    return analyze_model(model, example_inputs, leaf_modules, dynamic_shapes).groups


def sparsify(
    model: nn.Module,
    example_inputs: object,
    method: str | MethodConfig = SPARSIFY_DEFAULT,
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
    """Insert mask nodes for every Conv/Linear weight of ``model`` and set up ``method``.

    ``method`` is a method config (``IEEConfig(h=150, j=150, q=150)``, ``RigLConfig()``, ...:
    the config's type selects the method) or, as a shortcut, a method name whose options
    are the remaining keyword arguments (``method="iee", h=150``). With ``total_steps`` every
    option the user did not set (pydantic's ``model_fields_set``: the config's keyword
    arguments, the shortcut's options) takes the default scaled to the run that ``spruce
    compile`` uses (:meth:`MethodConfig.for_run`; kept channel counts are not rounded to
    kernel widths here, ``round_to`` stays as set); the scaled config is ``sm.method.config``.
    A config that cannot fit the run (``HALPConfig(interval=100)`` in 112 steps) is refused
    here, naming the option, never halfway through training. The returned
    :class:`SparseModel` shares its parameters with ``model``: build the optimizer from either.
    ``budget`` ({"latency": f} with ``latency_table`` from ``spruce.profile``, {"flops": f} or
    {"params": f}; f a fraction of dense) drives the budgeted channel methods (halp, iee with
    structure="channel") instead of ``sparsity``. ``normalised_widths=True`` (structure="channel")
    prunes the widths LayerNorm / RMSNorm normalise over, training with masked norms
    (statistics over the kept channels, what the compact model computes).
    Raises ``ValueError`` naming the option at fault (before the model is captured) and
    :class:`spruce.TraceError` when the model cannot be captured."""
    check_options(method, structure, sparsity, total_steps, method_options, distribution, budget)
    check_normalised_widths(normalised_widths, Structure.parse(structure))
    require_data(model, example_inputs, "sparsify")
    captured = _capture_for_training(model, example_inputs)
    return sparsify_captured(captured, method, structure, sparsity, distribution, total_steps, exclude, budget,
                             latency_table, normalised_widths, **method_options)


def _capture_for_training(model: nn.Module, example_inputs: object) -> CapturedGraph:
    """:func:`capture` for a model about to be trained sparse. A model in training mode whose
    training code cannot be traced is a TraceError (as tracing it always was); for a model in
    eval mode the eval graph then serves both modes, with a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captured = capture(model, example_inputs)
    for warning in caught:
        message = str(warning.message)
        if message.startswith("training-mode graph not traced"):
            if model.training:
                trace(model, example_inputs)  # raises the TraceError naming the module at fault
            message = ("sparsify: the model's training-mode code cannot be traced, so the SparseModel runs its "
                       "eval-mode graph in training mode too: " + message.split(": ", 1)[-1])
        warnings.warn(message, warning.category, stacklevel=3)
    return captured


def profile(model: nn.Module, example_inputs: Any, target: Any = "onnxruntime", step: int = 8,
            **options: Any) -> LatencyTable:
    """Profile every prunable layer of ``model`` on ``target`` into a latency table
    (:func:`spruce.runtime.profile.profile`, whose options this takes), with the channel
    analysis that tells which layer dimensions can shrink. A model that cannot be captured
    is still profiled, every layer dimension varied, with a warning."""
    require_data(model, example_inputs, "profile")
    try:
        analysis = analyze_model(model, example_inputs)
    except Exception as exc:  # an uncapturable model can still be profiled, without calibration configs
        warnings.warn(f"profile: channel analysis failed ({type(exc).__name__}: {exc}); every layer dimension "
                      "is profiled and only the dense model calibrates the table", stacklevel=2)
        analysis = None
    return profile_captured(model, example_inputs, target, step, analysis=analysis, **options)
