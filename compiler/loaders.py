"""What a data source hands compile: :class:`Loaders` (recovery and held-out loaders, an
example input, the class count) and, for ``text:PATH`` data, its :class:`TextInfo`. One module
both the built-in data sets (:mod:`spruce.compiler.datasets`) and text data
(:mod:`spruce.compiler.text`) build on, so neither imports the other's users."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Loaders", "TextInfo"]


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
