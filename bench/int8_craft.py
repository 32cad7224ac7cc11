"""Where an INT8 CRAFT compile loses box F1: pruning and recovery, or quantization (issue #31).

For each ``spruce compile --precision int8`` output folder given, box F1 against the dense torch
model's boxes on the held-out images (``bench/trained.py``'s evaluation: easyocr's
``getDetBoxes`` at its default thresholds, axis-aligned rectangles at IoU >= 0.5), pooled over
every held-out image and over issue 14's two (``craft_data.CLASSIC_HELDOUT``), for

- ``dense.int8.onnx``: the dense model quantized alone (what INT8 costs without pruning);
- ``model.pt``: the compiled model in torch at fp32 (channels removed, recovered), before
  quantization;
- ``model.onnx``: the shipped INT8 artifact (the same model quantized by ONNX Runtime).

``model.pt`` against ``model.onnx`` is what quantization costs the compiled model; dense against
``model.pt`` is what pruning and recovery cost. Besides F1: the cosine of the region map
(``output[0]``'s first channel) to the dense model's, and F1 per image. Accuracy only (no
timing): run it outside the timing lock.

Usage: ``python bench/int8_craft.py --heldout DIR/heldout OUT [OUT ...] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "bench")]

import craft  # noqa: E402
import craft_data  # noqa: E402
import trained  # noqa: E402

ARTIFACTS = (("dense INT8", "dense.int8.onnx"), ("compiled fp32 (torch)", "model.pt"), ("compiled INT8", "model.onnx"))


def score(maps: np.ndarray, reference_maps: np.ndarray, reference: list[np.ndarray],
          names: list[str]) -> dict[str, Any]:
    """Pooled, classic-two and per-image box F1 of ``maps`` (N, H, W, 2) and the region map's cosine to dense."""
    boxes = craft.text_boxes(maps)
    pooled = craft.box_f1(boxes, reference)
    classic = [k for k, name in enumerate(names) if name in craft_data.CLASSIC_HELDOUT]
    two = craft.box_f1([boxes[k] for k in classic], [reference[k] for k in classic])
    a, b = maps[..., 0].ravel(), reference_maps[..., 0].ravel()
    return {"f1": pooled.f1, "matched": pooled.matched, "predicted": pooled.predicted, "reference": pooled.reference,
            "f1_classic": two.f1, "region_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            "per_image": {name: round(craft.box_f1([p], [r]).f1, 3) for name, p, r in zip(names, boxes, reference)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+", type=Path, help="spruce compile --precision int8 output folders")
    parser.add_argument("--heldout", type=Path, required=True, help="the held-out images (craft_data's heldout/)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [path.stem for path in craft.image_files(args.heldout)]
    images = craft.load_folder(args.heldout)
    reference_maps = craft.score_maps(craft.load_craft().eval(), images)
    reference = craft.text_boxes(reference_maps)
    print(f"{len(names)} held-out images, {sum(len(b) for b in reference)} dense boxes", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for out in args.outs:
        for label, file in ARTIFACTS:
            path = out / file
            if not path.exists():
                continue
            if file.endswith(".pt"):
                with torch.no_grad():
                    maps = craft.score_maps(torch.load(path, weights_only=False).eval(), images)
            else:
                maps = trained.onnx_maps(path, images.numpy(), args.threads)
            row = results.setdefault(str(out), {})[label] = score(maps, reference_maps, reference, names)
            print(f"{out.name:>16} {label:>22}: F1 {row['f1']:.3f} ({row['matched']}/{row['predicted']} vs "
                  f"{row['reference']}), classic two {row['f1_classic']:.3f}, "
                  f"region cosine {row['region_cosine']:.3f}, per image {list(row['per_image'].values())}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"images": names, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
