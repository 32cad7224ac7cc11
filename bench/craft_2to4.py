"""Issue #14's acceptance item 2 on CPU: ``spruce compile`` of the trained CRAFT to 2:4 for torch.

Runs (or, with ``--reuse``, reads) for each recovery mode::

    spruce compile examples/craft.py:make --recipe examples/craft.yaml --data images:DIR \\
        --structure 2:4 --sparsity 0.5 --target torch --recover MODE --out WORK/craft_2to4_MODE

and writes ``bench/results/craft_2to4.md`` (and ``.json``) with what a user sees on CPU:

- the layers spruce finds N:M-eligible (``nm_groups``: input channels a multiple of 4) and
  their share of the parameters, and whether every one of them is exactly 2:4 in the exported
  program (``model.pt2``), kept by the trained weights' magnitude (``craft.nm_violations``);
- box F1 of the exported program's boxes (run in torch on CPU) against the dense model's
  boxes on the held-out images (pooled, as ``bench/trained.py`` does);
- the compile's wall time and stages, and the bench stage's torch CPU latency of dense and
  2:4 (masked dense weights: no sparse kernel on CPU, so no speed-up is expected there; the
  CUDA timing is ``bench/gpu.py craft`` on a GPU machine).

``DIR`` is filled by ``examples/craft_data.py`` when it has no ``recover/``.

Usage: ``python bench/craft_2to4.py --data DIR [--modes none] [--reuse] [--work out]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import craft  # noqa: E402
import trained  # noqa: E402  (its report helpers: the fidelity line, ratios)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder from examples/craft_data.py")
    parser.add_argument("--modes", default="none", help="recovery modes, comma-separated (none, distill)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "examples" / "craft.yaml")
    parser.add_argument("--work", type=Path, default=ROOT / "out", help="compile outputs go to WORK/craft_2to4_MODE")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the finished outputs there are (WORK/craft_2to4_MODE with its timing.json); "
                             "compile the other modes")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR / "craft_2to4.md")
    return parser.parse_args(argv)


def command(args: argparse.Namespace, mode: str, out: Path) -> list[str]:
    recipe = args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe
    return [str(Path(sys.executable).with_name("spruce")), "compile", "examples/craft.py:make", "--recipe",
            str(recipe), "--data", f"images:{args.data}", "--structure", "2:4", "--sparsity", "0.5", "--target",
            "torch", "--recover", mode, "--out", str(out), "--force"]


def evaluate(out: Path, mode: str, dense: Any, images: Any, reference: list[Any]) -> dict[str, Any]:
    """The 2:4 checks and box F1 of the exported program in ``out``."""
    import torch

    document = json.loads((out / "report.json").read_text())
    program = torch.export.load(out / document["compiled"]["artifact"])
    problems = craft.nm_violations(program.state_dict, dense, one_shot=mode == "none")
    eligible = [name for name in craft.nm_violations({}, dense)]  # every eligible layer is missing from {}
    modules = dict(dense.named_modules())
    total = sum(p.numel() for p in dense.parameters())
    in_eligible = sum(modules[name].weight.numel() for name in eligible)
    boxes = craft.text_boxes(craft.score_maps(program.module(), images))
    score = craft.box_f1(boxes, reference)
    per_image = [craft.box_f1([b], [r]) for b, r in zip(boxes, reference)]
    bench = document.get("bench", {}).get("by_batch", [{}])[0]
    return {"report": document, "eligible": eligible, "weight_layers": sum(
        isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in dense.modules()),
        "eligible_param_share": in_eligible / total, "exact": not problems, "problems": problems,
        "masked_by_spruce": sorted(document.get("sparsity", {})), "f1": score.f1, "matched": score.matched,
        "predicted": score.predicted, "reference": score.reference, "bench": bench,
        "per_image": [f"{v.f1:.2f} ({v.matched}/{v.predicted} vs {v.reference})" for v in per_image]}


def report(args: argparse.Namespace, info: dict[str, str], dense_boxes: int, runs: dict[str, dict[str, Any]]) -> str:
    lines = ["# CRAFT to 2:4 for torch (issue #14, acceptance item 2), on CPU", "",
             "Produced by `bench/craft_2to4.py` (see its docstring): the trained CRAFT (`examples/craft.py`) "
             "compiled with `--structure 2:4 --sparsity 0.5 --target torch`; images from "
             "`examples/craft_data.py` (held out: lower half of `page`, `text`). Box F1 is the exported program's "
             "boxes (torch, CPU) against the dense model's, pooled, axis-aligned rectangles at IoU >= 0.5. "
             "Latency: the compile's bench stage, torch CPU at batch 1; the 2:4 weights are stored as "
             "masked dense tensors, so CPU runs them at dense speed. The CUDA timing (semi-structured "
             "kernels) is `bench/gpu.py craft`, to be run where a GPU is lent: none was in this session, "
             "so no CUDA figure is given here.", "", *benchlib.header_lines(info), "",
             f"Dense boxes on the held-out images: {dense_boxes}.", ""]
    rows = []
    for mode, run in runs.items():
        if "error" in run:
            rows.append([mode, run["error"]] + ["-"] * 6)
            continue
        bench = run["bench"]
        rows.append([mode, f"{len(run['eligible'])} of {run['weight_layers']}",
                     f"{100 * run['eligible_param_share']:.1f} %", "yes" if run["exact"] else "no",
                     f"**{run['f1']:.3f}** ({run['matched']}/{run['predicted']} vs {run['reference']})",
                     f"{benchlib.fmt(bench.get('dense_ms'), 0)} / {benchlib.fmt(bench.get('compiled_ms'), 0)}",
                     f"{run['timing']['wall_s'] / 60:.1f}"])
    lines += benchlib.markdown_table(
        ["recover", "eligible layers (conv/linear)", "params in them", "all exact 2:4 (by magnitude where one-shot)",
         "box F1 vs dense (matched/pred vs dense)", "torch CPU ms dense / 2:4 (batch 1)", "wall min"], rows)
    lines += ["", "Box F1 against item 1's goal (>= " + f"{trained.GOALS['f1']}): " + ", ".join(
        f"`{mode}` {'met' if run['f1'] >= trained.GOALS['f1'] else 'not met'}"
        for mode, run in runs.items() if "error" not in run) + ". The CPU latency pair is the same dense "
        "computation twice (masked weights), so its ratio shows the noise of the loaded machine, not a speed-up.",
        ""]
    for mode, run in runs.items():
        if "error" in run:
            continue
        doc = run["report"]
        recovery = doc.get("recovery", {})
        lines += [f"## `--recover {mode}`", "", f"- command: `{run['timing']['command']}`",
                  f"- wall {run['timing']['wall_s'] / 60:.1f} min (exit {run['timing']['returncode']}); load "
                  f"before {run['timing']['load_before']}, after {run['timing']['load_after']}",
                  "- stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in doc.get("timings", {}).items()),
                  f"- eligible layers: {', '.join(run['eligible'])}; masked by spruce: "
                  f"{'the same' if run['masked_by_spruce'] == sorted(run['eligible']) else run['masked_by_spruce']}",
                  f"- 2:4 check problems: {run['problems'] or 'none'}",
                  f"- box F1 per held-out image (page_lower, text): {', '.join(run['per_image'])}",
                  f"- recovery: {recovery.get('loss', '-')}; {recovery.get('steps', 0)} steps, "
                  f"{recovery.get('mask_updates', 0)} mask updates; BatchNorm "
                  f"re-estimated: {recovery.get('batchnorm_reestimated', '-')}",
                  f"- fidelity to dense on held-out (relative L2 / cosine per output): before recovery "
                  f"{trained._fidelity(recovery.get('fidelity_before_recovery'))}; compiled "
                  f"{trained._fidelity(doc.get('evaluation', {}).get('fidelity'))}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "recover").is_dir():
        import craft_data

        craft_data.main([str(args.data)])
    info = benchlib.machine_info(["easyocr", "scikit-image"])
    info["command"] = "python bench/craft_2to4.py " + " ".join(sys.argv[1:] if argv is None else argv)
    images = craft.load_folder(args.data / "heldout")
    dense = craft.load_craft()
    reference = craft.text_boxes(craft.score_maps(dense, images))
    runs: dict[str, dict[str, Any]] = {}
    for mode in [m for m in args.modes.split(",") if m]:
        out = args.work / f"craft_2to4_{mode}"
        timing = trained.compile_once(args, mode, out, build_command=command, reuse_missing=True)
        if timing["returncode"] != 0 or not (out / "report.json").is_file():
            runs[mode] = {"error": f"compile exited {timing['returncode']} (log {timing['log']})", "timing": timing}
            continue
        runs[mode] = {**evaluate(out, mode, dense, images, reference), "timing": timing}
    info["load average (1/5/15 min) at end"] = benchlib.load_average()
    benchlib.write_atomic(args.out, report(args, info, sum(len(r) for r in reference), runs))
    benchlib.write_atomic(args.out.with_suffix(".json"), json.dumps(
        {"info": info, "runs": {m: {k: v for k, v in r.items() if k != "report"} for m, r in runs.items()}},
        indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
