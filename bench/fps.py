"""FPS of dense vs channel-pruned torchvision models on ONNX Runtime (CPU), and how much of the MACs saving is real.

For each model (default resnet18, resnet50, mobilenet_v2) the dense model and one channel-pruned
variant per ``round_to`` (``spruce.prune(ratio, round_to=...)``: kept widths rounded to multiples the
kernels like) are exported to ONNX (dynamic batch) and timed with ONNX Runtime at each batch size.
Timing is interleaved: ``--rounds`` rounds, each timing every variant for ``--iters`` calls, so load
drifting on a shared machine hits all variants alike; medians over all rounds are reported.

Efficiency = realised speed-up (dense ms / pruned ms) divided by the MACs speed-up (dense MACs /
pruned MACs): 100% means the runtime turns every saved MAC into time. The best variant per model
is the fastest one whose efficiency is >= 90% at every batch size (else the most efficient one).

Writes ``bench/results/fps.md`` and ``fps.json`` (atomically). The process lowers its own
priority (``nice``) so that it can run unattended next to other work.

Usage: ``python bench/fps.py [--models resnet18,...] [--ratio 0.5] [--round-to none,8,16,32]
[--strategies uniform,depthwise] [--batch-sizes 1,8]
[--size 224] [--threads 1] [--rounds 5] [--iters 10] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib

DEFAULT_MODELS = "resnet18,resnet50,mobilenet_v2"
DEFAULT_OUT = benchlib.RESULTS_DIR / "fps.md"
GOAL_EFFICIENCY = 0.9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated torchvision model names")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per group")
    parser.add_argument("--round-to", default="none,8,16,32",
                        help="comma-separated round_to values to try ('none' = no rounding)")
    parser.add_argument("--strategies", default="uniform,depthwise",
                        help="uniform: prune every group; depthwise: only groups through depthwise convolutions")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per variant, batch size and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant and batch size per round")
    parser.add_argument("--nice", type=int, default=10, help="niceness increment for this process (0: none)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown output (JSON next to it)")
    args = parser.parse_args(argv)
    args.model_names = [m for m in args.models.split(",") if m]
    args.round_tos = [None if r.strip().lower() == "none" else int(r) for r in args.round_to.split(",") if r]
    args.batch_list = [int(b) for b in args.batch_sizes.split(",") if b]
    args.strategy_list = [s for s in args.strategies.split(",") if s]
    if set(args.strategy_list) - {"uniform", "depthwise"}:
        parser.error(f"--strategies: unknown strategy in {args.strategies!r} (valid: uniform, depthwise)")
    if not args.model_names or not args.round_tos or not args.batch_list:
        parser.error("--models, --round-to and --batch-sizes must each name at least one value")
    if any(b < 1 for b in args.batch_list) or args.rounds < 1 or args.iters < 1 or not 0 < args.ratio < 1:
        parser.error("batch sizes, --rounds and --iters must be positive; --ratio in (0, 1)")
    return args


def variant_name(strategy: str, round_to: int | None) -> str:
    return strategy if round_to is None else f"{strategy}/{round_to}"


def depthwise_groups(model: Any, groups: list[Any]) -> set[int]:
    """Ids of the channel groups that run through a depthwise convolution (inverted-residual hidden channels).

    Pruning only these shrinks each 1x1 convolution on one side, so MACs and memory traffic fall
    alike; pruning the block outputs too shrinks the 1x1 convolutions on both sides (MACs fall
    quadratically) while the memory-bound depthwise layers only shrink linearly.
    """
    from torch import nn

    found = set()
    for group in groups:
        for member in group.members:
            owner = model.get_submodule(member.name.rsplit(".", 1)[0]) if "." in member.name else model
            if isinstance(owner, nn.Conv2d) and owner.groups > 1 and owner.groups == owner.in_channels:
                found.add(group.id)
                break
    return found


def pruned_variants(model: Any, x: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One compact model per strategy and round_to ('depthwise' only for models with depthwise convolutions)."""
    import spruce
    from spruce.passes.export import remove_channels

    variants = {}
    for round_to in args.round_tos:
        result = spruce.prune(model, (x,), ratio=args.ratio, round_to=round_to)
        if "uniform" in args.strategy_list:
            variants[variant_name("uniform", round_to)] = result.model.eval()
        chosen = depthwise_groups(model, result.groups)
        if "depthwise" in args.strategy_list and chosen:
            kept = {gid: indices for gid, indices in result.kept.items() if gid in chosen}
            variants[variant_name("depthwise", round_to)] = remove_channels(result.analysis, model, kept).eval()
    return variants


def build_variants(name: str, args: argparse.Namespace, folder: Path) -> dict[str, dict[str, Any]]:
    """Dense and pruned models of ``name``: their artifact, MACs and parameter count."""
    import torch
    from spruce.api.stats import count_macs, count_params
    from spruce.targets.base import get_target

    model, _ = benchlib.build_model(name)
    benchlib.make_nondegenerate(model, (1, 3, args.size, args.size))
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    target = get_target("onnxruntime", threads=args.threads)
    models = {"dense": model, **pruned_variants(model, x, args)}
    variants = {}
    for label, variant in models.items():
        artifact = target.build(variant, (x,), folder / f"{name}-{label.replace('/', '_')}.onnx")
        variants[label] = {"artifact": artifact, "macs": count_macs(variant, (x,)), "params": count_params(variant),
                           "error": artifact.info["max_relative_error"]}
    return variants


def time_variants(variants: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Median ms per variant and batch size, interleaving variants round by round."""
    import torch
    from spruce.targets.base import get_target

    target = get_target("onnxruntime", threads=args.threads)
    runners = {label: target.load(v["artifact"]) for label, v in variants.items()}
    inputs = {b: [torch.randn(b, 3, args.size, args.size).numpy()] for b in args.batch_list}
    samples: dict[str, dict[int, list[float]]] = {label: {b: [] for b in args.batch_list} for label in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))  # no fixed position bias
        for batch in args.batch_list:
            for label in order:
                seconds = target.time_runner(runners[label], inputs[batch], args.warmup, args.iters)
                samples[label][batch].extend(float(s) * 1e3 for s in seconds)
    return {label: {b: statistics.median(ms) for b, ms in by_batch.items()} for label, by_batch in samples.items()}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="spruce-fps-") as folder:
        start = time.perf_counter()
        variants = build_variants(name, args, Path(folder))
        latency = time_variants(variants, args)
        seconds = time.perf_counter() - start
    dense_macs = variants["dense"]["macs"]
    rows = []
    for label, variant in variants.items():
        macs_speedup = dense_macs / variant["macs"]
        for batch in args.batch_list:
            ms = latency[label][batch]
            speedup = latency["dense"][batch] / ms
            rows.append({"variant": label, "batch": batch, "ms": ms, "images_per_s": batch * 1e3 / ms,
                         "macs": variant["macs"], "params": variant["params"], "macs_speedup": macs_speedup,
                         "speedup": speedup, "efficiency": speedup / macs_speedup, "error": variant["error"]})
    pruned = [label for label in variants if label != "dense"]
    worst = {label: min(r["efficiency"] for r in rows if r["variant"] == label) for label in pruned}
    slowest = {label: min(r["speedup"] for r in rows if r["variant"] == label) for label in pruned}
    # Best: the fastest variant that realises >= 90% of its MACs saving at every batch size, else the most efficient.
    efficient = [label for label in pruned if worst[label] >= GOAL_EFFICIENCY]
    best = max(efficient, key=lambda label: slowest[label]) if efficient else max(pruned, key=worst.get)
    return {"model": name, "rows": rows, "best": best, "best_worst_efficiency": worst[best], "seconds": seconds}


def render(results: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, str]) -> str:
    lines = ["# FPS: dense vs channel-pruned models on ONNX Runtime (CPU)", "",
             f"Command: `nice python bench/fps.py --models {args.models} --ratio {args.ratio} "
             f"--round-to {args.round_to} --strategies {args.strategies} --batch-sizes {args.batch_sizes} "
             f"--size {args.size} "
             f"--threads {args.threads} --rounds {args.rounds} --iters {args.iters}`", "",
             *benchlib.header_lines(info),
             f"- load average (1/5/15 min) at end: {benchlib.load_average()}", "",
             "Each model is pruned with `spruce.prune(ratio, round_to)` (L1 importance; `S/N` = strategy S with "
             "kept widths rounded to multiples of N; `uniform` prunes every group by the ratio, `depthwise` only "
             "the groups through depthwise convolutions, i.e. the inverted-residual hidden channels), exported "
             "with a dynamic batch axis and timed with ONNX Runtime; variants interleaved over rounds, medians "
             "reported. Efficiency = realised speed-up / MACs speed-up.", "",
             "## Summary (best variant per model)", ""]
    summary = []
    for result in results:
        for row in result["rows"]:
            if row["variant"] == result["best"]:
                summary.append([result["model"], row["variant"], row["batch"], f"{row['macs_speedup']:.2f}x",
                                f"{row['speedup']:.2f}x", f"{100 * row['efficiency']:.0f}%",
                                f"{row['images_per_s']:.1f}"])
    lines += benchlib.markdown_table(["model", "variant", "batch", "MACs speed-up", "realised speed-up",
                                      "efficiency", "images/s"], summary)
    lines += ["", "## All variants", ""]
    table = [[r["model"], row["variant"], row["batch"], f"{row['macs'] / 1e9:.3f}", f"{row['params'] / 1e6:.2f}",
              f"{row['ms']:.2f}", f"{row['images_per_s']:.1f}", f"{row['macs_speedup']:.2f}x",
              f"{row['speedup']:.2f}x", f"{100 * row['efficiency']:.0f}%", f"{row['error']:.1e}"]
             for r in results for row in r["rows"]]
    lines += benchlib.markdown_table(["model", "variant", "batch", "GMACs", "M params", "median ms", "images/s",
                                      "MACs speed-up", "realised speed-up", "efficiency", "ONNX vs torch err"],
                                     table)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    benchlib.set_threads(args.threads)
    info = benchlib.machine_info(["onnxruntime", "onnx"])
    results = []
    for name in args.model_names:
        print(f"{name} ...", flush=True)
        result = measure(name, args)
        results.append(result)
        print(f"{name}: best {result['best']} worst-case efficiency {100 * result['best_worst_efficiency']:.0f}% "
              f"({result['seconds']:.0f} s)", flush=True)
    out = args.out
    benchlib.write_atomic(out, render(results, args, info))
    benchlib.write_atomic(out.with_suffix(".json"), json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
