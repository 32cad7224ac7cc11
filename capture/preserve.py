"""Running a model during capture without changing it or printing: its buffers, Python
attributes and the global RNG state are restored, torch's logs and warnings silenced."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import nn

__all__ = ["no_stderr", "preserved_state", "quiet"]


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run code that may update buffers (BatchNorm statistics), consume RNG, flip modes or
    set Python attributes (shape caches) without changing the model or the global RNG."""
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    modules = list(model.modules())
    attrs = [dict(m.__dict__) for m in modules]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    if k in saved and b.shape == saved[k].shape:
                        b.copy_(saved[k])
            for m, before in zip(modules, attrs):
                for key in [k for k in m.__dict__ if k not in before]:
                    del m.__dict__[key]
                for key, value in before.items():
                    if m.__dict__.get(key, _MISSING) is not value:
                        m.__dict__[key] = value


_MISSING = object()


@contextlib.contextmanager
def quiet():
    """torch.export logs partial graphs and warnings while it tries; capture reports itself."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.fx", "torch._dynamo", "torch.export",
                                               "torch.fx.experimental.symbolic_shapes", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def no_stderr():
    """ShapeProp prints the traceback of a failing node before raising; an attempt that may
    fail (meta or fake tensors) should not."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
