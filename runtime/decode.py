"""How fast a causal language model runs: greedy decoding with a key/value cache, per-token
decode latency at a batch size (dense and compiled interleaved in one run), prefill latency on a
target at several sequence lengths, and :class:`DecodeTimer`, the decode latency as a budget's
measurement (it stands where the measured budget loop takes a target).

Decoding is timed in eager torch on the CPU, the way ``generate`` runs: a prompt is prefilled
once (untimed), then each timed call crops the cache back to the prompt and decodes a fixed
token sequence (the model's own greedy continuation) one token per step. A call's seconds over
its token count is the per-token latency, so the prefill never enters it. Prompts of a batch
are left-padded (``attention_mask`` 0 on the left, position ids counted from the first real
token), as ``generate`` expects of a decoder.

A model with a key/value cache is one whose forward takes ``cache`` (transformers 5;
``past_key_values`` before) and returns one
with a ``crop`` method (transformers' ``Cache``); spruce's compact twins (graph modules) have
none: write them back with :func:`spruce.to_transformers` first. :func:`greedy_decode` still
decodes a twin, recomputing the prefix every step.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..capture.transformers import is_transformers_model
from ..targets.timing import Timings, time_interleaved

__all__ = ["DecodeRow", "DecodeTimer", "LogitsOnly", "PrefillRow", "greedy_decode", "has_kv_cache",
           "left_pad", "logits_of", "measure_decode", "measure_prefill",
           "measure_prefill_artifacts"]


def _cache_argument(model: nn.Module) -> str | None:
    """The forward argument that takes a key/value cache: ``cache`` (transformers 5) or
    ``past_key_values`` (earlier releases); None for a model without one."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def has_kv_cache(model: nn.Module) -> bool:
    """Is ``model`` a transformers model whose forward takes a key/value cache (``cache`` or
    ``past_key_values``)? A compact twin does not, even where its graph keeps the source's
    signature (it refuses the optional inputs it was not captured with)."""
    return is_transformers_model(model) and _cache_argument(model) is not None


def _cache_of(output: Any) -> Any:
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def logits_of(output: Any) -> torch.Tensor:
    """The next-token logits (N, T, V) in a model's output: ``.logits``, a ``"logits"`` key, the
    first element of a tuple or list, or the tensor itself. ``TypeError`` otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read next-token logits from a {type(output).__name__}: expected .logits, a tuple or a "
                    "tensor (N, T, vocabulary)")


class LogitsOnly(nn.Module):
    """``model`` as a function of ``input_ids`` (N, T) int64 returning its logits (N, T, V),
    without a key/value cache: what a target builds and times for prefill."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if has_kv_cache(self.model):
            return logits_of(self.model(input_ids=input_ids, use_cache=False))
        return logits_of(self.model(input_ids))


def left_pad(prompts: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D int64 prompts as one left-padded batch: ``(input_ids, attention_mask)``, both (N, P)
    with P the longest prompt. ``ValueError`` for no prompt or an empty one."""
    if not prompts:
        raise ValueError("left_pad: no prompts")
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if any(r.numel() == 0 for r in rows):
        raise ValueError("left_pad: an empty prompt")
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, width - row.numel():] = row
        mask[k, width - row.numel():] = 1
    return ids, mask


def _check_left_padded(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be (N, P), got shape {tuple(mask.shape)}")
    if (mask.sum(-1) == 0).any():
        raise ValueError("a prompt has no real token (attention_mask all 0)")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("prompts must be left-padded for decoding: a row has a pad (attention_mask 0) after a real "
                         "token")


class _CachedDecoder:
    """One model's prompt batch prefilled once: :meth:`decode` crops the cache back to the prompt
    and decodes ``steps`` tokens (``feed``: the tokens fed at each step, else greedy)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model, self.mask = model, attention_mask
        self.length = input_ids.shape[1]
        self.positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=self.positions,
                        use_cache=True)
        self.argument = _cache_argument(model)
        self.cache = _cache_of(out)
        if not (hasattr(self.cache, "crop") and hasattr(self.cache, "get_seq_length")):
            raise ValueError(f"{type(model).__name__} returned a key/value cache without crop() "
                             f"({type(self.cache).__name__}); decode timing needs a transformers Cache")
        self.first = logits_of(out)[:, -1].argmax(-1)

    def decode(self, steps: int, feed: torch.Tensor | None = None) -> torch.Tensor:
        """(N, steps) int64: the token chosen at each step (greedy: the argmax fed back)."""
        extra = int(self.cache.get_seq_length()) - self.length
        if extra > 0:
            self.cache.crop(-extra)  # a negative count removes that many tokens (every release takes it)
        token, mask, position = self.first, self.mask, self.positions[:, -1:]
        chosen = [token]
        with torch.inference_mode():
            for step in range(steps - 1):
                fed = token if feed is None else feed[:, step]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                position = position + 1
                out = self.model(input_ids=fed[:, None], attention_mask=mask, position_ids=position,
                                 use_cache=True, **{self.argument: self.cache})
                token = logits_of(out)[:, -1].argmax(-1)
                chosen.append(token)
        return torch.stack(chosen, dim=1)


def greedy_decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  new_tokens: int = 16) -> torch.Tensor:
    """The greedy continuation (N, ``new_tokens``) int64 of left-padded prompts ``input_ids``
    (N, P) int64 (``attention_mask`` (N, P), 1 for real tokens; default all 1).

    A transformers decoder decodes with its key/value cache (position ids counted from each row's
    first real token, as ``generate`` does); a model without one (a compact twin) is run on each
    prompt's real tokens alone, recomputing the prefix every step. The tokens equal
    ``generate(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)``'s.
    Raises ``ValueError`` for a bad ``new_tokens``, a prompt without real tokens or one that is
    not left-padded."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be a positive integer, got {new_tokens!r}")
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (N, P), got shape {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    _check_left_padded(mask)
    was_training = model.training
    model.eval()
    try:
        if has_kv_cache(model):
            return _CachedDecoder(model, input_ids, mask).decode(new_tokens)
        rows = []
        with torch.inference_mode():
            for ids, row_mask in zip(input_ids, mask):
                seq = ids[row_mask.bool()][None]
                for _ in range(new_tokens):
                    token = logits_of(model(seq))[:, -1].argmax(-1)
                    seq = torch.cat([seq, token[:, None]], dim=1)
                rows.append(seq[0, -new_tokens:])
        return torch.stack(rows)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class DecodeRow:
    """Per-token decode latency of one model (``which``) at ``batch_size`` with a key/value
    cache: ``ms_per_token`` (load-robust, :meth:`Timings.robust_ms`) and ``median_ms_per_token``
    (wall-clock median) per decode step of the whole batch, ``tokens_per_s`` =
    ``batch_size`` x 1000 / ``ms_per_token``; ``prompt_tokens`` and ``new_tokens`` per call."""

    which: str
    batch_size: int
    ms_per_token: float
    median_ms_per_token: float
    tokens_per_s: float
    prompt_tokens: int
    new_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _decode_calls(models: Mapping[str, nn.Module], input_ids: torch.Tensor, mask: torch.Tensor,
                  new_tokens: int) -> list[Callable[[], Any]]:
    calls = []
    for which, model in models.items():
        if not has_kv_cache(model):
            raise ValueError(f"decode timing of {which!r} needs a model with a key/value cache (a transformers "
                             f"decoder), got {type(model).__name__}; write a compact model back with "
                             "spruce.to_transformers first")
        decoder = _CachedDecoder(model.eval(), input_ids, mask)
        feed = decoder.decode(new_tokens)  # the model's own greedy tokens, fed back identically every call
        calls.append(functools.partial(decoder.decode, new_tokens, feed))
    return calls


def _per_token(timing: Timings, steps: int) -> Timings:
    return Timings(timing.wall_s / steps, timing.waiting_s / steps)


def _decode_timings(models: Mapping[str, nn.Module], input_ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                    warmup: int, rounds: int) -> list[Timings]:
    """Per-token Timings (seconds per decode step) of each model, interleaved in one run."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an integer >= 2 (the first token comes from the prefill), "
                         f"got {new_tokens!r}")
    _check_left_padded(mask)
    calls = _decode_calls(models, input_ids, mask, new_tokens)
    timings = time_interleaved(calls, warmup, rounds)
    return [_per_token(t, new_tokens - 1) for t in timings]


def measure_decode(models: Mapping[str, nn.Module], prompts: Sequence[torch.Tensor],
                   batch_sizes: Sequence[int] = (1, 8), new_tokens: int = 16, pad_token_id: int = 0,
                   warmup: int = 2, rounds: int = 10) -> list[DecodeRow]:
    """Per-token decode latency with a key/value cache of each of ``models`` (name -> transformers
    decoder) at each batch size, the models interleaved in one run per batch size
    (:func:`~spruce.targets.timing.time_interleaved`: ``warmup`` untimed calls, ``rounds`` rounds).

    The batch of size ``b`` is the first ``b`` of ``prompts`` (1-D int64 token ids, cycled when
    fewer), left-padded with ``pad_token_id`` (:func:`left_pad`); each call decodes ``new_tokens``
    tokens after the prompt (the first from the untimed prefill, so ``new_tokens - 1`` timed
    steps). Returns one :class:`DecodeRow` per (batch size, model), in that order. Raises
    ``ValueError`` for a model without a key/value cache, no prompts or bad options."""
    if not models:
        raise ValueError("measure_decode: no models")
    if not prompts:
        raise ValueError("measure_decode: no prompts")
    rows = []
    for batch_size in batch_sizes:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch sizes must be positive integers, got {batch_size!r}")
        chosen = [prompts[k % len(prompts)] for k in range(batch_size)]
        input_ids, mask = left_pad(chosen, pad_token_id)
        timings = _decode_timings(models, input_ids, mask, new_tokens, warmup, rounds)
        for which, timing in zip(models, timings):
            robust = timing.robust_ms()
            rows.append(DecodeRow(which, batch_size, robust, timing.wall_median_ms(), batch_size * 1e3 / robust,
                                  input_ids.shape[1], new_tokens))
    return rows


@dataclass(frozen=True)
class PrefillRow:
    """Prefill latency of one model (``which``) at batch 1 and ``length`` tokens on a target:
    ``ms`` load-robust, ``median_ms`` the wall-clock median."""

    which: str
    length: int
    ms: float
    median_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_prefill(models: Mapping[str, nn.Module], target: Any, lengths: Sequence[int] = (32, 64, 128),
                    vocab_size: int | None = None, warmup: int = 3, rounds: int = 15) -> list[PrefillRow]:
    """Prefill latency (logits of every position, no cache) of each of ``models`` at batch 1 and each
    of ``lengths`` on ``target`` (a :class:`~spruce.targets.base.Target`, e.g. ONNX Runtime CPU):
    every (model, length) is built for the target and all are timed interleaved in one run
    (:meth:`Target.measure_models <spruce.targets.base.Target.measure_models>`). Inputs are
    seeded random token ids below ``vocab_size`` (default: the model's ``config.vocab_size``, else
    2). Returns one :class:`PrefillRow` per (length, model), in that order. Raises ``ValueError``
    for no models or a bad length; the target's errors (``TargetUnavailable``) as they come."""
    if not models:
        raise ValueError("measure_prefill: no models")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"prefill lengths must be positive integers, got {length!r}")
    if vocab_size is None:
        vocab_size = min(int(getattr(getattr(m, "config", None), "vocab_size", 2)) for m in models.values())
    generator = torch.Generator().manual_seed(0)
    cases, keys = [], []
    for length in lengths:
        ids = torch.randint(0, vocab_size, (1, length), generator=generator)
        for which, model in models.items():
            cases.append((LogitsOnly(model.eval()), (ids,)))
            keys.append((which, length))
    timings = target.measure_models(cases, warmup=warmup, rounds=rounds)
    return [PrefillRow(which, length, t.robust_ms(), t.wall_median_ms()) for (which, length), t in zip(keys, timings)]


def measure_prefill_artifacts(artifacts: Mapping[str, Any], target: Any, lengths: Sequence[int] = (32, 64, 128),
                              vocab_size: int = 2, warmup: int = 3, rounds: int = 15) -> list[PrefillRow]:
    """Prefill latency of built artifacts (name -> :class:`~spruce.targets.base.Artifact` of a
    model of ``input_ids``, built with a dynamic sequence length) at batch 1 and each of
    ``lengths``, all (artifact, length) calls interleaved in one run through the target's timing
    runners; inputs are seeded random ids below ``vocab_size``. Returns one :class:`PrefillRow`
    per (length, artifact), in that order; the runtime's error where an artifact does not take a
    length."""
    if not artifacts:
        raise ValueError("measure_prefill_artifacts: no artifacts")
    target.require()
    runners = {which: target.timing_runner(artifact) for which, artifact in artifacts.items()}
    generator = torch.Generator().manual_seed(0)
    calls, keys = [], []
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"prefill lengths must be positive integers, got {length!r}")
        ids = torch.randint(0, vocab_size, (1, length), generator=generator)
        for which, artifact in artifacts.items():
            calls.append(functools.partial(runners[which], target.prepare_inputs(artifact, (ids,))))
            keys.append((which, length))
    timings = time_interleaved(calls, warmup, rounds, target.synchronize, target.caller_cpu())
    return [PrefillRow(which, length, t.robust_ms(), t.wall_median_ms()) for (which, length), t in zip(keys, timings)]


class DecodeTimer:
    """The per-token decode latency at batch 1 with a key/value cache, measured the way a target
    measures models, so the measured budget loop (:func:`spruce.runtime.budget.meet_latency_budget`,
    :func:`spruce.api.budget.meet_budget`) can meet a ``decode`` budget with it in place of a target.

    :meth:`measure_models` takes (model, example inputs) cases; each model is turned into a
    decoder by ``as_decoder`` (default: the model itself, which must then have a key/value
    cache; spruce's compact graphs are written back with ``to_transformers``, see
    :func:`spruce.api.budget.decode_timer`). The prompt is the first row of the first case's
    first input (``input_ids`` (N, L) int64), its first ``prompt_tokens`` tokens (default all);
    each call decodes ``new_tokens`` tokens. The returned :class:`Timings` are seconds per
    decoded token, so ``robust_ms()`` is ms per token and ratios are decode-latency ratios."""

    name = "decode"

    def __init__(self, as_decoder: Callable[[nn.Module], nn.Module] | None = None, prompt_tokens: int | None = None,
                 new_tokens: int = 16):
        if prompt_tokens is not None and (isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int)
                                          or prompt_tokens < 1):
            raise ValueError(f"prompt_tokens must be a positive integer, got {prompt_tokens!r}")
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
            raise ValueError(f"new_tokens must be an integer >= 2, got {new_tokens!r}")
        self.as_decoder = as_decoder or (lambda model: model)
        self.prompt_tokens, self.new_tokens = prompt_tokens, new_tokens

    def require(self) -> None:
        """Nothing to check: decoding runs in eager torch on the CPU."""

    def fingerprint(self) -> dict[str, str]:
        return {"target": self.name, "torch": torch.__version__, "threads": str(torch.get_num_threads())}

    def measure_models(self, cases: Sequence[tuple[nn.Module, Sequence[torch.Tensor]]], warmup: int = 3,
                       rounds: int = 20) -> list[Timings]:
        """Per-token decode :class:`Timings` (seconds per token, batch 1) of each case's model,
        interleaved in one run. ``ValueError`` for no cases or a first input that is not token ids."""
        if not cases:
            raise ValueError("measure_models: no models given")
        first = tuple(cases[0][1])[0] if cases[0][1] else None
        if not isinstance(first, torch.Tensor) or first.dim() != 2 or first.is_floating_point():
            raise ValueError("decode timing needs token ids (N, L) int64 as the first example input")
        prompt = first[:1, : self.prompt_tokens] if self.prompt_tokens else first[:1]
        decoders = {f"model{k}": self.as_decoder(model) for k, (model, _) in enumerate(cases)}
        modes = {k: m.training for k, m in decoders.items()}
        try:
            return _decode_timings(decoders, prompt.long(), torch.ones_like(prompt, dtype=torch.long),
                                   self.new_tokens, warmup, rounds)
        finally:
            for key, model in decoders.items():
                model.train(modes[key])
