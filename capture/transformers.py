"""Hugging Face transformers models: what capture needs from them (handing a pruned model
back as the user's own transformers class is :func:`spruce.to_transformers`, in
:mod:`spruce.api.transformers`).

transformers is imported only when a model is one of its ``PreTrainedModel``\\ s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..moved import moved_name

__all__ = ["NEUTRAL_INPUTS", "capture_settings", "is_transformers_model"]

# keyword input -> (the input it is shaped like, the expression giving the value that computes
# what leaving it out computes): a compact model captured with it runs without it
NEUTRAL_INPUTS: dict[str, tuple[str, str]] = {
    "attention_mask": ("input_ids", "torch.ones_like({like}, dtype={dtype})"),
    "decoder_attention_mask": ("decoder_input_ids", "torch.ones_like({like}, dtype={dtype})"),
    "token_type_ids": ("input_ids", "torch.zeros_like({like}, dtype={dtype})"),
}


def is_transformers_model(model: nn.Module) -> bool:
    """Is ``model`` a transformers ``PreTrainedModel`` (without importing transformers)?"""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


@contextlib.contextmanager
def capture_settings(model: nn.Module) -> Iterator[None]:
    """While capturing a transformers model: no key/value cache (a ``DynamicCache`` in the
    output is not a tensor structure export can return, and a graph has no use for it: the
    compact model computes every position). The config is restored afterwards."""
    config = getattr(model, "config", None) if is_transformers_model(model) else None
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    configs = {id(config): config}  # submodules may hold their own copies (T5's decoder stack)
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and hasattr(sub, "use_cache"):
            configs.setdefault(id(sub), sub)
    configs = list(configs.values())
    saved = [c.use_cache for c in configs]
    try:
        for c in configs:
            c.use_cache = False
        yield
    finally:
        for c, value in zip(configs, saved):
            c.use_cache = value


def __getattr__(name: str) -> Any:
    raise moved_name(__name__, name)  # to_transformers: an ImportError naming spruce.to_transformers
