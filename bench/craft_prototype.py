"""CRAFT feasibility prototype for issue #14: is "latency <= 0.63 of dense, box F1 >= 0.9,
<= 60 min on 2 cores" reachable, and with which settings? A measurement script, not an API.

Phases (``--phases``, in order; each appends its figures to ``--work``/results.json, and the
report ``--out`` is rewritten from all of them):

- ``dense``: the trained CRAFT detector (``examples/craft.py``) at 1 x 3 x 256 x 384:
  the dense model's boxes on the held-out images (count per image), its latency on ONNX
  Runtime CPU (``--threads``) at batch 1 (load-robust figure and plain wall median), and the
  wall time of one training step (teacher forward + student forward/backward, MSE on the
  maps, Adam) at batch 2 and 4.
- ``oneshot``: channel analysis, L1 importance, ``meet_latency_budget`` to ``--budget`` of the
  dense model's measured latency (FLOPs steer the knapsack unless ``--cost latency``, which
  profiles a latency table first), BatchNorm statistics re-estimated on augmented recovery
  batches, box F1 against the dense model's boxes on the held-out images (before and after the
  re-estimation). The compact model is saved for the next phase.
- ``distill``: the one-shot compact model distilled from the dense model for ``--minutes``
  of wall time on augmented recovery batches of ``--batch`` images (random ``--train-crop``
  windows of them): MSE on the region and affinity maps weighted per pixel by
  ``1 + --alpha * max(teacher region, teacher affinity)`` (``--alpha 0``: plain MSE), plus
  ``--beta`` x the MSE on the decoder feature (the model's second output) over its variance;
  Adam at ``--lr`` with cosine decay; box F1 on the held-out images every ``--eval-every`` steps.
  ``--loss batch|data`` uses compile's ``weighted_mse`` instead (per element, divided by the
  batch's own or by a data-set-level weighted teacher square measured on 8 batches first),
  ``--aug product`` draws the batches from compile's own ``images:DIR`` loader with
  ``examples/craft.yaml``'s ``augment``, ``--freeze-bn`` keeps BatchNorm in eval mode, and
  ``--min-keep`` makes the one-shot selection compile's (importance divided by its group's
  mean, every group keeping at least that fraction).

Recovery data: ``DIR/recover`` from ``examples/craft_data.py`` (made in ``--work`` when
``--data`` is not given), augmented on the fly: page crops (the only text-bearing recovery
images) at scales 0.6-2.8 with +-20 degree rotations, composited onto the photographs, plus
words rendered with Pillow's built-in scalable font (documented in the report) onto
photographs and paper-like backgrounds; photometric jitter (brightness, contrast, gamma,
grey, blur, noise) on everything. Held-out: ``DIR/heldout`` (lower half of ``page``, ``text``).

Usage: ``python bench/craft_prototype.py --phases dense,oneshot,distill --minutes 20``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import craft  # noqa: E402

WORDS = ("the", "markers", "are", "found", "at", "two", "extreme", "parts", "of", "histogram", "grey", "values",
         "image", "data", "(s)=1", "x+2", "f(x)", "dt", "n-1", "sum", "page", "text", "2024", "3.14", "A-B",
         "Exit", "STOP", "open", "coins", "np.zeros", "label", "value", "scale", "(x-t)", "=", "1/s", "cos t")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default="dense,oneshot,distill")
    parser.add_argument("--data", type=Path, default=None, help="folder from examples/craft_data.py")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spruce-craft")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--cost", choices=("flops", "latency"), default="flops")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--bn-batches", type=int, default=8, help="augmented batches for BatchNorm re-estimation")
    parser.add_argument("--minutes", type=float, default=20.0, help="distillation wall-time budget")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-crop", default="128,192",
                        help="H,W of the random crops of the prepared 256 x 384 images that distillation trains on "
                             "(the model is fully convolutional; 'full' trains on whole images)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--alpha", type=float, default=10.0, help="teacher-score weight of the map loss")
    parser.add_argument("--beta", type=float, default=1.0,
                        help="weight of the feature loss (MSE on the 32-channel decoder feature / its variance)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--min-keep", type=float, default=0.0,
                        help="one-shot: every group keeps at least this fraction (importance divided by the "
                             "group mean when > 0, as compile's recipe does)")
    parser.add_argument("--aug", choices=("proto", "product"), default="proto",
                        help="distill: this script's augmenter, or compile's (examples/craft.yaml's augment)")
    parser.add_argument("--loss", choices=("proto", "batch", "data"), default="proto",
                        help="map loss: proto = weighted mean of squared errors (divided by the weights' sum); "
                             "batch = compile's weighted_mse (divided by the batch's weighted teacher square); "
                             "data = the same divided by a data-set-level weighted teacher square")
    parser.add_argument("--freeze-bn", action="store_true", help="distill with BatchNorm in eval mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR / "craft_prototype.md")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- data


class Augmenter:
    """Random text-bearing and plain training images (H x W x 3 uint8, at most 256 x 384)."""

    def __init__(self, folder: Path, seed: int):
        files = craft.image_files(folder)
        self.pages = [craft.read_image(f) for f in files if f.name.startswith("page_upper")]
        self.photos = [craft.read_image(f) for f in files if not f.name.startswith("page_upper")]
        if not self.pages or not self.photos:
            raise ValueError(f"{folder} needs page_upper crops and photographs (examples/craft_data.py)")
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> np.ndarray:
        kind = self.rng.uniform()
        if kind < 0.45:
            image = self._pages_on_photo()
        elif kind < 0.75:
            image = self._rendered_text()
        else:
            image = self._photo_crop()
        return self._photometric(image)

    def _canvas_size(self) -> tuple[int, int]:
        height, width = craft.INPUT_HW
        if self.rng.uniform() < 0.5:  # also shorter strips, like the held-out half page
            height = int(self.rng.integers(96, height + 1))
        return height, width

    def _background(self, size: tuple[int, int]) -> np.ndarray:
        import cv2

        if self.rng.uniform() < 0.3:  # paper
            tone = self.rng.uniform(150, 240)
            paper = tone + self.rng.normal(0, 6, size)
            return np.repeat(np.clip(paper, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
        photo = self.photos[self.rng.integers(len(self.photos))]
        scale = max(size[0] / photo.shape[0], size[1] / photo.shape[1]) * self.rng.uniform(1.0, 2.0)
        big = cv2.resize(photo, (math.ceil(photo.shape[1] * scale), math.ceil(photo.shape[0] * scale)))
        top = int(self.rng.integers(0, big.shape[0] - size[0] + 1))
        left = int(self.rng.integers(0, big.shape[1] - size[1] + 1))
        return big[top:top + size[0], left:left + size[1]].copy()

    def _rotated(self, image: np.ndarray, degrees: float, fill: int) -> np.ndarray:
        import cv2

        h, w = image.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
        cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
        new_w, new_h = int(h * sin + w * cos), int(h * cos + w * sin)
        matrix[0, 2] += new_w / 2 - w / 2
        matrix[1, 2] += new_h / 2 - h / 2
        return cv2.warpAffine(image, matrix, (new_w, new_h), borderValue=(fill, fill, fill))

    def _paste(self, canvas: np.ndarray, patch: np.ndarray, mask: np.ndarray | None = None) -> None:
        ph, pw = min(patch.shape[0], canvas.shape[0]), min(patch.shape[1], canvas.shape[1])
        patch = patch[:ph, :pw]
        top = int(self.rng.integers(0, canvas.shape[0] - ph + 1))
        left = int(self.rng.integers(0, canvas.shape[1] - pw + 1))
        region = canvas[top:top + ph, left:left + pw]
        if mask is None:
            region[:] = patch
        else:
            m = mask[:ph, :pw, None]
            region[:] = (m * patch + (1 - m) * region).astype(np.uint8)

    def _pages_on_photo(self) -> np.ndarray:
        import cv2

        canvas = self._background(self._canvas_size())
        for _ in range(int(self.rng.integers(1, 3))):
            page = self.pages[self.rng.integers(len(self.pages))]
            scale = float(np.exp(self.rng.uniform(np.log(0.6), np.log(2.8))))
            patch = cv2.resize(page, (max(8, int(page.shape[1] * scale)), max(8, int(page.shape[0] * scale))))
            if self.rng.uniform() < 0.5:
                patch = self._rotated(patch, self.rng.uniform(-20, 20), int(np.median(patch)))
            self._paste(canvas, patch)
        return canvas

    def _rendered_text(self) -> np.ndarray:
        from PIL import Image, ImageDraw, ImageFont

        canvas = self._background(self._canvas_size())
        for _ in range(int(self.rng.integers(2, 7))):
            words = " ".join(self.rng.choice(WORDS, size=int(self.rng.integers(1, 4))))
            size = int(self.rng.integers(10, 44))
            font = ImageFont.load_default(size=size)
            left, top, right, bottom = font.getbbox(words)
            layer = Image.new("L", (right - left + 8, bottom - top + 8), 0)
            ImageDraw.Draw(layer).text((4 - left, 4 - top), words, fill=255, font=font)
            mask = np.asarray(layer, dtype=np.float32) / 255.0
            if self.rng.uniform() < 0.6:
                mask = self._rotated(mask, self.rng.uniform(-25, 25), 0)
            ink = self.rng.uniform(0, 60) if self.rng.uniform() < 0.8 else self.rng.uniform(200, 255)
            patch = np.full((*mask.shape, 3), ink, dtype=np.float32)
            self._paste(canvas, patch, mask * self.rng.uniform(0.7, 1.0))
        return canvas

    def _photo_crop(self) -> np.ndarray:
        return self._background(self._canvas_size())

    def _photometric(self, image: np.ndarray) -> np.ndarray:
        import cv2

        x = image.astype(np.float32) / 255.0
        if self.rng.uniform() < 0.3:
            x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
        x = (x - 0.5) * self.rng.uniform(0.7, 1.3) + 0.5 + self.rng.uniform(-0.15, 0.15)
        x = np.clip(x, 0, 1) ** self.rng.uniform(0.7, 1.4)
        if self.rng.uniform() < 0.25:
            x = cv2.GaussianBlur(x, (0, 0), self.rng.uniform(0.4, 1.2))
        if self.rng.uniform() < 0.3:
            x = x + self.rng.normal(0, self.rng.uniform(0.01, 0.04), x.shape)
        return (np.clip(x, 0, 1) * 255).astype(np.uint8)

    def batch(self, size: int, crop: tuple[int, int] | None = None) -> torch.Tensor:
        """``size`` prepared images (N, 3, 256, 384), or random ``crop`` = (h, w) windows of them
        (the scale of the text is kept; windows prefer the image's content over its padding)."""
        images = []
        for _ in range(size):
            image = self()
            prepared = craft.prepare(image)[0]
            if crop is not None:
                h, w = crop
                top = int(self.rng.integers(0, max(1, min(image.shape[0], craft.INPUT_HW[0]) - h) + 1))
                left = int(self.rng.integers(0, max(1, min(image.shape[1], craft.INPUT_HW[1]) - w) + 1))
                prepared = prepared[:, top:top + h, left:left + w]
            images.append(prepared)
        return torch.stack(images)


# ----------------------------------------------------------------------------- helpers


def held_out(data: Path) -> tuple[torch.Tensor, list[str]]:
    files = craft.image_files(data / "heldout")
    return torch.stack([craft.prepare(craft.read_image(f))[0] for f in files]), [f.stem for f in files]


def f1_report(model: Any, images: torch.Tensor, names: list[str], reference: list[np.ndarray]) -> dict[str, Any]:
    boxes = craft.text_boxes(craft.score_maps(model, images, batch_size=2))
    pooled = craft.box_f1(boxes, reference)
    per = {name: craft.box_f1([b], [r]).f1 for name, b, r in zip(names, boxes, reference)}
    return {"f1": pooled.f1, "precision": pooled.precision, "recall": pooled.recall, "matched": pooled.matched,
            "predicted": pooled.predicted, "reference": pooled.reference, "per_image": per}


def map_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor, alpha: float) -> torch.Tensor:
    weight = 1.0 + alpha * teacher_maps.clamp(0, 1).amax(dim=-1, keepdim=True)
    return (weight * (student_maps - teacher_maps) ** 2).sum() / weight.expand_as(teacher_maps).sum()


def weighted_square(teacher_maps: torch.Tensor, alpha: float = 10.0) -> float:
    """mean(w t^2), w = 1 + alpha max(t, 0): compile's weighted_mse denominator (per element)."""
    t = teacher_maps.float()
    return float(((1.0 + alpha * t.clamp_min(0)) * t ** 2).mean().clamp_min(1e-8))


def product_batches(data: Path, batch: int, crop: tuple[int, int] | None):
    """Batches from compile's own ``images:DIR`` loader with examples/craft.yaml's augment."""
    import yaml
    from spruce.compiler.augment import Augment
    from spruce.compiler.datasets import load_images

    options = dict(yaml.safe_load((ROOT / "examples" / "craft.yaml").read_text())["augment"])
    options["size"] = list(crop) if crop is not None else None
    _, (x,) = craft.make()
    loaders = load_images(f"images:{data}", x, seed=0, batch_size=batch,
                          prepare=lambda image, size=craft.INPUT_HW: craft.prepare(image, size)[0],
                          augment=Augment(**options))
    state = {"it": iter(loaders.train)}

    def next_batch() -> torch.Tensor:
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loaders.train)
            return next(state["it"])
    return next_batch


def reestimate_batchnorm(model: torch.nn.Module, augment: Augmenter, batches: int, size: int) -> None:
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(augment.batch(size))
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def save_results(args: argparse.Namespace, key: str, value: dict[str, Any]) -> dict[str, Any]:
    path = args.work / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = value
    benchlib.write_atomic(path, json.dumps(results, indent=1, default=float))
    return results


# ----------------------------------------------------------------------------- phases


def phase_dense(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    from spruce.targets.onnxruntime import OnnxRuntimeCPU

    model, (x,) = craft.make()
    images, names = held_out(data)
    reference = craft.text_boxes(craft.score_maps(model, images, batch_size=2))
    counts = {name: len(b) for name, b in zip(names, reference)}
    print(f"dense boxes on the held-out images: {counts}", flush=True)
    target = OnnxRuntimeCPU(threads=args.threads)
    timing, = target.measure_models([(model, (x,))], warmup=2, rounds=10)
    print(f"dense ORT latency: {timing.robust_ms():.1f} ms (wall median {timing.wall_median_ms():.1f} ms, "
          f"waiting {100 * timing.waiting_share():.0f} %)", flush=True)
    augment = Augmenter(data / "recover", args.seed)
    steps = {}
    for batch in (2, 4):
        student = copy.deepcopy(model).train()
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-5)
        walls, cpus = [], []
        for _ in range(3):
            inputs = augment.batch(batch)
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                teacher = model(inputs)[0]
            loss = map_loss(student(inputs)[0], teacher, args.alpha)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        steps[batch] = {"wall_s": float(np.median(walls[1:])), "cpu_s": float(np.median(cpus[1:]))}
        print(f"training step at batch {batch}: {steps[batch]['wall_s']:.1f} s wall "
              f"({steps[batch]['cpu_s']:.1f} s CPU)", flush=True)
    return {"boxes": counts, "boxes_total": sum(counts.values()), "latency_ms": timing.robust_ms(),
            "latency_wall_median_ms": timing.wall_median_ms(), "waiting_share": timing.waiting_share(),
            "step": steps, "load": benchlib.load_average()}


def phase_oneshot(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    from spruce.api.verbs import analyze_model, profile
    from spruce.passes.importance import importance_scores, param_table
    from spruce.passes.sparsity.knapsack import build_cost_model
    from spruce.runtime.budget import meet_latency_budget
    from spruce.targets.onnxruntime import OnnxRuntimeCPU

    started = time.perf_counter()
    model, (x,) = craft.make()
    images, names = held_out(data)
    reference = craft.text_boxes(craft.score_maps(model, images, batch_size=2))
    analysis = analyze_model(model, (x,))
    prunable = [g for g in analysis.groups if g.prunable]
    print(f"CRAFT: {len(analysis.groups)} channel groups, {len(prunable)} prunable "
          f"({sum(g.size for g in prunable)} channels)", flush=True)
    params = param_table(model)
    rng = np.random.default_rng(args.seed)
    importance = {g.id: importance_scores("l1", g, params, rng) for g in prunable}
    required = None
    if args.min_keep > 0:
        from spruce.passes.sparsity.knapsack import minimum_kept, normalise_importance

        importance = normalise_importance(importance, "group_mean")
        required = minimum_kept(importance, args.min_keep, args.round_to)
    target = OnnxRuntimeCPU(threads=args.threads)
    table, profile_s, cost_model = None, 0.0, None
    if args.cost == "latency":
        clock = time.perf_counter()
        table = profile(model, (x,), target, step=args.round_to, cache_dir=args.work / "latency-cache")
        profile_s = time.perf_counter() - clock
    else:
        cost_model = build_cost_model("flops", model, analysis)
    clock = time.perf_counter()
    result = meet_latency_budget(analysis, model, table, target, args.budget, importance, (x,),
                                 round_to=args.round_to, timing_rounds=8, cost_model=cost_model,
                                 required=required)
    select_s = time.perf_counter() - clock
    print(f"one-shot selection: measured {result.measured_ms:.1f} ms = {result.ratio:.3f} of dense "
          f"{result.measured_dense_ms:.1f} ms after {len(result.attempts)} selection(s), {select_s:.0f} s", flush=True)
    compact = result.compact
    before = f1_report(compact, images, names, reference)
    clock = time.perf_counter()
    reestimate_batchnorm(compact, Augmenter(data / "recover", args.seed + 1), args.bn_batches, args.batch)
    bn_s = time.perf_counter() - clock
    after = f1_report(compact, images, names, reference)
    print(f"one-shot F1 {before['f1']:.3f} before, {after['f1']:.3f} after BatchNorm re-estimation", flush=True)
    torch.save(compact, args.work / "oneshot.pt")
    params_kept = sum(p.numel() for p in compact.parameters()) / sum(p.numel() for p in model.parameters())
    return {"selection": result.summary(), "profile_s": profile_s, "select_s": select_s, "bn_s": bn_s,
            "f1_before_bn": before, "f1_after_bn": after, "params_kept": params_kept, "cost": args.cost,
            "wall_s": time.perf_counter() - started, "load": benchlib.load_average()}


def phase_distill(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    started = time.perf_counter()
    teacher, _ = craft.make()
    student = torch.load(args.work / "oneshot.pt", weights_only=False)
    images, names = held_out(data)
    reference = craft.text_boxes(craft.score_maps(teacher, images, batch_size=2))
    augment = Augmenter(data / "recover", args.seed + 2)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    budget_s = 60 * args.minutes
    crop = None if args.train_crop == "full" else tuple(int(v) for v in args.train_crop.split(","))
    def next_batch() -> torch.Tensor:
        return augment.batch(args.batch, crop)

    if args.aug == "product":
        next_batch = product_batches(data, args.batch, crop)
    scale = None
    if args.loss == "data":
        with torch.no_grad():
            squares = [weighted_square(teacher(next_batch())[0]) for _ in range(8)]
        scale = float(np.mean(squares))
        print(f"data-set weighted teacher square: {scale:.4g} (batches {np.round(squares, 4)})", flush=True)
    curve = [{"step": 0, "wall_s": 0.0, **f1_report(student, images, names, reference)}]
    step, losses = 0, []
    clock = time.perf_counter()
    while time.perf_counter() - clock < budget_s:
        progress = min(1.0, (time.perf_counter() - clock) / budget_s)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * progress))
        inputs = next_batch()
        with torch.no_grad():
            target_maps, target_feature = teacher(inputs)
        student.train()
        if args.freeze_bn:
            for module in student.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        maps, feature = student(inputs)
        if args.loss == "proto":
            loss = map_loss(maps, target_maps, args.alpha)
        else:
            denominator = weighted_square(target_maps) if scale is None else scale
            weight = 1.0 + args.alpha * target_maps.clamp_min(0)
            loss = (weight * (maps - target_maps) ** 2).mean() / denominator
        if args.beta:
            spread = target_feature.var().clamp_min(1e-6)
            loss = loss + args.beta * functional.mse_loss(feature, target_feature) / spread
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0:
            student.eval()
            curve.append({"step": step, "wall_s": time.perf_counter() - clock, "loss": float(np.mean(losses[-10:])),
                          **f1_report(student, images, names, reference)})
            print(f"step {step} ({curve[-1]['wall_s'] / 60:.1f} min): loss {curve[-1]['loss']:.5f} "
                  f"F1 {curve[-1]['f1']:.3f} {curve[-1]['per_image']}", flush=True)
    student.eval()
    if curve[-1]["step"] != step:
        curve.append({"step": step, "wall_s": time.perf_counter() - clock, "loss": float(np.mean(losses[-10:])),
                      **f1_report(student, images, names, reference)})
    torch.save(student, args.work / "distilled.pt")
    return {"steps": step, "batch": args.batch, "crop": args.train_crop, "lr": args.lr, "alpha": args.alpha,
            "beta": args.beta, "aug": args.aug, "loss": args.loss, "freeze_bn": args.freeze_bn,
            "minutes": args.minutes,
            "curve": curve, "wall_s": time.perf_counter() - started, "load": benchlib.load_average()}


# ----------------------------------------------------------------------------- report


def report(results: dict[str, Any], info: dict[str, str]) -> str:
    lines = ["# CRAFT feasibility prototype (issue #14)", "", "Produced by `bench/craft_prototype.py` (see its "
             "docstring for the method). Words for the rendered-text augmentation are drawn with Pillow's "
             "built-in scalable font (`ImageFont.load_default(size)`).", "", *benchlib.header_lines(info), ""]
    dense = results.get("dense")
    if dense:
        lines += ["## Dense model", "",
                  f"- boxes on the held-out images (easyocr `getDetBoxes`, default thresholds): "
                  f"{dense['boxes_total']} ({', '.join(f'{k}: {v}' for k, v in dense['boxes'].items())})",
                  f"- latency, ONNX Runtime CPU, batch 1, 1 x 3 x 256 x 384: {dense['latency_ms']:.1f} ms load-robust "
                  f"(wall median {dense['latency_wall_median_ms']:.1f} ms, {100 * dense['waiting_share']:.0f} % of it "
                  "waiting for a CPU)",
                  *[f"- one training step (teacher forward + student forward/backward, Adam) at batch {b}: "
                    f"{s['wall_s']:.1f} s wall, {s['cpu_s']:.1f} s CPU" for b, s in dense["step"].items()],
                  f"- load average at the end of the phase: {dense['load']}", ""]
    oneshot = results.get("oneshot")
    if oneshot:
        sel = oneshot["selection"]
        lines += ["## One-shot: L1 channel selection to the measured budget + BatchNorm re-estimation", "",
                  f"- budget {sel['budget']} of dense; measured {sel['measured_ms']:.1f} ms vs dense "
                  f"{sel['measured_dense_ms']:.1f} ms = **{sel['ratio']:.3f}** ({len(sel['attempts'])} selection(s), "
                  f"knapsack steered by {oneshot['cost']}; {oneshot['select_s']:.0f} s; profile "
                  f"{oneshot['profile_s']:.0f} s); parameters kept {oneshot['params_kept']:.2f}",
                  f"- box F1 vs dense: {oneshot['f1_before_bn']['f1']:.3f} before, "
                  f"**{oneshot['f1_after_bn']['f1']:.3f}** after BatchNorm re-estimation "
                  f"({oneshot['f1_after_bn']['per_image']}; {oneshot['bn_s']:.0f} s)",
                  f"- phase wall time {oneshot['wall_s'] / 60:.1f} min; load at its end {oneshot['load']}", ""]
    distill = results.get("distill")
    if distill:
        lines += ["## Distillation from the dense model (score-weighted map MSE)", "",
                  f"- {distill['steps']} steps of batch {distill['batch']} (training crops {distill['crop']}) in "
                  f"{distill['minutes']:g} min, Adam lr "
                  f"{distill['lr']:g} (cosine), map weight 1 + {distill['alpha']:g} x teacher score, feature loss "
                  f"x {distill.get('beta', 0):g}; phase wall "
                  f"{distill['wall_s'] / 60:.1f} min; load at its end {distill['load']}", ""]
        lines += benchlib.markdown_table(
            ["step", "minutes", "loss", "F1 pooled", "precision", "recall", "per image"],
            [[c["step"], f"{c['wall_s'] / 60:.1f}", benchlib.fmt(c.get("loss"), 5), f"{c['f1']:.3f}",
              f"{c['precision']:.3f}", f"{c['recall']:.3f}",
              ", ".join(f"{k} {v:.2f}" for k, v in c["per_image"].items())] for c in distill["curve"]])
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = args.work / "data"
        if not (data / "recover").is_dir():
            import craft_data

            craft_data.main([str(data)])
    info = benchlib.machine_info(["onnxruntime", "easyocr", "scikit-image"])
    info["command"] = "python bench/craft_prototype.py " + " ".join(sys.argv[1:] if argv is None else argv)
    phases = {"dense": phase_dense, "oneshot": phase_oneshot, "distill": phase_distill}
    results: dict[str, Any] = {}
    for name in [p for p in args.phases.split(",") if p]:
        if name not in phases:
            raise SystemExit(f"unknown phase {name!r}; valid: {', '.join(phases)}")
        results = save_results(args, name, phases[name](args, data))
    info["load average (1/5/15 min) at end"] = benchlib.load_average()
    benchlib.write_atomic(args.out, report(results, info))
    benchlib.write_atomic(args.out.with_suffix(".json"), json.dumps({"info": info, "results": results}, indent=1,
                                                                  default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
