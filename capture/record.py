"""Eager recording: the model run once with hooks, keeping the calls of chosen modules and
which modules filter by data (operators with data-dependent output shapes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["RecordedCall", "Recording", "record_calls"]


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
    ``keep`` selects and which modules filter by data."""
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
    try:
        with torch.no_grad(), _FilterSpy(stack, rec.filters):
            rec.output = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return rec
