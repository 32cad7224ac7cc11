"""Per-layer latency profiling on a target and a table that predicts whole-model latency.

``profile(model, example_inputs, target)`` times every prunable layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d,
grouped and depthwise included, Linear, and recurrent layers: LSTM, GRU and RNN without ``proj_size``,
over their input features and hidden size) of ``model`` on the target over a grid of
(active input, active output) channel counts and returns a :class:`LatencyTable`.

How the grid stays cheap without losing accuracy:

- layers with the same *signature* (kind, kernel, stride, padding, groups, dilation,
  input spatial size, batch, dtype) share measured points: a point is timed once;
- per layer, a *coarse* rectangle of channel counts is timed, plus the two *edges*
  (every ``step`` of one axis at the other axis' full width). Latency is close to
  bilinear in (in, out) but has a staircase from vector blocks and thread partitions;
  the prediction is the bilinear interpolation on the coarse grid times the staircase
  ratios measured along each edge (exact on every measured point);
- a dimension no prunable channel group reaches (the first convolution's input, the
  classifier's output) is not varied at all;
- every measured point is cached on disk, keyed by the target's fingerprint and the
  layer signature, so a second run times nothing.

Isolated layers are not the model: each isolated run pays the runtime's per-run cost and
layout conversions and the model has operators that are not profiled layers (pooling,
additions, activations). (An INT8 target times a lone layer as the whole INT8 graph runs it,
integer tensors in and out, without the quantize, dequantize and layout work of its fp32
boundary: :meth:`~spruce.targets.onnxruntime.OnnxRuntimeCPU.model_runner`.) ``profile``
therefore times a few whole compact models (dense, uniform widths, random widths) and fits,
in relative non-negative least squares,

    predict(widths) = overhead_ms + sum over layers of calls * layer_ms(layer, in, out)
    layer_ms(layer, in, out) = scale * max(isolated_ms(layer, in, out) - fixed_ms[signature], 0)
                               + ms_per_element * activation_elements(in, out)
                               + ms_per_weight * weight_elements(in, out)

(at INT8, ``scale`` is one per layer family, depthwise, pointwise, conv, linear: a lone integer
layer's timing relates to its share of the whole graph differently per kernel family;
:func:`~spruce.runtime.calibration.fit_calibration`)

``fixed_ms`` is each layer signature's fixed cost per isolated run, which the whole model does
not pay per layer: the target's measured per-call cost where it gives a no-work layer to time
(:meth:`~spruce.targets.base.Target.call_cost_case`: the INT8 ONNX Runtime target), else the
signature's grid extrapolated to zero channels (thread hand-off, allocation);
``activation_elements`` counts the layer's input and output activation elements and
``weight_elements`` its weights (which a whole model streams from memory while an isolated
layer finds them in cache). ``scale``, ``ms_per_element``, ``ms_per_weight`` and
``overhead_ms`` are never negative, so neither is any prediction nor any layer's share. The
calibrated ``layer_ms`` is what a knapsack should take differences of.

Timing resists load (:mod:`spruce.targets.timing`): the points of a layer are timed
interleaved with each other in rounds, the calibration models interleaved with each other;
each call's run-queue waiting (time the scheduler gave the CPU to other processes; the mean
over the threads of the process that ran during the call, the runtime's workers included) is
excluded, and a series' value is the mean of its inliers (median +- 3 scaled MADs).

:func:`profile` runs the steps in order, each in its own module: find the layers and lay out
their grids (:mod:`~spruce.runtime.layers`), read what the cache holds
(:mod:`~spruce.runtime.cache`), time the missing points (:mod:`~spruce.runtime.measure`), time
the calibration models and fit the correction (:mod:`~spruce.runtime.calibration`), and return
the table (:mod:`~spruce.runtime.table`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..targets.base import Target, get_target
from .cache import LatencyCache, default_cache_dir
from .calibration import calibration_samples, call_cost_ms, fit_calibration
from .layers import find_layers, make_entry, varying_dims
from .measure import Reference, measure_points
from .options import ProfileConfig
from .table import LatencyTable, ProfileError

__all__ = ["ProfileConfig", "profile"]


_DEFAULTS = ProfileConfig()


def profile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    target: str | Target = "onnxruntime",
    step: int = _DEFAULTS.step,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    warmup: int = _DEFAULTS.warmup,
    repeats: int = _DEFAULTS.repeats,
    coarse: int = _DEFAULTS.coarse,
    edges: bool = _DEFAULTS.edges,
    calibration_random: int = _DEFAULTS.calibration_random,
    retries: int = _DEFAULTS.retries,
    seed: int = _DEFAULTS.seed,
    analysis: Any = None,
) -> LatencyTable:
    """Profile every prunable layer of ``model`` on ``target`` and return a :class:`LatencyTable`.

    Channel counts are timed at multiples of ``step`` (see the module docstring for which
    ones). The points of one layer signature are timed interleaved, up to
    ``POINTS_PER_BATCH`` at a time: ``warmup`` untimed calls each, then ``repeats`` rounds
    of one call each; a point's value is the load-robust mean of its calls
    (:meth:`~spruce.targets.timing.Timings.robust_ms`: run-queue waiting excluded, outliers
    rejected). Measured points, the per-run cost and whole-model calibration timings are
    cached under ``cache_dir`` (default :func:`default_cache_dir`) keyed by the target's
    fingerprint, so a second run on the same target times nothing; ``use_cache=False``
    neither reads nor writes it. A freshly timed point slower than a point with more
    channels is timed again up to ``retries`` times (load bursts), keeping the lower value.
    Besides the dense and three uniform-width models, ``calibration_random`` random-width
    models are timed whole (interleaved with each other) to fit the correction.
    ``analysis`` (a :class:`~spruce.passes.analysis.ChannelAnalysis` of ``model``, which
    ``spruce.profile`` computes) says which layer dimensions can shrink; without it every
    layer dimension is profiled and only the dense model calibrates the table.
    Raises :class:`ProfileError` for bad options and ``ValueError`` for an unknown target.
    """
    config = ProfileConfig(step=step, coarse=coarse, edges=edges, warmup=warmup, repeats=repeats,
                           calibration_random=calibration_random, retries=retries, seed=seed)
    if isinstance(target, str):
        target = get_target(target)
    if not isinstance(target, Target):
        raise ProfileError(f"profile: target must be a target name or a Target, got {type(target).__name__}")
    target.require()
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    was_training = model.training
    try:
        return _profile(model, inputs, target, config, cache_dir, use_cache, progress, analysis)
    finally:
        model.train(was_training)  # targets put the model in eval mode to export it


def _profile(model: nn.Module, inputs: tuple[torch.Tensor, ...], target: Target, config: ProfileConfig,
             cache_dir: str | os.PathLike | None, use_cache: bool, progress: bool, analysis: Any) -> LatencyTable:
    """The steps of :func:`profile`, in order, on checked options and inputs."""
    fingerprint = target.fingerprint()
    cache = LatencyCache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), fingerprint) \
        if use_cache else LatencyCache(None, fingerprint)
    cache.check()

    # the layers and the channel counts each is timed at
    found = find_layers(model, inputs)
    if not found:
        raise ProfileError(f"profile: {type(model).__name__} has no Conv, ConvTranspose or Linear layer to profile")
    varying = varying_dims(analysis, found) if analysis is not None else {n: (1, 1) for n in found}
    entries = {name: make_entry(name, f, config.step, config.coarse, config.edges, *varying[name])
               for name, f in found.items()}

    # their isolated timings, from the cache or measured against the reference layer
    prototypes = {}
    for name, entry in entries.items():
        prototypes.setdefault(entry.signature, (found[name].module, found[name].input_shape))
    reference = Reference.of(entries, prototypes, cache)
    points = measure_points(target, entries, prototypes, cache, reference, batch_points=config.batch_points,
                            warmup=config.warmup, rounds=config.repeats, retries=config.retries, progress=progress)
    table = LatencyTable(entries, points, fingerprint, step=config.step,
                         info=_table_info(model, inputs, config))
    # the whole-model correction
    samples = calibration_samples(target, model, inputs, analysis, table, cache, reference, step=config.step,
                                  seed=config.seed, random_count=config.calibration_random,
                                  warmup=config.model_warmup, rounds=config.model_repeats, progress=progress)
    call_ms = call_cost_ms(target, cache, reference, config.warmup, config.repeats)
    # a target that times a lone layer as the whole graph runs it (the INT8 ONNX Runtime target, which
    # gives a per-call case) gets one scale per layer family: its kernels relate to their lone timings
    # differently (calibration.fit_calibration)
    calibration = fit_calibration(table, samples, call_ms, by_family=call_ms is not None)
    info = {**table.info, "reference": {"signature": reference.signature, "point": list(reference.point),
                                        "ms": reference.level},
            **({"call_ms": call_ms} if call_ms is not None else {})}
    return LatencyTable(entries, points, fingerprint, calibration, config.step, info)


def _table_info(model: nn.Module, inputs: tuple[torch.Tensor, ...], config: ProfileConfig) -> dict[str, Any]:
    return {"model": type(model).__name__, "input_shapes": [list(t.shape) for t in inputs],
            "coarse": config.coarse, "edges": config.edges, "warmup": config.warmup, "repeats": config.repeats,
            "timing": "interleaved rounds, threads' run-queue waiting excluded, inlier mean", "host": platform.node()}

