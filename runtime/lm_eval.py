"""How well a compiled causal language model keeps its dense model's behaviour, measured on
held-out token batches: perplexity, next-token top-1 agreement, greedy continuation agreement,
parameters and memory, and which structures were removed.

A batch is a mapping ``{"input_ids": (N, T) int64, "attention_mask": (N, T) int64 (1 real, 0
pad), "labels": (N, T) int64}`` with ``labels`` aligned with ``input_ids`` (not shifted; -100 where
nothing is predicted, e.g. pads), as a transformers causal LM takes them: the logits at position
``t`` predict ``labels[t + 1]``. Padding is on the right (each row's real tokens first), so a
model that takes no ``attention_mask`` (spruce's compact twin of ``input_ids``) computes the same
logits at every real position.

A bare tensor of token ids (N, T) (or a tuple whose first element is one) is a batch without pads.

A model is a transformers causal LM or any module of ``input_ids`` whose output holds the logits
(N, T, V) (:func:`~spruce.runtime.decode.logits_of`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.transformers import is_transformers_model
from .decode import greedy_decode, left_pad, logits_of

__all__ = ["Continuations", "Footprint", "LMEvaluation", "Perplexity", "continuation_agreement", "evaluate_lm",
           "footprint", "lm_logits", "next_token_agreement", "perplexity", "prompts_from_batches",
           "removed_structures"]

IGNORE_INDEX = -100
# The config fields of a decoder whose change says what was removed.
STRUCTURE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "hidden_size", "vocab_size")


def _takes(model: nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _batch(batch: Mapping[str, torch.Tensor] | torch.Tensor | Sequence[torch.Tensor],
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(batch, torch.Tensor):  # bare token ids: every token real
        batch = {"input_ids": batch}
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        batch = {"input_ids": batch[0]}  # (ids, anything): the ids
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"a token batch is a mapping with input_ids, attention_mask and labels (or a tensor of "
                         f"token ids), got {type(batch).__name__}")
    ids = torch.as_tensor(batch["input_ids"]).long()
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (N, T), got shape {tuple(ids.shape)}")
    mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids))).long()
    labels = batch.get("labels")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None else torch.as_tensor(labels).long()
    if mask.shape != ids.shape or labels.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} and labels {tuple(labels.shape)} must match input_ids "
                         f"{tuple(ids.shape)}")
    return ids, mask, labels


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The logits (N, T, V) of ``model`` at every position, without a key/value cache; the mask
    is given to transformers models only (right padding makes it unnecessary; a compact twin
    refuses an input it was not captured with)."""
    with torch.inference_mode():
        if not is_transformers_model(model):
            return logits_of(model(input_ids))
        kwargs: dict[str, Any] = {"use_cache": False} if _takes(model, "use_cache") else {}
        if attention_mask is not None and _takes(model, "attention_mask"):
            kwargs["attention_mask"] = attention_mask
        return logits_of(model(input_ids=input_ids, **kwargs))


@dataclass(frozen=True)
class Perplexity:
    """Token-weighted held-out perplexity: ``nll`` (summed negative log-likelihood, nats) over
    ``tokens`` predicted tokens; ``value`` = exp(nll / tokens)."""

    nll: float
    tokens: int

    @property
    def value(self) -> float:
        return float(torch.exp(torch.tensor(self.nll / self.tokens, dtype=torch.float64))) if self.tokens else \
            float("nan")


def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> Perplexity:
    """Held-out perplexity of ``model`` over ``batches`` (see the module doc): every label that is
    not -100 counts once, whatever batch it is in (so it equals ``exp`` of the model's own mean
    loss on one unpadded batch). Raises ``ValueError`` for a malformed batch or no label at all."""
    nll, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids, mask, labels = _batch(batch)
            logits = lm_logits(model, ids, mask)[:, :-1]
            target = labels[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((target != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("perplexity: the batches hold no label to predict")
    return Perplexity(nll, tokens)


def next_token_agreement(dense: nn.Module, compiled: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """The fraction of predicted positions (labels not -100, shifted as in :func:`perplexity`)
    where ``compiled``'s top-1 next token equals ``dense``'s, in [0, 1]. ``ValueError`` as
    :func:`perplexity`."""
    same, count = 0, 0
    modes = (dense.training, compiled.training)
    dense.eval(), compiled.eval()
    try:
        for batch in batches:
            ids, mask, labels = _batch(batch)
            predicted = labels[:, 1:] != IGNORE_INDEX
            top_dense = lm_logits(dense, ids, mask)[:, :-1].argmax(-1)
            top_compiled = lm_logits(compiled, ids, mask)[:, :-1].argmax(-1)
            same += int((top_dense == top_compiled)[predicted].sum())
            count += int(predicted.sum())
    finally:
        dense.train(modes[0]), compiled.train(modes[1])
    if count == 0:
        raise ValueError("next_token_agreement: the batches hold no label to predict")
    return same / count


def prompts_from_batches(batches: Iterable[Mapping[str, torch.Tensor]], prompt_tokens: int = 32,
                         count: int = 8) -> list[torch.Tensor]:
    """Up to ``count`` held-out prompts: the first ``prompt_tokens`` real tokens (1-D int64) of
    the first rows that have that many. ``ValueError`` when no row is long enough."""
    prompts: list[torch.Tensor] = []
    for batch in batches:
        ids, mask, _ = _batch(batch)
        for row, row_mask in zip(ids, mask):
            real = row[row_mask.bool()]
            if real.numel() >= prompt_tokens:
                prompts.append(real[:prompt_tokens].clone())
                if len(prompts) == count:
                    return prompts
    if not prompts:
        raise ValueError(f"no held-out row has {prompt_tokens} real tokens for a prompt")
    return prompts


@dataclass(frozen=True)
class Continuations:
    """Greedy continuations of ``prompts`` held-out prompts, ``new_tokens`` each, by dense and
    compiled: ``token_agreement`` the fraction of positions with the same token (in [0, 1]),
    ``prefix_tokens`` the mean number of leading tokens that agree (0..new_tokens),
    ``identical`` the fraction of prompts continued identically."""

    prompts: int
    new_tokens: int
    token_agreement: float
    prefix_tokens: float
    identical: float


def continuation_agreement(dense: nn.Module, compiled: nn.Module, prompts: Sequence[torch.Tensor],
                           new_tokens: int = 16, pad_token_id: int = 0) -> Continuations:
    """How alike the greedy continuations of ``prompts`` (1-D int64 token ids) by ``dense`` and
    ``compiled`` are (:class:`Continuations`). The prompts are left-padded into one batch
    (``pad_token_id``) and decoded with a key/value cache where the model has one
    (:func:`~spruce.runtime.decode.greedy_decode`). ``ValueError`` for no prompts or bad options."""
    ids, mask = left_pad(prompts, pad_token_id)
    ours = greedy_decode(dense, ids, mask, new_tokens)
    theirs = greedy_decode(compiled, ids, mask, new_tokens)
    equal = ours == theirs
    prefix = torch.cumprod(equal.long(), dim=1).sum(1).double()
    return Continuations(len(prompts), new_tokens, float(equal.double().mean()), float(prefix.mean()),
                         float(equal.all(1).double().mean()))


@dataclass(frozen=True)
class Footprint:
    """A model's size: ``parameters`` (count, shared tensors once), ``parameter_bytes`` and
    ``buffer_bytes`` (bytes), ``kv_bytes_per_token`` (bytes of key/value cache per token of
    context at batch 1, from a transformers config; None otherwise)."""

    parameters: int
    parameter_bytes: int
    buffer_bytes: int
    kv_bytes_per_token: int | None


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, unique = set(), []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique.append(tensor)
    return unique


def footprint(model: nn.Module) -> Footprint:
    """Parameters and memory of ``model`` (:class:`Footprint`)."""
    params = _unique(model.parameters())
    buffers = _unique(model.buffers())
    config = getattr(model, "config", None)
    kv = None
    if config is not None and getattr(config, "num_hidden_layers", None) and getattr(config, "num_attention_heads", 0):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        element = params[0].element_size() if params else 4
        kv = 2 * int(config.num_hidden_layers) * int(kv_heads) * int(head_dim) * element
    return Footprint(sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params),
                     sum(b.numel() * b.element_size() for b in buffers), kv)


def removed_structures(dense: nn.Module, compiled: nn.Module) -> dict[str, Any]:
    """What the compiled model lacks: ``config`` (each of :data:`STRUCTURE_FIELDS` that differs,
    ``[dense, compiled]``, where both are transformers models) and ``parameters`` (each parameter
    of ``dense`` whose shape differs in ``compiled``, ``[dense shape, compiled shape]``, or
    ``None`` where ``compiled`` has no parameter of that name; compared only where the names
    match, else empty)."""
    changed: dict[str, Any] = {}
    dense_config, compiled_config = getattr(dense, "config", None), getattr(compiled, "config", None)
    if dense_config is not None and compiled_config is not None:
        for name in STRUCTURE_FIELDS:
            before, after = getattr(dense_config, name, None), getattr(compiled_config, name, None)
            if before != after:
                changed[name] = [before, after]
    dense_shapes = {n: tuple(p.shape) for n, p in dense.named_parameters()}
    compiled_shapes = {n: tuple(p.shape) for n, p in compiled.named_parameters()}
    shapes: dict[str, Any] = {}
    if set(dense_shapes) & set(compiled_shapes):
        for name, shape in dense_shapes.items():
            other = compiled_shapes.get(name)
            if other != shape:
                shapes[name] = [list(shape), None if other is None else list(other)]
    return {"config": changed, "parameters": shapes}


@dataclass
class LMEvaluation:
    """Dense and compiled side by side (see :func:`evaluate_lm`); :meth:`to_dict` is JSON-ready."""

    dense_perplexity: Perplexity
    compiled_perplexity: Perplexity
    next_token_agreement: float
    continuations: Continuations | None
    dense_footprint: Footprint
    compiled_footprint: Footprint
    removed: dict[str, Any] = field(default_factory=dict)

    @property
    def perplexity_ratio(self) -> float:
        """Compiled / dense perplexity."""
        return self.compiled_perplexity.value / self.dense_perplexity.value

    def to_dict(self) -> dict[str, Any]:
        return {"dense_perplexity": self.dense_perplexity.value, "compiled_perplexity": self.compiled_perplexity.value,
                "perplexity_ratio": self.perplexity_ratio, "held_out_tokens": self.dense_perplexity.tokens,
                "next_token_agreement": self.next_token_agreement,
                "continuations": None if self.continuations is None else asdict(self.continuations),
                "dense": asdict(self.dense_footprint), "compiled": asdict(self.compiled_footprint),
                "removed": self.removed}


def evaluate_lm(dense: nn.Module, compiled: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                prompts: Sequence[torch.Tensor] | None = None, new_tokens: int = 16,
                pad_token_id: int = 0) -> LMEvaluation:
    """Held-out perplexity of both, next-token agreement, greedy continuation agreement on
    ``prompts`` (default: :func:`prompts_from_batches`; skipped when no held-out row is long
    enough), footprints and removed structures. ``batches`` is iterated once per measure (give a
    list or a DataLoader, not a generator)."""
    batches = batches if not inspect.isgenerator(batches) else list(batches)
    if prompts is None:
        try:
            prompts = prompts_from_batches(batches)
        except ValueError:
            prompts = []
    continuations = (continuation_agreement(dense, compiled, prompts, new_tokens, pad_token_id)
                     if prompts else None)
    return LMEvaluation(perplexity(dense, batches), perplexity(compiled, batches),
                        next_token_agreement(dense, compiled, batches), continuations, footprint(dense),
                        footprint(compiled), removed_structures(dense, compiled))
