"""Issue #14's acceptance on a real trained model: ``spruce compile`` of the CRAFT text detector.

Runs (or, with ``--reuse``, reads) the compile command for each recovery mode and writes
``bench/results/trained.md`` (and ``.json``)::

    spruce compile examples/craft.py:make --recipe examples/craft.yaml --data images:DIR \\
        --target onnxruntime --budget latency=0.6 --recover MODE --out OUT/craft_MODE

``examples/craft.yaml`` holds what CRAFT needs beyond the defaults (easyocr's ``prepare``, the
score-weighted map loss, the augmentation of the recovery images, the selection options; see
its comments). ``DIR`` is filled by ``examples/craft_data.py`` when it has no ``recover/``.

Figures, per mode:

- latency: the compile's own measured-budget loop (compiled and dense timed interleaved in
  one run on ONNX Runtime CPU at batch 1, load-robust), the predicted ratio where a latency
  table steered, and the bench stage's independent ratio;
- box F1 against the dense model's boxes on the held-out images, pooled and per image: the
  dense boxes come from the trained model in torch, the compiled boxes from the *built
  ONNX artifact* run in ONNX Runtime (what is deployed), both through easyocr's
  ``getDetBoxes`` with its default thresholds (``examples/craft.py``);
- wall time of the compile command (this script times the child process), its stages, the
  recovery steps and loss, the machine and its load.

Modes ``tp`` and ``tp_none`` are Torch-Pruning 1.6.1's uniform L1 channel pruning matched to the
spruce row's *measured* latency ratio, then spruce's own recovery stage (distillation, or
BatchNorm re-estimation only) on the same data: ``bench/trained_tp.py``. With ``--reuse`` they
are run only when their ``WORK/craft_MODE.timing.json`` is missing.

Usage: ``python bench/trained.py --data DIR [--modes distill,none,tp,tp_none] [--reuse] [--work out]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import craft  # noqa: E402
import craft_data  # noqa: E402
import trained_tp  # noqa: E402

GOALS = {"latency": 0.63, "f1": 0.9, "wall_min": 60.0}
LABELS = {"distill": "spruce, `--recover distill`", "none": "spruce, `--recover none`",
          "tp": "Torch-Pruning + spruce's distillation", "tp_none": "Torch-Pruning + BatchNorm re-estimation"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder from examples/craft_data.py")
    parser.add_argument("--modes", default="distill,none",
                        help="distill, none (spruce compile), tp, tp_none (Torch-Pruning + spruce's recovery)")
    parser.add_argument("--tp-goal", type=float, default=None,
                        help="measured latency ratio the Torch-Pruning rows match (default: WORK/craft_distill's)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "examples" / "craft.yaml")
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--work", type=Path, default=ROOT / "out", help="compile outputs go to WORK/craft_MODE")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate finished outputs (WORK/craft_MODE with its timing.json) without compiling")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the F1 evaluation")
    parser.add_argument("--notes", type=Path, default=None,
                        help="a markdown file appended as the report's Notes section (what was tried, by hand)")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR / "trained.md")
    return parser.parse_args(argv)


def command(args: argparse.Namespace, mode: str, out: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("spruce")), "compile", "examples/craft.py:make", "--recipe",
            str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe),
            "--data", f"images:{args.data}", "--target", "onnxruntime", "--budget", f"latency={args.budget:g}",
            "--recover", mode, "--out", str(out), "--force"]


def compile_once(args: argparse.Namespace, mode: str, out: Path, build_command=None,
                 reuse_missing: bool = False) -> dict[str, Any]:
    """Run the compile command (``build_command(args, mode, out)``, default :func:`command`);
    its wall time, exit status and load, saved as ``timing.json`` next to the output (and read
    from there with ``--reuse``; with ``reuse_missing`` a missing file runs the command)."""
    timing_file = out.parent / f"{out.name}.timing.json"
    if args.reuse and (timing_file.is_file() or not reuse_missing):
        return json.loads(timing_file.read_text())
    argv = (build_command or command)(args, mode, out)
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = benchlib.load_average()
    start = time.perf_counter()
    with open(log, "w") as stream:
        code = subprocess.run(argv, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, check=False).returncode
    timing = {"command": " ".join(argv[1:]).replace(str(ROOT) + "/", ""), "wall_s": time.perf_counter() - start,
              "returncode": code, "load_before": load_before, "load_after": benchlib.load_average(),
              "log": str(log)}
    timing_file.write_text(json.dumps(timing, indent=1) + "\n")
    return timing


def onnx_maps(path: Path, images: np.ndarray, threads: int) -> np.ndarray:
    """The first output (the score maps) of the ONNX artifact at ``path`` per image, batch 1."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: image[None]})[0] for image in images])


def evaluate(out: Path, names: list[str], images: np.ndarray, reference: list[np.ndarray],
             threads: int) -> dict[str, Any]:
    document = json.loads((out / "report.json").read_text())
    maps = onnx_maps(out / document["compiled"]["artifact"], images, threads)
    boxes = craft.text_boxes(maps)
    pooled = craft.box_f1(boxes, reference)
    per_image = {name: craft.box_f1([b], [r]) for name, b, r in zip(names, boxes, reference)}
    classic = [k for k, name in enumerate(names) if name in craft_data.CLASSIC_HELDOUT]
    two = craft.box_f1([boxes[k] for k in classic], [reference[k] for k in classic])
    return {"report": document, "f1": pooled.f1, "precision": pooled.precision, "recall": pooled.recall,
            "matched": pooled.matched, "predicted": pooled.predicted, "reference": pooled.reference,
            "classic": {"images": [names[k] for k in classic], "f1": two.f1, "matched": two.matched,
                        "predicted": two.predicted, "reference": two.reference},
            "per_image": {k: {"f1": v.f1, "matched": v.matched, "predicted": v.predicted, "reference": v.reference}
                          for k, v in per_image.items()}}


# The recogniser's figures live in their own hand-written file, which a rerun of this script keeps.
RECOGNISER_NOTE = ("The easyocr recogniser `english_g2` (issue #27: CTC outputs, recurrent layers) has its own "
                   "page, `recogniser.md` (written by hand; `bench/trained.py` does not write it).")


def _fmt_classic(classic: dict[str, Any] | None) -> str:
    if not classic or not classic["images"]:
        return "-"
    return f"{classic['f1']:.3f} ({classic['matched']}/{classic['predicted']} vs {classic['reference']})"


def _fmt_ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(args: argparse.Namespace, info: dict[str, str], dense_boxes: dict[str, int],
           runs: dict[str, dict[str, Any]]) -> str:
    recipe_text = args.recipe.read_text().strip()
    lines = ["# A real trained model: `spruce compile` of the CRAFT text detector (issue #14)", "",
             "Produced by `bench/trained.py` (see its docstring). The trained model is easyocr's CRAFT with the "
             "published `craft_mlt_25k.pth` weights (`examples/craft.py`); recovery and held-out images from "
             "scikit-image (`examples/craft_data.py`: recover = 14 photographs + 32 crops of the upper half of "
             "`page`; held out = lower half of `page` and `text` (issue 14's two images) and, since issue 27, "
             "their halves enlarged and three renders of words in OpenCV's Hershey fonts). Box F1 is against the "
             "dense model's boxes, pooled over the held-out images (and over issue 14's two alone, the figure "
             "of earlier runs), axis-aligned rectangles at IoU >= 0.5; the compiled boxes come "
             "from the built ONNX artifact. Latency is the compile's measured ratio (compiled and dense timed "
             "interleaved in one run, ONNX Runtime CPU, batch 1); for the Torch-Pruning rows, that of the ratio "
             "search's chosen candidate, timed the same way (`bench/trained_tp.py`).", "",
             *benchlib.header_lines(info), "",
             f"Dense boxes on the held-out images: {sum(dense_boxes.values())} "
             f"({', '.join(f'{k} {v}' for k, v in dense_boxes.items())}).", "",
             f"Goals: measured latency <= {GOALS['latency']} of dense, box F1 >= {GOALS['f1']}, "
             f"wall <= {GOALS['wall_min']:g} min on 2 cores.", ""]
    rows = []
    for mode, run in runs.items():
        if "error" in run:
            rows.append([LABELS.get(mode, mode), run["error"]] + ["-"] * 9)
            continue
        doc, budget = run["report"], run["report"].get("budget", {})
        predicted = (budget["compiled_predicted_ms"] / budget["dense_predicted_ms"]
                     if budget.get("dense_predicted_ms") else None)
        rows.append([LABELS.get(mode, mode), _fmt_ratio(budget.get("measured_ratio")), _fmt_ratio(predicted),
                     _fmt_ratio(budget.get("bench_ratio")),
                     f"**{run['f1']:.3f}** ({run['matched']}/{run['predicted']} vs {run['reference']})",
                     _fmt_classic(run.get("classic")),
                     ", ".join(f"{k} {v['f1']:.2f}" for k, v in run["per_image"].items()),
                     f"{run['timing']['wall_s'] / 60:.1f}", doc.get("recovery", {}).get("steps", 0),
                     "yes" if (budget.get("measured_ratio", 9) <= GOALS["latency"] and run["f1"] >= GOALS["f1"]
                               and run["timing"]["wall_s"] / 60 <= GOALS["wall_min"]) else "no"])
    lines += benchlib.markdown_table(
        ["selection + recovery", "latency measured", "predicted", "bench ratio",
         "box F1 pooled (matched/pred vs dense)", "issue 14's 2 images", "F1 per image", "wall min",
         "recovery steps", "all goals"], rows)
    lines.append("")
    for mode, run in runs.items():
        if "error" in run:
            continue
        doc, budget = run["report"], run["report"].get("budget", {})
        recovery = doc.get("recovery", {})
        tp = doc.get("torch_pruning")
        lines += [f"## {LABELS.get(mode, mode)}", "", f"- command: `{run['timing']['command']}`",
                  f"- wall {run['timing']['wall_s'] / 60:.1f} min (exit {run['timing']['returncode']}); load "
                  f"before {run['timing']['load_before']}, after {run['timing']['load_after']}",
                  "- stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in doc.get("timings", {}).items()),
                  f"- latency: dense {benchlib.fmt(budget.get('dense_measured_ms'), 1)} ms, compiled "
                  f"{benchlib.fmt(budget.get('compiled_measured_ms'), 1)} ms measured (ratio "
                  f"{_fmt_ratio(budget.get('measured_ratio'))}, in band {budget.get('in_band')}, "
                  f"{len(budget.get('attempts', []))} selection(s) measured)",
                  f"- selection: {recovery.get('selection', '-')}",
                  *([f"- Torch-Pruning's search for spruce's measured ratio {budget['goal']:.3f} (each candidate "
                     "timed interleaved with dense in one run): " + "; ".join(
                         f"ratio {t['pruning_ratio']:.4f} -> {t['ratio']:.3f}" for t in budget["attempts"])
                     + f"; params {tp['params'] / 1e6:.2f} M of {tp['dense_params'] / 1e6:.2f} M"] if tp else []),
                  f"- recovery: {recovery.get('loss', '-')}; {recovery.get('steps', 0)} steps in "
                  f"{recovery.get('seconds', 0) / 60:.1f} min, loss per epoch "
                  f"{[round(v, 4) for v in recovery.get('loss_per_epoch', [])]}",
                  f"- fidelity to dense on held-out (relative L2 / cosine per output): before recovery "
                  f"{_fidelity(recovery.get('fidelity_before_recovery'))}; compiled "
                  f"{_fidelity(doc.get('evaluation', {}).get('fidelity'))}",
                  f"- box F1 {run['f1']:.3f} (precision {run['precision']:.3f}, recall {run['recall']:.3f}); per "
                  "image: " + ", ".join(f"{k} {v['f1']:.3f} ({v['matched']}/{v['predicted']} vs {v['reference']})"
                                        for k, v in run["per_image"].items()), ""]
    lines += ["## Recipe (`examples/craft.yaml`)", "", "```yaml", recipe_text, "```", ""]
    if args.notes is not None:
        lines += ["## Notes (written by hand, not measured by this script)", "", args.notes.read_text().strip(), ""]
    lines += ["## See also", "", RECOGNISER_NOTE, ""]
    return "\n".join(lines)


def _fidelity(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    return "; ".join(f"{name} {row['relative_l2']:.3f} / {row['cosine']:.3f}"
                     for name, row in record["per_output"].items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "recover").is_dir():
        craft_data.main([str(args.data)])
    info = benchlib.machine_info(["onnxruntime", "easyocr", "scikit-image"])
    info["command"] = "python bench/trained.py " + " ".join(sys.argv[1:] if argv is None else argv)
    files = craft.image_files(args.data / "heldout")
    names = [f.stem for f in files]
    images = craft.load_folder(args.data / "heldout")
    reference = craft.text_boxes(craft.score_maps(craft.load_craft(), images))
    runs: dict[str, dict[str, Any]] = {}
    for mode in [m for m in args.modes.split(",") if m]:
        out = args.work / f"craft_{mode}"
        tp_mode = trained_tp.tp_modes([mode]).get(mode)
        if tp_mode is not None and not (args.reuse and (out.parent / f"{out.name}.timing.json").is_file()):
            timing = trained_tp.run_tp(args, tp_mode, out)
        else:
            timing = compile_once(args, mode, out)
        if timing["returncode"] != 0 or not (out / "report.json").is_file():
            runs[mode] = {"error": f"compile exited {timing['returncode']} (log {timing['log']})", "timing": timing}
            continue
        runs[mode] = {**evaluate(out, names, images.numpy(), reference, args.threads), "timing": timing}
    info["load average (1/5/15 min) at end"] = benchlib.load_average()
    dense_boxes = {name: len(r) for name, r in zip(names, reference)}
    benchlib.write_atomic(args.out, report(args, info, dense_boxes, runs))
    benchlib.write_atomic(args.out.with_suffix(".json"), json.dumps(
        {"info": info, "dense_boxes": dense_boxes,
         "runs": {m: {k: v for k, v in r.items() if k != "report"} | {"budget": r.get("report", {}).get("budget"),
                                                                      "recovery": r.get("report", {}).get("recovery")}
                  for m, r in runs.items()}}, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
