"""Analysis time of a 2-layer Llama (hidden size 256): spruce against Torch-Pruning 1.6.1,
measured in the same run.

The model: ``transformers.LlamaForCausalLM`` from ``LlamaConfig(hidden_size=256,
intermediate_size=688, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
vocab_size=1024)``, random weights (seed 0), eval mode, called as ``model(input_ids=ids)``
with ``ids`` of shape (1, 32).

What is timed, per tool, on a fresh deep copy of the model each time:

- spruce: ``spruce.channel_groups(model, {"input_ids": ids})`` (capture with a dynamic
  batch, shape propagation, the channel groups: heads, key/value groups, MLP widths);
- Torch-Pruning: ``tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids":
  ids}, output_transform=lambda out: out.logits)`` (its graph of the model from a traced
  forward; ``output_transform`` because the model returns a transformers ``ModelOutput``).
  Only the graph build: a ``BasePruner(...).step()`` on this Llama did not finish within
  600 s in an earlier session's attempt (not re-run here), so no prune time is compared.

``--rounds`` rounds interleave the tools (a spruce child, then a Torch-Pruning child, each a
fresh subprocess with a hard ``--timeout``); each child does one warm-up analysis, then
``--repeats`` timed ones. Medians over every timed run of a tool; the ratio is spruce /
Torch-Pruning. Writes ``bench/results/speed_llama.md`` (and ``.json``); the model table of
``bench/speed.py`` (``speed.md``) is not touched.

Usage: ``python bench/speed_llama.py [--rounds 3] [--repeats 3] [--timeout 600]``.
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

DEFAULT_OUT = benchlib.RESULTS_DIR / "speed_llama.md"
CONFIG = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 8,
          "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 128}
SEQ = 32
TOOLS = ("spruce", "tp")


def build_llama() -> tuple[Any, dict[str, Any]]:
    """The timed Llama (random weights, seed 0, eval mode) and its example keyword inputs."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


def analyse(tool: str, model: Any, inputs: dict[str, Any]) -> Any:
    """One analysis of ``model`` by ``tool`` (see the module docstring for what each runs)."""
    if tool == "spruce":
        import spruce

        return spruce.channel_groups(model, inputs)
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=inputs, output_transform=lambda out: out.logits,
                                                 verbose=False)


def child_main(args: argparse.Namespace) -> None:
    """Time ``args.child``'s analysis in this fresh process and emit the record."""
    record: dict[str, Any] = {"tool": args.child, "analysis_s": []}
    try:
        benchlib.set_threads(args.threads)
        model, inputs = build_llama()
        record["params"] = benchlib.count_params(model)
        found = analyse(args.child, copy.deepcopy(model), inputs)  # warm-up
        if args.child == "spruce":
            record["groups"] = sum(1 for g in found if g.prunable)
        else:
            record["nodes"] = len(found.module2node)  # modules in Torch-Pruning's graph
        for _ in range(args.repeats):
            fresh = copy.deepcopy(model)
            record["analysis_s"].append(benchlib.timed(lambda m=fresh: analyse(args.child, m, inputs))[1])
            benchlib.emit(record)
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        record["error"] = benchlib.short_error(exc)
    benchlib.emit(record)


def run_rounds(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``args.rounds`` interleaved rounds (spruce child, then Torch-Pruning child); per tool
    the pooled timings, their median, and the load average before each child."""
    pooled: dict[str, dict[str, Any]] = {t: {"analysis_s": [], "errors": [], "load": []} for t in TOOLS}
    for round_ in range(1, args.rounds + 1):
        for tool in TOOLS:
            pooled[tool]["load"].append(benchlib.load_average())
            argv = [str(Path(__file__).resolve()), "--child", tool, "--repeats", str(args.repeats),
                    "--threads", str(args.threads)]
            outcome = benchlib.run_child(argv, args.timeout)
            result = outcome.result
            pooled[tool]["analysis_s"] += result.get("analysis_s", [])
            for key in ("params", "groups", "nodes"):
                if key in result:
                    pooled[tool][key] = result[key]
            crash = benchlib.outcome_error(outcome, args.timeout, None)
            error = "; ".join(e for e in (result.get("error"), crash) if e)
            if error:
                pooled[tool]["errors"].append(f"round {round_}: {error}")
            print(f"[round {round_}/{args.rounds}] {tool}: {result.get('analysis_s')} {error}", flush=True)
    for record in pooled.values():
        times = record["analysis_s"]
        record["median_s"] = statistics.median(times) if times else None
    return pooled


def render(info: dict[str, str], args: argparse.Namespace, pooled: dict[str, dict[str, Any]]) -> str:
    """The Markdown report."""
    ours, theirs = pooled["spruce"]["median_s"], pooled["tp"]["median_s"]
    ratio = ours / theirs if ours is not None and theirs else None
    lines = ["# spruce vs Torch-Pruning: analysis time of a 2-layer Llama", ""]
    lines += benchlib.header_lines(info)
    lines += [
        f"- load average (1/5/15 min) at writing: {benchlib.load_average()}",
        (f"- model: LlamaForCausalLM, {', '.join(f'{k}={v}' for k, v in CONFIG.items())}; "
         f"{pooled['spruce'].get('params', pooled['tp'].get('params', '?'))} parameters, random weights (seed 0), "
         f"eval mode; input_ids of shape (1, {SEQ})"),
        ("- timed: spruce `channel_groups(model, {'input_ids': ids})`; Torch-Pruning "
         "`DependencyGraph().build_dependency(model, example_inputs={'input_ids': ids}, "
         "output_transform=lambda out: out.logits)`; each on a fresh deep copy, after one warm-up "
         "analysis in the same child. Graph build only: Torch-Pruning's BasePruner step() on this "
         "model did not finish within 600 s in an earlier session's attempt (not re-run here), so no "
         "prune time is compared"),
        (f"- {args.rounds} interleaved rounds (a spruce child, then a Torch-Pruning child; "
         f"{args.threads} torch thread(s) each, {args.timeout:.0f} s hard timeout per child), {args.repeats} "
         f"timed analyses per child: medians over the {args.rounds * args.repeats} timed runs of each tool"),
        "- ratio = spruce / Torch-Pruning (below 1: spruce is faster)",
        "",
        "| tool | analysis s (median) | runs | all runs s | load before each child (1/5/15 min) | errors |",
        "|---|---|---|---|---|---|",
    ]
    for tool, label in (("spruce", "spruce"), ("tp", "Torch-Pruning 1.6.1")):
        record = pooled[tool]
        lines.append(f"| {label} | {benchlib.fmt(record['median_s'], 3)} | {len(record['analysis_s'])} | "
                     f"{', '.join(f'{t:.3f}' for t in record['analysis_s']) or '-'} | "
                     f"{'; '.join(record['load'])} | {'; '.join(record['errors']) or '-'} |")
    groups, nodes = pooled["spruce"].get("groups"), pooled["tp"].get("nodes")
    lines += ["", f"- ratio spruce / Torch-Pruning: {benchlib.fmt(ratio, 2)}"
              + (f"; spruce finds {groups} prunable channel groups" if groups is not None else "")
              + (f"; Torch-Pruning's graph has {nodes} module nodes" if nodes is not None else ""), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (``--child`` is the internal per-run mode)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved spruce/TP children")
    parser.add_argument("--repeats", type=int, default=3, help="timed analyses per child")
    parser.add_argument("--timeout", type=float, default=600.0, help="hard limit per child (seconds)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per child")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved rounds and write the report."""
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    info = benchlib.machine_info(["spruce", "torch-pruning", "transformers"])
    pooled = run_rounds(args)
    benchlib.write_atomic(args.out, render(info, args, pooled))
    benchlib.write_atomic(args.out.with_suffix(".json"), json.dumps(
        {"machine": info, "config": CONFIG, "seq": SEQ, "tools": pooled}, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
