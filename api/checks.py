"""Checks that a compression is what it claims, shared by the tests and the benchmarks.

- :func:`make_nondegenerate`: random weights under which a wrong channel removal cannot
  hide (no all-zero layers, no vanishing layer scales, BatchNorm statistics that keep
  activations of order one).
- :func:`head_error`: the compact model against the masked model, on the raw outputs
  of the captured graphs (for a detector: the head outputs before post-processing).
- :func:`parameter_share`: the parameters spruce can reach, and the share kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..capture.links import output_tensors
from ..capture.preserve import preserved_state
from ..passes.analysis import ChannelAnalysis
from ..passes.graph import CapturedGraph, split_inputs

__all__ = ["head_error", "make_nondegenerate", "missing_gradients", "parameter_share", "relative_error"]


def make_nondegenerate(model: nn.Module, example_inputs: object, seed: int = 0) -> nn.Module:
    """Make a randomly initialised ``model``'s weights non-degenerate, in place; returns it in
    eval mode.

    Freshly built models often compute (nearly) nothing that depends on most channels:
    zero-initialised heads and residual branches, 1e-6 layer scales, and eval-mode
    BatchNorm with unit running statistics that shrink activations to 1e-16 through deep
    networks. An equivalence check scaled by the output then passes whatever a wrong
    pruning computes. So: every all-zero weight (2-D or more) becomes N(0, 1/fan_in); every
    per-channel scale whose values are all below 1e-3 (layer scales, zero-initialised norm
    weights; not biases) becomes U(0.5, 1.5); and the running statistics of every
    BatchNorm-like layer become the batch statistics of its input at ``example_inputs``
    (one eval-mode pass, each layer seeing the layers before it already re-estimated).
    The global RNG state is left as it was."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            tiny = float(p.detach().abs().max()) < 1e-3
            if p.dim() >= 2 and p.shape[0] > 1 and p[0].numel() > 1 and not p.any():
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            elif tiny and not name.endswith("bias") and (p.dim() <= 1 or p[0].numel() == 1):
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
    _reestimate_norms(model, example_inputs)
    return model.eval()


def _norm_layers(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.dim() == 1:
            yield module


def _reestimate_norms(model: nn.Module, example_inputs: object) -> None:
    layers = list(_norm_layers(model))
    if not layers:
        return

    def set_stats(module, inputs):
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != module.running_mean.shape[0]:
            return
        dims = [0] + list(range(2, x.dim()))
        if x.numel() // x.shape[1] < 2:
            return
        module.running_mean.copy_(x.detach().mean(dims))
        module.running_var.copy_(x.detach().var(dims, unbiased=False).clamp_min(1e-2))

    handles = [m.register_forward_pre_hook(set_stats) for m in layers]
    args, kwargs = split_inputs(example_inputs)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |a - b| relative to the reference's scale (at least 1); inf on a shape mismatch."""
    if reference.shape != other.shape:
        return math.inf
    if reference.numel() == 0:
        return 0.0
    reference, other = reference.detach().double(), other.detach().double()
    scale = max(1.0, float(reference.abs().max()))
    return float((reference - other).abs().max()) / scale


def head_error(masked: nn.Module, compact: nn.Module, captured: CapturedGraph, inputs: object) -> float:
    """The largest relative error (:func:`relative_error`) between ``compact`` and ``masked``
    on ``inputs`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments), both in eval mode.

    A model captured whole is compared on its outputs. A model captured in pieces is
    compared on the outputs of its pieces whose values reach eager code (a detector's raw
    head outputs, before post-processing; outputs whose shape only eager code reads must
    keep the sizes it reads), each piece's inputs computed by eager code replayed
    from the masked model's run, so that data-dependent post-processing in between (NMS
    over tied scores) cannot make two equal models look different."""
    args, kwargs = split_inputs(inputs)
    if captured.whole:
        with torch.no_grad():
            want = masked.eval()(*args, **kwargs)
            got = compact.eval()(*args, **kwargs)
        want_leaves = [t for t in pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
        got_leaves = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
        if len(want_leaves) != len(got_leaves):
            return math.inf
        return max((relative_error(a, b) for a, b in zip(want_leaves, got_leaves)), default=0.0)
    reference = _piece_run(masked, captured, args, kwargs, replay=None)
    outcome = _piece_run(compact, captured, args, kwargs, replay=reference)
    worst = 0.0
    for i, piece in enumerate(captured.pieces):
        calls_want, calls_got = reference.outputs.get(i, []), outcome.outputs.get(i, [])
        if len(calls_want) != len(calls_got):
            return math.inf
        for want, got in zip(calls_want, calls_got):
            for leaf, (_, dims) in piece.pinned_outputs.items():
                if leaf >= len(want) or leaf >= len(got):
                    return math.inf
                if dims is None:  # eager code reads the values
                    worst = max(worst, relative_error(want[leaf], got[leaf]))
                elif any(want[leaf].shape[d] != got[leaf].shape[d] for d in dims):  # only these sizes
                    return math.inf
    return worst


class _Run:
    def __init__(self):
        self.inputs: dict[int, list[list]] = {}
        self.outputs: dict[int, list[list[torch.Tensor]]] = {}


def _piece_run(model: nn.Module, captured: CapturedGraph, args: tuple, kwargs: dict, replay: _Run | None) -> _Run:
    """Run ``model`` (eval, no grad) recording each piece call's input leaves and output
    leaves; with ``replay``, input leaves computed by eager code are taken from it."""
    run = _Run()
    produced: dict[int, torch.Tensor] = {}
    handles = []
    for i, piece in enumerate(captured.pieces):
        module = model.get_submodule(piece.path)

        def pre(mod, a, k, i=i):
            leaves, spec = pytree.tree_flatten((a, k))
            calls = run.inputs.setdefault(i, [])
            if replay is not None:
                recorded = replay.inputs.get(i, [])
                if len(calls) < len(recorded):
                    source = recorded[len(calls)]
                    leaves = [source[n] if isinstance(t, torch.Tensor) and id(t) not in produced
                              and n < len(source) and isinstance(source[n], torch.Tensor)
                              and source[n].shape == t.shape else t for n, t in enumerate(leaves)]
            calls.append(leaves)
            return pytree.tree_unflatten(leaves, spec)

        def post(mod, a, k, out, i=i, piece=piece):
            leaves = output_tensors(piece.eval, out)
            for t in leaves:
                produced[id(t)] = t
            run.outputs.setdefault(i, []).append(leaves)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        model.eval()
        with torch.no_grad(), preserved_state(model):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return run


def missing_gradients(compact: nn.Module, captured: CapturedGraph) -> list[str]:
    """Names of the trainable parameters of ``compact``'s captured parts that have no
    gradient (call after a training-mode forward and backward)."""
    missing = []
    for piece in captured.pieces:
        module = compact.get_submodule(piece.path) if piece.path else compact
        prefix = f"{piece.path}." if piece.path else ""
        for name, p in module.named_parameters():
            if p.requires_grad and p.grad is None:
                missing.append(prefix + name)
    return missing


def parameter_share(analysis: ChannelAnalysis, kept: dict[int, np.ndarray]) -> tuple[int, int]:
    """(parameters spruce can reach, of them kept): elements of the model's parameters that
    its captured graphs read, before and after keeping ``kept`` channels per group."""
    an = analysis.analyzer
    alive = analysis.alive_mask(kept)
    params = {id(p): p for p in analysis.captured.root.parameters()}
    reach = {key for key, _ in an.param_spaces if key in params}
    before = after = 0
    for key in reach:
        p = params[key]
        before += p.numel()
        kept_numel = 1
        for d, size in enumerate(p.shape):
            space = an.param_spaces.get((key, d))
            kept_numel *= size if space is None else int(alive[space.start : space.start + space.size].sum())
        after += kept_numel
    return before, after
