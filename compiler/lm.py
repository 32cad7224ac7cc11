"""Causal language models in ``spruce compile``: recognising one, its next-token losses and
measures, and how many tokens recovery may spend.

A model is a causal LM (:func:`causal_lm_reason`) when it is a transformers model whose class
name ends in ``ForCausalLM`` / ``LMHeadModel`` or whose config lists such an architecture
(and is not an encoder-decoder). Its ``logits`` output (N, L, V) is then of kind ``lm``
(:mod:`spruce.compiler.kinds`), never generic class scores: the logits at position t are the
distribution of the token at t + 1 of the input ids (N, L), and a position whose next token
is the pad id counts nowhere.

- :func:`lm_kl`: KL(dense || compiled) of the next-token distributions at temperature T (times
  T squared), summed over the vocabulary, averaged over non-pad positions; computed in chunks of
  :data:`KL_CHUNK_POSITIONS` positions, each chunk's softmaxes recomputed in the backward pass
  (activation checkpointing), so the extra memory is a chunk's (chunk, V), not (N, L, V) times three;
- :func:`lm_loss`: the model's own LM loss, cross-entropy of the logits against the next
  input token (pads skipped): what transformers computes with ``labels=input_ids``;
- :func:`next_token_nll`: summed negative log-likelihood and token count, for perplexity.

Recovery's token budget (:func:`recovery_tokens`): ``recover_tokens`` when given, else 10 %
of the dense model's training tokens when its folder has a ``training.json`` with
``tokens_trained`` (written by the example LM's training script, examples/lm) or ``tokens``,
else None: recovery then runs the recipe's ``epochs`` over the recovery data, as for any other
model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .datasets import inputs_of

__all__ = ["KL_CHUNK_POSITIONS", "RECOVERY_TOKEN_SHARE", "TRAINING_TOKEN_KEYS", "causal_lm_reason", "lm_kl",
           "lm_loss", "next_token_mask", "next_token_nll", "recovery_tokens"]

KL_CHUNK_POSITIONS = 256  # positions per chunk of the KL (each chunk holds (chunk, V) floats a few times)
RECOVERY_TOKEN_SHARE = 0.1  # default recovery tokens: this share of the dense model's training tokens
TRAINING_TOKEN_KEYS = ("tokens_trained", "tokens")  # where training.json records them (the example LM: the first)
_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def causal_lm_reason(model: nn.Module) -> str | None:
    """Why ``model`` is a causal LM (its class or config architecture, see the module doc), or
    None. transformers is not imported."""
    if not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return None
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    name = type(model).__name__
    if name.endswith(_LM_SUFFIXES):
        return f"a transformers causal LM ({name})"
    architectures = [a for a in (getattr(config, "architectures", None) or []) if a.endswith(_LM_SUFFIXES)]
    if architectures:
        return f"a transformers causal LM (config architectures {architectures[0]})"
    return None


def next_token_mask(tokens: torch.Tensor, pad: int | None) -> torch.Tensor:
    """(N, L - 1) bool: the positions 0..L-2 whose next token (``tokens[:, 1:]``) is not ``pad``."""
    following = tokens[:, 1:]
    return torch.ones_like(following, dtype=torch.bool) if pad is None else following != pad


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, temperature: float) -> torch.Tensor:
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return ((log_teacher.exp() * (log_teacher - log_student)).sum(-1) * keep).sum()


def lm_kl(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor, pad: int | None = None,
          temperature: float = 1.0, chunk: int = KL_CHUNK_POSITIONS) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions, logits (N, L, V) each, at every
    position whose next token of ``tokens`` (N, L) is not ``pad``; the mean over those positions
    times ``temperature`` squared (0 when there are none). Chunks are views of one sequence's
    positions (no copy of the logits); memory: see the module doc."""
    keep = next_token_mask(tokens, pad).to(torch.float32)
    teacher = teacher.detach()
    total = student.new_zeros((), dtype=torch.float32)
    for row in range(student.shape[0]):
        for start in range(0, student.shape[1] - 1, chunk):
            end = min(start + chunk, student.shape[1] - 1)
            parts = (student[row, start:end], teacher[row, start:end], keep[row, start:end])
            total = total + (checkpoint(_kl_rows, *parts, temperature, use_reentrant=False) if student.requires_grad
                             else _kl_rows(*parts, temperature))
    return total / keep.sum().clamp_min(1.0) * temperature ** 2


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor, pad: int | None = None) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood of every non-pad next token, their count) of logits (N, L, V)."""
    keep = next_token_mask(tokens, pad)
    rows, targets = logits[:, :-1][keep].float(), tokens[:, 1:][keep]
    return F.cross_entropy(rows, targets, reduction="sum"), int(keep.sum())


def lm_loss(outputs: Any, batch: Any, pad: int | None = None) -> torch.Tensor:
    """The model's own LM loss: mean cross-entropy of each position's logits against the next
    input token, pads skipped (``batch``: the (N, L) token ids, (ids, anything), or a token
    batch dict with ``input_ids``)."""
    tokens = inputs_of(batch)
    logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs
    total, count = next_token_nll(logits, tokens, pad)
    return total / max(count, 1)


def recovery_tokens(given: int | None, model_folder: str | Path | None) -> tuple[int | None, str]:
    """The token budget of LM recovery and where it came from: ``given``; else
    :data:`RECOVERY_TOKEN_SHARE` of ``training.json``'s ``tokens`` in ``model_folder``; else
    (None, why): the recipe's epochs bound recovery."""
    if given is not None:
        return int(given), "recover_tokens"
    record = Path(model_folder) / "training.json" if model_folder is not None else None
    if record is not None and record.is_file():
        try:
            document = json.loads(record.read_text(encoding="utf-8"))
            tokens = int(document[next(k for k in TRAINING_TOKEN_KEYS if k in document)])
        except (ValueError, KeyError, TypeError, StopIteration) as exc:
            raise ValueError(f"{record}: cannot read the dense model's training tokens ({exc}); "
                             "give recover_tokens instead") from None
        return max(1, int(tokens * RECOVERY_TOKEN_SHARE)), f"{RECOVERY_TOKEN_SHARE:.0%} of {tokens} training tokens"
    return None, "the recipe's epochs (no training.json beside the model, no recover_tokens)"
