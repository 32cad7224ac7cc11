"""Eager recording: the model run once with hooks, keeping the calls of chosen modules and
which modules filter by data (operators with data-dependent output shapes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SINGLE_THREAD_MAX_PARAMS", "RecordedCall", "Recording", "record_calls"]

# Models up to this many parameters are recorded on one intra-op thread. Measured on 2 shared
# cores at load 4-7 (Llama decoders, batch 2 x 32 tokens): 2 threads took 0.4-0.85 s for 1.9-3.3 M
# parameters and 0.7-3.9 s for 92 M, one thread 0.02-0.06 s and 0.3-0.4 s (the second thread
# waits on other processes); above this, a quiet machine's second thread saves more than that.
SINGLE_THREAD_MAX_PARAMS = 100_000_000


@dataclass
class RecordedCall:
    args: tuple
    kwargs: dict
    output: object


@dataclass
class Recording:
    calls: dict[str, list[RecordedCall]] = field(default_factory=dict)
    filters: set[str] = field(default_factory=set)  # modules whose run had data-dependent shapes
    output: object = None


def _data_dependent_shape(func, args, out) -> bool:
    if torch.Tag.dynamic_output_shape not in getattr(func, "tags", ()):
        return getattr(func, "namespace", "") == "torchvision" and "nms" in str(func)
    name = str(func)
    if name.startswith("aten.index_put") or name.startswith("aten._index_put"):
        return False
    if name.startswith("aten.index."):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    return True


class _FilterSpy(TorchDispatchMode):
    """Marks every module on the call stack when an operator with a data-dependent output
    shape runs (nonzero, boolean masks, NMS)."""

    def __init__(self, stack: list[str], filters: set[str]):
        super().__init__()
        self.stack, self.filters = stack, filters

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack and _data_dependent_shape(func, args, out):
            self.filters.update(self.stack)
        return out


def record_calls(model: nn.Module, args: tuple, kwargs: dict, keep: Callable[[str, nn.Module], bool]) -> Recording:
    """Run ``model`` eagerly (no grad, its current mode), recording every call of the modules
    ``keep`` selects and which modules filter by data. A model of at most
    :data:`SINGLE_THREAD_MAX_PARAMS` parameters runs on one intra-op thread (the thread count
    is restored after)."""
    rec = Recording()
    stack: list[str] = []
    handles = []
    for path, module in model.named_modules():
        def pre(mod, a, k, path=path):
            stack.append(path)

        def post(mod, a, k, out, path=path):
            if stack and stack[-1] == path:
                stack.pop()
            if keep(path, mod):
                rec.calls.setdefault(path, []).append(RecordedCall(a, dict(k), out))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    threads = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) <= SINGLE_THREAD_MAX_PARAMS
    try:
        if small:
            torch.set_num_threads(1)
        with torch.no_grad(), _FilterSpy(stack, rec.filters):
            rec.output = model(*args, **kwargs)
    finally:
        if small:
            torch.set_num_threads(threads)
        for h in handles:
            h.remove()
    return rec
