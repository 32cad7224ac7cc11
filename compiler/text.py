"""Text data for ``spruce compile``: ``text:PATH``, tokenized with the model's tokenizer into
windows of the example's length.

``PATH`` is a text file or a folder of text files (read recursively; hidden files and folders
skipped). A *document* is one file; a single file given as ``PATH`` is one document, and its
windows are then the units of the split.

Scheme: one document per window, padded (no packing). Each document is tokenized without
special tokens, framed as ``[BOS] + ids + [EOS]`` (where the tokenizer has them) and cut into
consecutive windows of ``L`` tokens; the last window is right-padded with the pad token and
``attention_mask`` 0, and its ``labels`` are -100 there, so losses skip pads. Windows with fewer
than two real tokens (no next token to predict) are dropped.

Split: documents are deduplicated by the sha256 of their text. With ``PATH/recover/`` and
``PATH/heldout/`` sub-folders those are the two sets; otherwise a seeded permutation holds out
one document in ten (at least one). Held-out windows identical to a recovery window are dropped,
so the two sets are disjoint by content.

Batches are dicts ``{"input_ids": (N, L) int64, "attention_mask": (N, L) int64,
"labels": (N, L) int64}``; ``labels`` are the inputs (not shifted: a transformers causal LM
shifts them itself) with -100 on pads.

Bad input raises :class:`~spruce.compiler.specs.DataError` naming the file or option: a missing
path, an empty or binary (NUL byte, not UTF-8) file, text shorter than one window, too few
documents to hold one out, a tokenizer with more tokens than the model's embedding rows.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..passes.config import short_repr
from .loaders import Loaders, TextInfo
from .specs import TEXT_SCHEME, DataError

__all__ = ["HELD_OUT_EVERY", "TEXT_SCHEME", "TextInfo", "TokenWindows", "check_vocabulary", "load_text",
           "load_tokenizer", "read_documents", "text_path", "windows_of"]

# One document in this many is held out when the folder has no recover/ and heldout/ sub-folders.
HELD_OUT_EVERY = 10

# A file is read as text when it decodes as UTF-8 and holds no NUL byte.
_IGNORE = -100


def text_path(spec: str) -> Path:
    """The path of a ``text:PATH`` spec."""
    return Path(spec.partition(":")[2])


def load_tokenizer(folder: str | Path) -> Any:
    """The transformers tokenizer saved in ``folder`` (``AutoTokenizer.from_pretrained``);
    :class:`DataError` naming the folder when none loads."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"text data needs transformers to load the tokenizer of {folder} "
                        "(pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"no tokenizer loads from {folder}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def check_vocabulary(tokenizer: Any, embedding_rows: int, where: str = "the model") -> None:
    """Raise :class:`DataError` when the tokenizer can emit ids the model has no embedding row
    for (``len(tokenizer) > embedding_rows``). More rows than tokens is allowed (vocabularies
    padded to a multiple of 64 are common)."""
    size = len(tokenizer)
    if size > embedding_rows:
        raise DataError(f"tokenizer has {size:,} tokens but {where}'s input embedding has {embedding_rows:,} rows: "
                        "the tokenizer does not belong to this model")


def _read_text(path: Path, spec: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data {short_repr(spec)}: cannot read {path}: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise DataError(f"data {short_repr(spec)}: {path} is binary (holds NUL bytes), not a text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"data {short_repr(spec)}: {path} is not UTF-8 text (byte {exc.start}: "
                        f"{raw[exc.start:exc.start + 1]!r})") from None


def _files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
    return found


def read_documents(path: Path, spec: str) -> list[tuple[str, str]]:
    """``(name, text)`` of every non-empty text document under ``path`` (a file, or a folder read
    recursively, hidden entries skipped), deduplicated by content, in path order. Raises
    :class:`DataError` for a missing path, an empty file given directly, a folder without a
    non-empty file, or any binary / non-UTF-8 file (named)."""
    if not path.exists():
        raise DataError(f"data {short_repr(spec)}: no such file or folder {path}")
    if path.is_file():
        text = _read_text(path, spec)
        if not text.strip():
            raise DataError(f"data {short_repr(spec)}: {path} is empty")
        return [(path.name, text)]
    documents, seen = [], set()
    for file in _files(path):
        text = _read_text(file, spec)
        digest = hashlib.sha256(text.encode()).digest()
        if text.strip() and digest not in seen:
            seen.add(digest)
            documents.append((str(file.relative_to(path)), text))
    if not documents:
        raise DataError(f"data {short_repr(spec)}: folder {path} holds no non-empty text file")
    return documents


def _special(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return int(value) if value is not None else None


def windows_of(token_ids: list[int], sequence_length: int, bos: int | None, eos: int | None) -> list[list[int]]:
    """``[BOS] + token_ids + [EOS]`` cut into consecutive windows of at most ``sequence_length``
    tokens; a window with fewer than two tokens is dropped (nothing to predict)."""
    framed = ([bos] if bos is not None else []) + list(token_ids) + ([eos] if eos is not None else [])
    cuts = [framed[i:i + sequence_length] for i in range(0, len(framed), sequence_length)]
    return [w for w in cuts if len(w) >= 2]


class TokenWindows(Dataset):
    """Windows of token ids, each padded to ``L``; items are dicts of ``input_ids``,
    ``attention_mask`` (1 real, 0 pad) and ``labels`` (-100 on pads), each (L,) int64."""

    def __init__(self, windows: list[list[int]], sequence_length: int, pad_token_id: int):
        self.ids = torch.full((len(windows), sequence_length), pad_token_id, dtype=torch.int32)
        self.lengths = torch.tensor([len(w) for w in windows], dtype=torch.int64)
        for row, window in enumerate(windows):
            self.ids[row, :len(window)] = torch.tensor(window, dtype=torch.int32)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.ids[index].long()
        mask = (torch.arange(len(input_ids)) < self.lengths[index]).long()
        return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, _IGNORE)}

    def tokens(self) -> int:
        """Real (non-pad) tokens over all windows."""
        return int(self.lengths.sum())


def _tokenize(tokenizer: Any, texts: list[str], spec: str) -> list[list[int]]:
    try:
        return list(tokenizer(texts, add_special_tokens=False)["input_ids"])
    except Exception as exc:
        raise DataError(f"data {short_repr(spec)}: the tokenizer failed: {type(exc).__name__}: {exc}") from None


def _split_documents(spec: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
    """Recovery and held-out documents (held out None: split the recovery ones)."""
    path = text_path(spec)
    if path.is_dir() and (path / "recover").is_dir() and (path / "heldout").is_dir():
        recover = read_documents(path / "recover", spec)
        known = {hashlib.sha256(text.encode()).digest() for _, text in recover}
        held = [(n, t) for n, t in read_documents(path / "heldout", spec)
                if hashlib.sha256(t.encode()).digest() not in known]
        if not held:
            raise DataError(f"data {short_repr(spec)}: every held-out document is also a recovery document")
        return recover, held
    return read_documents(path, spec), None


def _hold_out(count: int, seed: int, what: str, spec: str) -> np.ndarray:
    if count < 2:
        raise DataError(f"data {short_repr(spec)}: {count} {what}; at least 2 are needed (recovery and held out)")
    return np.sort(np.random.default_rng(seed).permutation(count)[:max(1, count // HELD_OUT_EVERY)])


def load_text(spec: str, tokenizer: Any, sequence_length: int, seed: int = 0, batch_size: int = 64,
              embedding_rows: int | None = None):
    """Recovery and held-out :class:`~spruce.compiler.datasets.Loaders` of token windows from
    ``text:PATH`` (see the module docstring for the scheme and the split); ``tokenizer`` is a
    transformers tokenizer or a folder to load one from; ``embedding_rows`` (the model's input
    embedding rows) is checked against the tokenizer. Raises :class:`DataError` for the bad
    input listed in the module docstring, before tokenizing where the check allows."""
    if sequence_length < 2:
        raise DataError(f"data {short_repr(spec)}: windows of {sequence_length} token(s) hold nothing to predict; "
                        "the example input must be (1, L) token ids with L >= 2")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if embedding_rows is not None:
        check_vocabulary(tokenizer, embedding_rows)
    recover_docs, held_docs = _split_documents(spec)
    bos, eos = _special(tokenizer, "bos_token_id"), _special(tokenizer, "eos_token_id")
    pad = _special(tokenizer, "pad_token_id")
    pad = pad if pad is not None else eos if eos is not None else 0
    all_docs = recover_docs + (held_docs or [])
    ids = _tokenize(tokenizer, [text for _, text in all_docs], spec)
    total = sum(len(x) for x in ids)
    if total < sequence_length:
        raise DataError(f"data {short_repr(spec)}: {total} tokens in all, fewer than one window of {sequence_length}; "
                        "give more text or a shorter example input")
    per_doc = [windows_of(x, sequence_length, bos, eos) for x in ids]
    if held_docs is not None:
        recover_windows = [w for doc in per_doc[:len(recover_docs)] for w in doc]
        held_windows = [w for doc in per_doc[len(recover_docs):] for w in doc]
        held_texts = [text for _, text in held_docs]
        recovery_documents, held_out_documents = len(recover_docs), len(held_docs)
    elif len(all_docs) >= 2:
        held = set(_hold_out(len(all_docs), seed, "documents", spec).tolist())
        recover_windows = [w for i, doc in enumerate(per_doc) if i not in held for w in doc]
        held_windows = [w for i, doc in enumerate(per_doc) if i in held for w in doc]
        held_texts = [all_docs[i][1] for i in sorted(held)]
        recovery_documents, held_out_documents = len(all_docs) - len(held), len(held)
    else:  # one document: its windows are the units of the split
        windows = per_doc[0]
        held = set(_hold_out(len(windows), seed, f"windows of {sequence_length} tokens in {all_docs[0][0]}",
                             spec).tolist())
        recover_windows = [w for i, w in enumerate(windows) if i not in held]
        held_windows = [w for i, w in enumerate(windows) if i in held]
        held_texts = [tokenizer.decode(w, skip_special_tokens=True) for w in held_windows]
        recovery_documents = held_out_documents = 1
    known = {tuple(w) for w in recover_windows}
    held_windows = [w for w in held_windows if tuple(w) not in known]
    if not held_windows:
        raise DataError(f"data {short_repr(spec)}: every held-out window equals a recovery window")
    train_set = TokenWindows(recover_windows, sequence_length, pad)
    test_set = TokenWindows(held_windows, sequence_length, pad)
    full = [i for i, w in enumerate(recover_windows) if len(w) == sequence_length]
    example = train_set[full[0] if full else 0]["input_ids"][None].clone()
    info = TextInfo(tokenizer, sequence_length, pad, bos, eos, train_set.tokens(), test_set.tokens(),
                    recovery_documents, held_out_documents, held_texts)
    generator = torch.Generator().manual_seed(seed)
    name = (f"text {text_path(spec)} ({recovery_documents} recovery / {held_out_documents} held-out documents, "
            f"{len(train_set)} / {len(test_set)} windows of {sequence_length} tokens)")
    return Loaders(
        train=DataLoader(train_set, batch_size=min(batch_size, len(train_set)), shuffle=True, generator=generator,
                         drop_last=True),
        test=DataLoader(test_set, batch_size=batch_size),
        example=example, num_classes=0, name=name, labeled=False, text=info)
