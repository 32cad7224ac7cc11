"""The language-model part of ``spruce compile``'s report: dense and compiled causal LMs side by
side on the held-out tokens and on the machine.

:func:`lm_section` measures, in this order: held-out perplexity of both, next-token top-1 agreement
and greedy continuation agreement on held-out prompts (:mod:`spruce.runtime.lm_eval`); parameters,
memory and the structures removed; prefill latency of the built artifacts at several sequence
lengths (batch 1, dense and compiled interleaved); decode latency per token with a key/value cache
at batch 1 and 8 (left padding, ``pad_token_id`` set; :mod:`spruce.runtime.decode`), dense and
compiled interleaved. The compiled model decodes as the transformers model it is written back to
(:func:`spruce.to_transformers`); where it cannot be written back, the decode rows are missing and
the reason is recorded. :func:`lm_lines` renders the section for ``report.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..api.transformers import to_transformers
from ..runtime.decode import has_kv_cache, measure_decode, measure_prefill_artifacts
from ..runtime.lm_eval import evaluate_lm, prompts_from_batches
from .results import Built, Exported, LMEvaluated, Reference, Setup, Workspace

__all__ = ["DECODE_BATCH_SIZES", "evaluate_language_model", "lm_lines", "lm_section"]

DECODE_BATCH_SIZES = (1, 8)
PROMPT_TOKENS = 32  # held-out prompt length for continuations and decode (at most half the sequence)


def _decoder(compiled: nn.Module, dense: nn.Module) -> tuple[nn.Module | None, str | None]:
    """``compiled`` as a model with a key/value cache, or (None, why not)."""
    if has_kv_cache(compiled):
        return compiled, None
    try:
        return to_transformers(compiled, dense).eval(), None
    except ValueError as exc:
        return None, str(exc)


def _prefill_lengths(sequence_length: int) -> tuple[int, ...]:
    return tuple(sorted({max(2, sequence_length // 4), max(2, sequence_length // 2), sequence_length}))


def lm_section(dense: nn.Module, compiled: nn.Module, held_out: Iterable[Mapping[str, torch.Tensor]], *,
               sequence_length: int, pad_token_id: int = 0, target: Any = None,
               artifacts: Mapping[str, Any] | None = None, new_tokens: int = 16,
               decode_batch_sizes: Sequence[int] = DECODE_BATCH_SIZES, rounds: int = 10,
               user_metrics: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """The report's ``lm_evaluation`` record (JSON-ready) of the dense transformers decoder
    ``dense`` and ``compiled`` (its compact graph or a transformers model) on ``held_out`` (token
    batches, see :mod:`spruce.runtime.lm_eval`): ``evaluation`` (perplexities, ratio, agreements,
    footprints, removed structures), ``prefill`` (rows of ms per length on ``target`` for the built
    ``artifacts`` {"dense": ..., "compiled": ...} with a dynamic sequence length; lengths L/4, L/2,
    L of ``sequence_length``; omitted without a target; an artifact that takes one length only is
    timed at ``sequence_length``), ``decode`` (per-token ms and tokens/s at each of
    ``decode_batch_sizes``, ``new_tokens`` per call, ``rounds`` interleaved rounds), ratios
    compiled/dense of each, and ``user`` (the ``--evaluate`` metrics, dense and compiled). The
    compiled model is evaluated as the transformers model it writes back to where it can
    (``compiled_as``; the same weights and logits as its compact graph), else as given."""
    held_out = list(held_out)
    prompt_tokens = max(2, min(PROMPT_TOKENS, sequence_length // 2))
    try:
        prompts = prompts_from_batches(held_out, prompt_tokens, count=max(decode_batch_sizes, default=8))
    except ValueError:
        prompts = []
    decoder, why = _decoder(compiled, dense)
    # the transformers model it writes back to (the same weights as the compact graph) where it can
    evaluation = evaluate_lm(dense, decoder or compiled, held_out, prompts or None, new_tokens, pad_token_id)
    section: dict[str, Any] = {"evaluation": evaluation.to_dict(), "prompt_tokens": prompt_tokens,
                               "compiled_as": "graph" if decoder is None else type(decoder).__name__}
    vocab = int(getattr(getattr(dense, "config", None), "vocab_size", 2))
    if target is not None and artifacts:
        try:
            rows = measure_prefill_artifacts(artifacts, target, _prefill_lengths(sequence_length), vocab, rounds=rounds)
        except Exception as exc:  # noqa: BLE001 (an artifact fixed at one length: time that length only)
            section["prefill_note"] = f"timed at length {sequence_length} only: {type(exc).__name__}: {exc}"[:300]
            rows = measure_prefill_artifacts(artifacts, target, (sequence_length,), vocab, rounds=rounds)
        section["prefill"] = [r.to_dict() for r in rows]
        section["prefill_ratio"] = _ratios(section["prefill"], "length", "ms")
    if decoder is None or not prompts:
        section["decode_note"] = why or "no held-out row is long enough for a prompt"
    else:
        rows = measure_decode({"dense": dense, "compiled": decoder}, prompts, tuple(decode_batch_sizes), new_tokens,
                              pad_token_id, rounds=rounds)
        section["decode"] = [r.to_dict() for r in rows]
        section["decode_ratio"] = _ratios(section["decode"], "batch_size", "ms_per_token")
    if user_metrics:
        section["user"] = {which: dict(values) for which, values in user_metrics.items()}
    return section


def _ratios(rows: Sequence[Mapping[str, Any]], key: str, value: str) -> dict[str, float]:
    """Compiled / dense ``value`` per ``key`` (as strings, for JSON)."""
    by = {(r["which"], r[key]): r[value] for r in rows}
    return {str(k): by["compiled", k] / by["dense", k] for (which, k) in by
            if which == "dense" and ("compiled", k) in by}


def _cell(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def lm_lines(section: Mapping[str, Any] | None) -> list[str]:
    """``report.md`` lines of an :func:`lm_section` record (none for None)."""
    if not section:
        return []
    ev = section["evaluation"]
    dense, compiled = ev["dense"], ev["compiled"]
    lines = ["", "## Language model (held-out tokens)", "",
             "| | perplexity | parameters | parameter MB | KV cache bytes/token |", "|---|---|---|---|---|"]
    for which, ppl, fp in (("dense", ev["dense_perplexity"], dense), ("compiled", ev["compiled_perplexity"], compiled)):
        lines.append(f"| {which} | {ppl:.3f} | {fp['parameters']:,} | {fp['parameter_bytes'] / 1e6:.2f} | "
                     f"{_cell(fp['kv_bytes_per_token'])} |")
    lines += ["", f"Perplexity ratio {ev['perplexity_ratio']:.3f} (compiled / dense, {ev['held_out_tokens']:,} "
              f"held-out tokens); next-token top-1 agreement {ev['next_token_agreement']:.3f}."]
    cont = ev.get("continuations")
    if cont:
        lines.append(f"Greedy continuations of {cont['prompts']} held-out prompts ({section['prompt_tokens']} tokens, "
                     f"{cont['new_tokens']} new): {cont['token_agreement']:.3f} of tokens agree, "
                     f"{cont['prefix_tokens']:.1f} leading tokens on average, {cont['identical']:.2f} identical.")
    removed = ev.get("removed", {}).get("config") or {}
    if removed:
        lines.append("Structures removed: " + ", ".join(f"{k} {a} → {b}" for k, (a, b) in removed.items()) + ".")
    if section.get("prefill"):
        lines += ["", "| prefill length (batch 1) | dense ms | compiled ms | compiled / dense |", "|---|---|---|---|"]
        by = {(r["which"], r["length"]): r["ms"] for r in section["prefill"]}
        for length in sorted({r["length"] for r in section["prefill"]}):
            lines.append(f"| {length} | {by['dense', length]:.3f} | {by['compiled', length]:.3f} | "
                         f"{section['prefill_ratio'][str(length)]:.3f} |")
    if section.get("prefill_note"):
        lines.append(f"Prefill: {section['prefill_note']}")
    if section.get("decode"):
        lines += ["", "| decode batch (KV cache) | dense ms/token | compiled ms/token | dense tokens/s "
                  "| compiled tokens/s | compiled / dense latency |", "|---|---|---|---|---|---|"]
        rows = {(r["which"], r["batch_size"]): r for r in section["decode"]}
        for batch in sorted({r["batch_size"] for r in section["decode"]}):
            d, c = rows["dense", batch], rows["compiled", batch]
            lines.append(f"| {batch} | {d['ms_per_token']:.3f} | {c['ms_per_token']:.3f} | {d['tokens_per_s']:.1f} | "
                         f"{c['tokens_per_s']:.1f} | {section['decode_ratio'][str(batch)]:.3f} |")
    if section.get("decode_note"):
        lines.append(f"Decode not timed: {section['decode_note']}")
    for which, values in (section.get("user") or {}).items():
        if values:
            lines.append(f"`--evaluate` ({which}): " + ", ".join(f"{k} {_cell(v, 4)}" for k, v in values.items()))
    return lines


def evaluate_language_model(setup: Setup, reference: Reference, exported: Exported, built: Built,
                            workspace: Workspace) -> LMEvaluated:
    """The compile stage after the bench: for a causal LM (an output of kind ``lm``) its
    :func:`lm_section` on the held-out split (``setup.data.test``), the built artifacts timed on
    the target at several lengths, ``bench_iters`` interleaved rounds (at most 10); an empty record
    for other models."""
    plan = setup.plan
    if plan is None or not any(getattr(spec, "kind", None) == "lm" for spec in plan.outputs):
        return LMEvaluated()
    workspace.say("evaluating the language model: perplexity, agreement, prefill and decode speed ...")
    dense = reference.model.eval()
    section = lm_section(dense, exported.model.eval(), setup.data.test, sequence_length=int(setup.example.shape[-1]),
                         pad_token_id=_pad_token_id(setup, dense), target=setup.target,
                         artifacts={"dense": built.dense, "compiled": built.compiled},
                         rounds=max(2, min(setup.recipe.bench_iters, 10)),
                         user_metrics={"dense": reference.metrics, "compiled": exported.metrics})
    return LMEvaluated(section)


def _pad_token_id(setup: Setup, dense: nn.Module) -> int:
    """The data's pad id, else the model's (config, generation config), else its EOS, else 0."""
    text = getattr(setup.data, "text", None)
    candidates = [getattr(text, "pad_token_id", None)]
    for config in (getattr(dense, "config", None), getattr(dense, "generation_config", None)):
        candidates += [getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)]
    for value in candidates:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0
