"""Prefill latency of a Llama-style decoder against its kept width, at several sequence lengths
(#29: at what kept width does a 0.5 prefill budget fall, for the example at its length, at longer
lengths, and for wider models of the same layout?).

Models (batch 1, ONNX Runtime CPU, the compile target's own session options and thread pinning):

- ``example``: the committed example (``examples/lm/model``: hidden 128, 4 layers, 4 query / 2
  key-value heads of 32, MLP 384, vocabulary 2048, tied embeddings, trained);
- ``wide256``, ``wide512``: the same layout at hidden 256 / 512 (heads of 32: 8 / 16 query heads,
  half as many key-value heads, MLP 3 x hidden), random weights (seed 0): latency does not depend on
  the weights' values.

Each model is captured as compile captures a causal LM (sequence dim dynamic), its channel groups
found with the residual width (``normalised_widths``), and compact models made by
``remove_channels`` at uniform kept fractions (hidden, MLP and query heads per key-value group
alike; query heads kept whole down to one per group), plus the heads-and-MLP-halved shape (hidden
kept) and, for the example, the shape compile selected at latency=0.5 (hidden 32, 2 query heads,
MLP 274). Each is built once with a dynamic sequence length (the target's ``build``, checked against
torch), then all of one model's variants are timed interleaved (``time_interleaved``: round-robin,
rotating start) at every length; ratios are of each variant's robust ms to the dense model's in the
same run.

Usage: ``python bench/lm_widths.py export --work DIR`` (capture, prune, build: no timing), then
``python bench/lm_widths.py time --work DIR [--rounds 20]`` (the timed part; run it alone on the
machine). Writes ``DIR/widths.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (128, 256, 512)
FRACTIONS = (0.75, 0.5, 0.375, 0.25)


def build_model(name: str) -> torch.nn.Module:
    import transformers

    if name == "example":
        model = transformers.AutoModelForCausalLM.from_pretrained(ROOT / "examples" / "lm" / "model")
    else:
        hidden = int(name.removeprefix("wide"))
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=2048, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=4,
            num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, head_dim=32,
            max_position_embeddings=512, tie_word_embeddings=True))
    model.config.use_cache = False
    return model.eval()


def variants(model: torch.nn.Module, name: str) -> dict[str, dict[str, int]]:
    """Variant name -> kept (hidden, query heads per key-value group, MLP) counts."""
    config = model.config
    hidden, per_group, mlp = (config.hidden_size, config.num_attention_heads // config.num_key_value_heads,
                              config.intermediate_size)
    out = {f"f={f:g}": {"hidden": round(f * hidden), "heads": max(1, round(f * per_group)), "mlp": round(f * mlp)}
           for f in FRACTIONS}
    out["heads+MLP 1/2"] = {"hidden": hidden, "heads": max(1, per_group // 2), "mlp": mlp // 2}
    if name == "example":
        out["compile@0.5"] = {"hidden": 32, "heads": 1, "mlp": 274}
    return out


def export(work: Path, names: list[str]) -> None:
    from spruce.capture.trace import capture
    from spruce.compiler.lm_artifacts import sequence_dims
    from spruce.passes.analysis import analyze
    from spruce.passes.export import remove_channels
    from spruce.targets.base import get_target

    target = get_target("onnxruntime", threads=2)
    for name in names:
        model = build_model(name)
        ids = torch.randint(3, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
        dims = sequence_dims(model, ids)
        analysis = analyze(capture(model, (ids,), dynamic_shapes=dims), normalised_widths=True)

        def group(member: str, dim: int, analysis=analysis) -> int:
            return next(g.id for g in analysis.groups if g.prunable and any(
                m.name.endswith(member) and m.dim == dim for m in g.members))

        hidden = group("embed_tokens.weight", 1)
        layers = range(model.config.num_hidden_layers)
        heads = [group(f"layers.{i}.self_attn.q_proj.weight", 0) for i in layers]
        mlps = [group(f"layers.{i}.mlp.up_proj.weight", 0) for i in layers]
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        params = {"dense": sum(p.numel() for p in model.parameters())}
        target.build(model, (ids,), folder / "dense.onnx", dynamic_dims=dims)
        for label, counts in variants(model, name).items():
            kept = {hidden: np.arange(counts["hidden"]), **{g: np.arange(counts["heads"]) for g in heads},
                    **{g: np.arange(counts["mlp"]) for g in mlps}}
            compact = remove_channels(analysis, model, kept)
            params[label] = sum(p.numel() for p in compact.parameters())
            target.build(compact, (ids,), folder / f"{label.replace('/', '_')}.onnx", dynamic_dims=dims)
            print(f"{name} {label} {counts} {params[label]:,} parameters", flush=True)
        (folder / "variants.json").write_text(json.dumps({"variants": variants(model, name), "params": params}))


def time_all(work: Path, names: list[str], rounds: int, warmup: int) -> dict:
    from spruce.targets.base import get_target
    from spruce.targets.timing import time_interleaved

    target = get_target("onnxruntime", threads=2)
    results = {"load_start": Path("/proc/loadavg").read_text().strip(), "started": time.strftime("%H:%M:%S"),
               "rounds": rounds, "warmup": warmup, "models": {}}
    for name in names:
        folder = work / name
        info = json.loads((folder / "variants.json").read_text())
        labels = ["dense", *info["variants"]]
        sessions = [target.session(folder / f"{label.replace('/', '_')}.onnx", timing=True) for label in labels]
        rows = {}
        for length in LENGTHS:
            ids = np.random.default_rng(length).integers(3, 2048, size=(1, length)).astype(np.int64)
            calls = [lambda s=s, ids=ids: s.run(None, {s.get_inputs()[0].name: ids}) for s in sessions]
            timings = time_interleaved(calls, warmup, rounds, None, target.caller_cpu())
            ms = [t.robust_ms() for t in timings]
            rows[length] = {label: {"ms": m, "ratio": m / ms[0]} for label, m in zip(labels, ms)}
            print(f"{name} L={length}: " + ", ".join(f"{label} {m:.2f} ms ({m / ms[0]:.3f})"
                                                    for label, m in zip(labels, ms)), flush=True)
        results["models"][name] = {"rows": rows, **info}
    results["load_end"] = Path("/proc/loadavg").read_text().strip()
    results["ended"] = time.strftime("%H:%M:%S")
    return results


def table(results: dict) -> str:
    lines = []
    for name, model in results["models"].items():
        lines += ["", f"**{name}** (dense {model['params']['dense']:,} parameters)", "",
                  "| kept (hidden, query heads per kv group, MLP) | params | " + " | ".join(
                      f"L={length}: ms (ratio)" for length in model["rows"]) + " |",
                  "|---|---|" + "---|" * len(model["rows"])]
        for label in ["dense", *model["variants"]]:
            counts = model["variants"].get(label)
            shape = "dense" if counts is None else f"{label}: {counts['hidden']}, {counts['heads']}, {counts['mlp']}"
            cells = [f"{row[label]['ms']:.2f} ({row[label]['ratio']:.3f})" for row in model["rows"].values()]
            lines.append(f"| {shape} | {model['params'][label]:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("export", "time"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--models", default="example,wide256,wide512")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    names = args.models.split(",")
    torch.set_num_threads(2)
    if args.step == "export":
        export(args.work, names)
        return
    results = time_all(args.work, names, args.rounds, args.warmup)
    out = args.work / "widths.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"load {results['load_start']} -> {results['load_end']} ({results['started']}-{results['ended']})")


if __name__ == "__main__":
    main()
