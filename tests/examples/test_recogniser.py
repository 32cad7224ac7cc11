"""The recogniser example: easyocr's trained english_g2 taking the image only, easyocr's
preparation, greedy CTC decoding, the character error rate, and the word-image data script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("easyocr_en_models")
recogniser = pytest.importorskip("recogniser")
recogniser_data = pytest.importorskip("recogniser_data")


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    chars = recogniser.characters()
    a, b = chars.index("a") + 1, chars.index("b") + 1
    steps = [0, a, a, 0, a, b, b, 0]  # "a", blank, "a", "b": repeats collapse only without a blank between
    scores = torch.full((1, len(steps), len(chars) + 1), -5.0)
    scores[0, torch.arange(len(steps)), torch.tensor(steps)] = 5.0
    assert recogniser.greedy_decode(scores) == ["aab"]
    assert recogniser.greedy_decode(scores.numpy()[:, :1]) == [""]


def test_character_error_rate_is_pooled_edit_distance():
    assert recogniser.edit_distance("kitten", "sitting") == 3
    assert recogniser.char_error_rate(["kitten", "ab"], ["sitting", "ab"]) == pytest.approx(3 / 9)
    assert recogniser.char_error_rate(["", ""], ["", ""]) == 0.0
    with pytest.raises(ValueError, match="predictions"):
        recogniser.char_error_rate(["a"], [])


def test_prepare_keeps_the_aspect_and_pads_with_the_last_column():
    wide = np.full((20, 400, 3), 255, np.uint8)
    narrow = np.zeros((32, 16), np.uint8)
    assert recogniser.prepare(wide).shape == (1, 64, 256)  # squeezed to the width
    out = recogniser.prepare(narrow)
    assert out.shape == (1, 64, 256) and float(out.max()) == -1.0  # black, 32 px wide, padded with black
    assert torch.equal(out[..., 40:], out[..., 31:32].expand(1, 64, 216))


def test_the_trained_recogniser_reads_rendered_words():
    model, (example,) = recogniser.make()
    assert example.shape == (1, 1, 64, 256)
    with torch.no_grad():
        assert model(example).shape == (1, 63, 97)  # (N, T, classes), blank 0
    words = ["spruce", "Recurrent", "layers"]
    images = torch.stack([recogniser.prepare(np.asarray(recogniser.render(w, 32).convert("RGB"))) for w in words])
    assert recogniser.read_words(model, images) == words


def test_the_data_script_writes_disjoint_vocabularies(tmp_path):
    recover_side, held_side = recogniser_data.vocabulary()
    assert not {w.lower() for w in recover_side} & {w.lower() for w in held_side}
    assert all(2 <= len(w) <= 12 for w in recover_side + held_side)
    manifest = recogniser_data.build(tmp_path, recover=3, heldout=2, seed=0)
    assert len(manifest["recover"]) == 3 * len(recogniser_data.SIZES) and len(manifest["heldout"]) == 4
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (tmp_path / "heldout").iterdir()) == sorted(r["file"] for r in manifest["heldout"])
    with pytest.raises(FileExistsError, match="--force"):
        recogniser_data.build(tmp_path, recover=3, heldout=2, seed=0)
