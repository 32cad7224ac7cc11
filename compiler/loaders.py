"""What a data source hands compile: :class:`Loaders` (recovery and held-out loaders, an
example input, the class count) and, for ``text:PATH`` data, its :class:`TextInfo`. One module
both the built-in data sets (:mod:`spruce.compiler.datasets`) and text data
(:mod:`spruce.compiler.text`) build on, so neither imports the other's users."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

__all__ = ["Loaders", "TextInfo", "restart_stream"]


@dataclass
class TextInfo:
    """What a text data source adds to :class:`Loaders`: the
    tokenizer, the window length, the special token ids, the real (non-pad) token counts and
    document counts of each set, and the held-out documents' text (for continuation prompts)."""

    tokenizer: Any
    sequence_length: int
    pad_token_id: int
    bos_token_id: int | None
    eos_token_id: int | None
    recovery_tokens: int
    held_out_tokens: int
    recovery_documents: int
    held_out_documents: int
    held_out_texts: list[str] = field(default_factory=list, repr=False)


@dataclass
class Loaders:
    """Recovery (``train``) and held-out (``test``) loaders, one example input batch of size
    1, the class count (0 when unlabeled) and whether batches carry labels; ``text`` describes
    a ``text:PATH`` source (tokenizer, window length, token counts), None for other data."""

    train: Iterable
    test: Iterable
    example: torch.Tensor
    num_classes: int
    name: str
    labeled: bool = True
    text: TextInfo | None = None


def restart_stream(loader: Iterable, seed: int) -> bool:
    """Re-seed ``loader``'s own random stream from ``seed``: a ``DataLoader``'s generator (its
    shuffle order) and its dataset's stream when the dataset has ``reseed(seed)`` (the
    augmentation of :class:`~spruce.compiler.augment.AugmentedImages`). A loader spruce built
    with ``seed`` then gives the batches it gave on its first pass, whatever read it since.
    Returns whether anything was re-seeded: False for a loader drawing from torch's global
    generator, or an iterable that is not a ``DataLoader``."""
    if not isinstance(loader, DataLoader):
        return False
    restarted = False
    if isinstance(loader.generator, torch.Generator):
        loader.generator.manual_seed(seed)
        restarted = True
    reseed = getattr(loader.dataset, "reseed", None)
    if callable(reseed):
        reseed(seed)
        restarted = True
    return restarted
