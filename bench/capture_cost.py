"""Capture cost of transformers models: spruce's ``channel_groups`` against one bare
``torch.export`` of the same model with the same dynamic dims, and against Torch-Pruning 1.6.1's
``build_dependency``, measured in the same run.

Models (``transformers``, random weights, seed 0, eval mode, ``input_ids`` of shape (2, 32)):

- ``llama2``: ``LlamaForCausalLM``, hidden 256, 2 layers, MLP 688, 8 query / 2 key-value heads, vocab 1024;
- ``qwen2``: ``Qwen2ForCausalLM``, hidden 256, 4 layers, MLP 688, 8 query / 2 key-value heads, vocab 1024;
- ``llama1b`` (``--big``): Llama-3.2-1B-shaped: vocab 128256, hidden 2048, 16 layers, MLP 8192,
  32 query / 8 key-value heads, tied embeddings (1.24 B parameters, 4.9 GB in float32).

What each tool runs (in its own child process, on a fresh deep copy of the model for the small
models, on the model itself for ``llama1b``):

- ``spruce``: ``spruce.channel_groups(model, {"input_ids": ids}, dynamic_shapes={"input_ids": {1: seq}})``
  (capture with a dynamic batch and sequence length, shape propagation, the channel analysis);
- ``export``: ``torch.export.export(model, (), {"input_ids": ids}, dynamic_shapes={"input_ids": {0: batch,
  1: seq}}, strict=False)`` with ``config.use_cache = False`` (what spruce sets while it captures);
- ``tp``: ``tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": ids},
  output_transform=lambda out: out.logits)``.

Small models: ``--rounds`` rounds interleave models and tools (spruce, export, Torch-Pruning children
per model); each child does one warm-up analysis, then ``--repeats`` timed ones; medians over
every timed run. ``--big``: one child per tool, one after the other, each warmed up on ``llama2``
before it builds the 1B model, then one timed analysis; the child also reports its resident set
size after building the model and the peak during the analysis (``/proc/self/clear_refs`` resets the
peak mark after the build). Writes ``bench/results/capture_cost.md`` (``--big`` adds its section
to the file a small run wrote) and ``.json``.

Usage: ``python bench/capture_cost.py [--rounds 3] [--repeats 3]``; ``python bench/capture_cost.py --big``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import benchlib

DEFAULT_OUT = benchlib.RESULTS_DIR / "capture_cost.md"
SMALL = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 2,
         "vocab_size": 1024, "max_position_embeddings": 128}
MODELS = {
    "llama2": ("LlamaForCausalLM", "LlamaConfig", {**SMALL, "num_hidden_layers": 2}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {**SMALL, "num_hidden_layers": 4}),
    "llama1b": ("LlamaForCausalLM", "LlamaConfig", {
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True,
        "max_position_embeddings": 2048, "head_dim": 64}),
}
SMALL_MODELS = ("llama2", "qwen2")
TOOLS = ("spruce", "export", "tp")
LABELS = {"spruce": "spruce channel_groups", "export": "bare torch.export", "tp": "Torch-Pruning build_dependency"}
BATCH, SEQ = 2, 32


def build(name: str) -> tuple[Any, dict[str, Any]]:
    """Model ``name`` (random weights, seed 0, eval mode) and its example keyword inputs."""
    import torch
    import transformers

    cls, config_cls, fields = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**fields)).eval()
    ids = torch.randint(0, fields["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


def analyse(tool: str, model: Any, inputs: dict[str, Any]) -> Any:
    """One analysis of ``model`` by ``tool`` (see the module docstring)."""
    import torch

    seq = torch.export.Dim("seq", min=2, max=128)
    if tool == "spruce":
        import spruce

        return spruce.channel_groups(model, inputs, dynamic_shapes={"input_ids": {1: seq}})
    if tool == "export":
        model.config.use_cache = False
        dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=1024), 1: seq}}
        return torch.export.export(model, (), inputs, dynamic_shapes=dims, strict=False)
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=inputs, output_transform=lambda out: out.logits,
                                                 verbose=False)


def child_main(args: argparse.Namespace) -> None:
    """Time ``args.child``'s analysis of ``args.model`` in this fresh process and emit the record."""
    record: dict[str, Any] = {"tool": args.child, "model": args.model, "analysis_s": []}
    try:
        benchlib.set_threads(args.threads)
        if args.model == "llama1b":
            small, small_inputs = build("llama2")
            analyse(args.child, small, small_inputs)  # warm-up on a small model: code paths, not memory
            del small
            model, inputs = build(args.model)
            record["params"] = benchlib.count_params(model)
            record["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            record["rss_after_build"] = benchlib.current_rss_bytes()
            record["peak_reset"] = benchlib.reset_peak_rss()
            found, seconds = benchlib.timed(lambda: analyse(args.child, model, inputs))
            record["analysis_s"].append(seconds)
            record["peak_rss"] = int(benchlib.peak_rss_mb() * 1024 * 1024)
            record["extra_rss"] = record["peak_rss"] - record["rss_after_build"]
        else:
            model, inputs = build(args.model)
            record["params"] = benchlib.count_params(model)
            found = analyse(args.child, copy.deepcopy(model), inputs)  # warm-up
            for _ in range(args.repeats):
                fresh = copy.deepcopy(model)
                record["analysis_s"].append(benchlib.timed(lambda m=fresh: analyse(args.child, m, inputs))[1])
                benchlib.emit(record)
        if args.child == "spruce":
            record["groups"] = sum(1 for g in found if g.prunable)
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        record["error"] = benchlib.short_error(exc)
    benchlib.emit(record)


def run_child(tool: str, model: str, args: argparse.Namespace, pooled: dict, round_: int) -> None:
    record = pooled[model][tool]
    record["load"].append(benchlib.load_average())
    argv = [str(Path(__file__).resolve()), "--child", tool, "--model", model, "--repeats", str(args.repeats),
            "--threads", str(args.threads)]
    outcome = benchlib.run_child(argv, args.timeout)
    result = outcome.result
    record["analysis_s"] += result.get("analysis_s", [])
    for key in ("params", "groups", "param_bytes", "rss_after_build", "peak_rss", "extra_rss", "peak_reset"):
        if key in result:
            record[key] = result[key]
    crash = benchlib.outcome_error(outcome, args.timeout, None)
    error = "; ".join(e for e in (result.get("error"), crash) if e)
    if error:
        record["errors"].append(f"round {round_}: {error}")
    print(f"[round {round_}] {model} {tool}: {result.get('analysis_s')} {error}", flush=True)


def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    """Interleaved children; per model and tool the pooled timings and their median."""
    models = ("llama1b",) if args.big else SMALL_MODELS
    pooled = {m: {t: {"analysis_s": [], "errors": [], "load": []} for t in args.tools} for m in models}
    rounds = 1 if args.big else args.rounds
    for round_ in range(1, rounds + 1):
        for model in models:
            for tool in args.tools:
                run_child(tool, model, args, pooled, round_)
    for tools in pooled.values():
        for record in tools.values():
            times = record["analysis_s"]
            record["median_s"] = statistics.median(times) if times else None
    return pooled


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def render_section(info: dict[str, str], args: argparse.Namespace, pooled: dict) -> list[str]:
    """The Markdown section of one run (small models, or the 1B model)."""
    title = "Llama-3.2-1B-shaped model (one child per tool)" if args.big else "Small models (interleaved rounds)"
    lines = [f"## {title}", ""] + benchlib.header_lines(info) + [
        f"- load average (1/5/15 min) at writing: {benchlib.load_average()}",
        (f"- {args.threads} torch thread(s) per child, {args.timeout:.0f} s hard timeout per child; "
         + ("one timed analysis per child after a warm-up on llama2" if args.big else
            f"{args.rounds} interleaved rounds, one warm-up then {args.repeats} timed analyses per child; medians "
            f"over the {args.rounds * args.repeats} timed runs of each tool")),
        "",
        "| model | tool | analysis s (median) | runs | all runs s | load before each child (1/5/15 min) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, tools in pooled.items():
        for tool, record in tools.items():
            runs = ", ".join(f"{t:.3f}" for t in record["analysis_s"]) or "-"
            lines.append(f"| {model} | {LABELS[tool]} | {benchlib.fmt(record['median_s'], 3)} | "
                         f"{len(record['analysis_s'])} | {runs} | "
                         f"{'; '.join(record['load'])} | {'; '.join(record['errors']) or '-'} |")
    lines.append("")
    for model, tools in pooled.items():
        ours = tools.get("spruce", {}).get("median_s")
        parts = [f"{model}: {MODELS[model][0]} {', '.join(f'{k}={v}' for k, v in MODELS[model][2].items())}; "
                 f"{tools.get('spruce', {}).get('params', '?')} parameters"]
        if "export" in tools:
            parts.append(f"spruce / bare export {benchlib.fmt(_ratio(ours, tools['export']['median_s']), 2)}")
        if "tp" in tools:
            parts.append(f"spruce / Torch-Pruning {benchlib.fmt(_ratio(ours, tools['tp']['median_s']), 2)}")
        spruce_record = tools.get("spruce", {})
        if "extra_rss" in spruce_record:
            parts.append(f"spruce's peak RSS during the analysis minus RSS after building the model "
                         f"{spruce_record['extra_rss'] / 2**30:.2f} GiB = "
                         f"{spruce_record['extra_rss'] / spruce_record['param_bytes']:.2f} x the parameter bytes "
                         f"({spruce_record['param_bytes'] / 2**30:.2f} GiB; peak mark reset: "
                         f"{spruce_record.get('peak_reset')})")
        if "groups" in spruce_record:
            parts.append(f"spruce finds {spruce_record['groups']} prunable channel groups")
        lines.append("- " + "; ".join(parts))
    lines.append("")
    return lines


def write(args: argparse.Namespace, info: dict[str, str], pooled: dict) -> None:
    section = render_section(info, args, pooled)
    key = "big" if args.big else "small"
    data_path = args.out.with_suffix(".json")
    data = json.loads(data_path.read_text()) if data_path.exists() else {}
    data[key] = {"machine": info, "models": {m: MODELS[m] for m in pooled}, "tools": pooled,
                 "markdown": section}
    head = ["# Capture cost: spruce channel_groups vs a bare torch.export and Torch-Pruning", "",
            (__doc__ or "").split("\n\n")[0].replace("\n", " "), "",
            "- ratio = spruce / other tool (below 1: spruce is faster)", ""]
    body = [line for k in ("small", "big") if k in data for line in data[k]["markdown"]]
    benchlib.write_atomic(args.out, "\n".join(head + body))
    benchlib.write_atomic(data_path, json.dumps(data, indent=1, default=str))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (``--child`` and ``--model`` are the internal per-run mode)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (small models)")
    parser.add_argument("--repeats", type=int, default=3, help="timed analyses per child (small models)")
    parser.add_argument("--big", action="store_true", help="the Llama-3.2-1B-shaped model, once per tool")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per child")
    parser.add_argument("--timeout", type=float, default=900.0, help="hard limit per child (seconds)")
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """In a child, time one tool; else run the children and write the report."""
    args = parse_args(argv)
    if not args.child:
        machine = benchlib.machine_info(["spruce", "torch-pruning", "transformers"])
        write(args, machine, run(args))
        print(f"wrote {args.out}")
    else:
        child_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
