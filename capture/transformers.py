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

__all__ = ["NEUTRAL_INPUTS", "SEQUENCE_INPUTS", "capture_settings", "is_transformers_model", "sequence_dims"]

# keyword input -> the name of its sequence length (dim 1): inputs sharing a name share the length
SEQUENCE_INPUTS: dict[str, str] = {
    "input_ids": "seq", "attention_mask": "seq", "token_type_ids": "seq", "position_ids": "seq",
    "labels": "seq", "decoder_input_ids": "decoder_seq", "decoder_attention_mask": "decoder_seq",
}

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


def sequence_dims(model: nn.Module, example: object) -> dict | None:
    """torch.export ``dynamic_shapes`` keeping the sequence length (dim 1 of each 2-D input of
    :data:`SEQUENCE_INPUTS`) of a transformers model's keyword ``example`` dynamic, from 2 to the
    model's ``max_position_embeddings`` (else 4096); ``None`` for any other model or input."""
    if not is_transformers_model(model) or not isinstance(example, dict):
        return None
    import torch

    longest = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 4096)
    made: dict[str, object] = {}
    dims: dict[str, dict[int, object]] = {}
    for name, value in example.items():
        seq = SEQUENCE_INPUTS.get(name)
        if seq is not None and isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] >= 2:
            if seq not in made:
                made[seq] = torch.export.Dim(seq, min=2, max=max(longest, int(value.shape[1])))
            dims[name] = {1: made[seq]}
    return dims or None


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
