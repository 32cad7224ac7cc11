"""The CRAFT example: the trained model, easyocr's preparation and post-processing, box F1, the data script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

craft = pytest.importorskip("craft")
craft_data = pytest.importorskip("craft_data")


def _quad(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


def test_box_f1_pools_matches_one_to_one_at_iou_half():
    reference = [np.stack([_quad(0, 0, 10, 10), _quad(20, 0, 30, 10)]), np.stack([_quad(0, 0, 4, 4)])]
    predicted = [
        np.stack([_quad(0, 0, 10, 9), _quad(1, 0, 10, 10), _quad(50, 50, 60, 60)]),  # two on one reference box
        np.zeros((0, 4, 2), np.float32),
    ]
    score = craft.box_f1(predicted, reference)
    assert (score.matched, score.predicted, score.reference) == (1, 3, 3)
    assert score.f1 == pytest.approx(2 / 6) and score.precision == pytest.approx(1 / 3)
    assert score.recall == pytest.approx(1 / 3)
    # IoU 0.5 exactly counts; below does not
    assert craft.box_f1([_quad(0, 0, 10, 10)[None]], [_quad(0, 0, 5, 10)[None]]).matched == 1
    assert craft.box_f1([_quad(0, 0, 10, 10)[None]], [_quad(0, 0, 4.9, 10)[None]]).matched == 0
    # rotated quads compare by their axis-aligned rectangles
    diamond = np.array([[[5, 0], [10, 5], [5, 10], [0, 5]]], dtype=np.float32)
    assert craft.box_f1([diamond], [_quad(0, 0, 10, 10)[None]]).f1 == 1.0
    assert craft.box_f1([np.zeros((0, 4, 2))], [np.zeros((0, 4, 2))]).f1 == 1.0
    with pytest.raises(ValueError, match="images"):
        craft.box_f1([diamond], [])


def test_prepare_keeps_the_aspect_ratio_and_pads_like_easyocr():
    from easyocr.imgproc import normalizeMeanVariance

    image = np.full((100, 600), 200, dtype=np.uint8)  # grey, wider than the canvas
    tensor, ratio = craft.prepare(image)
    assert tensor.shape == (3, 256, 384) and tensor.dtype == torch.float32
    assert ratio == pytest.approx(384 / 600)
    content_h = int(100 * ratio)
    pad = normalizeMeanVariance(np.zeros((1, 1, 3), np.float32))[0, 0]
    grey = normalizeMeanVariance(np.full((1, 1, 3), 200, np.float32))[0, 0]
    assert np.allclose(tensor[:, content_h + 1:, :].numpy(), pad[:, None, None], atol=1e-6)  # zero pixels below
    assert np.allclose(tensor[:, : content_h - 1, :].numpy(), grey[:, None, None], atol=1e-4)
    small, ratio = craft.prepare(np.zeros((50, 60, 3), np.uint8))
    assert ratio == 1.0  # never enlarged (easyocr's mag_ratio 1)
    with pytest.raises(ValueError, match="image"):
        craft.prepare(np.zeros((4, 4, 2), np.uint8))


def test_make_loads_the_trained_weights():
    import easyocr_en_models

    model, (example,) = craft.make()
    assert example.shape == (1, 3, 256, 384) and not model.training
    state = torch.load(Path(easyocr_en_models.model_dir()) / "craft_mlt_25k.pth", map_location="cpu",
                       weights_only=True)
    assert torch.equal(model.basenet.slice1[0].weight, state["module.basenet.slice1.0.weight"])
    assert torch.equal(model.conv_cls[-1].bias, state["module.conv_cls.8.bias"])
    with torch.no_grad():
        maps, feature = model(example[:, :, :64, :96])
    assert maps.shape == (1, 32, 48, 2) and feature.shape == (1, 32, 32, 48)


def test_data_script_writes_disjoint_sets_atomically(tmp_path, capsys):
    folder = tmp_path / "craft"
    assert craft_data.main([str(folder), "--crops", "5"]) == 0
    recover, heldout = craft.image_files(folder / "recover"), craft.image_files(folder / "heldout")
    assert len(recover) == len(craft_data.PHOTOGRAPHS) + 5
    assert {"page_lower.png", "text.png"} < {p.name for p in heldout}  # issue 14's two, and more
    assert len(heldout) == 9
    assert not {p.stem for p in recover} & {p.stem for p in heldout}
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["recover"]:
        if entry["source"] == "page":
            top, _, height, _ = entry["box_top_left_height_width"]
            assert top + height <= craft_data.PAGE_SPLIT_ROW  # never a held-out row
    assert {e["source"] for e in manifest["recover"]} <= set(craft_data.PHOTOGRAPHS) | {"page"}
    held_sources = {e["source"] for e in manifest["heldout"]}
    assert not held_sources & set(craft_data.PHOTOGRAPHS)  # no recovery photograph is held out
    for entry in manifest["heldout"]:
        if entry["source"] == "page":
            assert entry["box_top_left_height_width"][0] >= craft_data.PAGE_SPLIT_ROW  # the lower half only
        if entry["source"].startswith("render"):
            assert len(entry["words"]) >= 10 and set(entry["words"]) <= set(craft_data.HELDOUT_WORDS)
    page_lower = craft.read_image(folder / "heldout" / "page_lower.png")
    assert page_lower.shape == (191 - craft_data.PAGE_SPLIT_ROW, 384, 3)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit):
        craft_data.main([str(folder)])  # exists: refused, nothing touched
    assert sorted(p.name for p in folder.iterdir()) == before
    assert "use --force" in capsys.readouterr().err


def test_unreadable_and_empty_folders(tmp_path):
    import ultralytics  # noqa: F401 - patches PIL.Image.open to import a plugin it may not have; still a clear error
    with pytest.raises(ValueError, match="holds no images"):
        craft.image_files(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        craft.load_folder(tmp_path)


def test_dense_model_finds_the_held_out_text(tmp_path):
    """The acceptance reference: easyocr's post-processing of the dense maps finds the words of
    the lower half of page and a few boxes in text (23 in all at 256 x 384)."""
    craft_data.main([str(tmp_path / "d"), "--crops", "0", "--heldout", "classic"])
    model, _ = craft.make()
    images = craft.load_folder(tmp_path / "d" / "heldout")
    boxes = craft.text_boxes(craft.score_maps(model, images, batch_size=2))
    counts = [len(b) for b in boxes]
    assert counts[0] >= 15 and counts[1] >= 1 and 18 <= sum(counts) <= 35, counts
    assert craft.box_f1(boxes, boxes).f1 == 1.0
    noise = craft.text_boxes(craft.score_maps(model, torch.zeros_like(images)))
    assert craft.box_f1(noise, boxes).f1 < 0.5  # a blank input does not match


def test_one_shot_2_4_on_torch_gives_exact_magnitude_2_4_weights(tmp_path):
    """Issue #14 acceptance item 2 on CPU: ``--structure 2:4 --target torch --recover none`` on
    the trained CRAFT. Every layer spruce's N:M rule finds eligible (all 27 convolutions but the
    first, whose 3 input channels are not a multiple of 4) is exactly 2:4 in the exported
    program, keeping the two largest trained weights of every group; the dense export is not."""
    import spruce
    from PIL import Image
    from skimage import data
    from spruce.passes.sparsity.masking import nm_mask

    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in (("coffee", data.coffee()), ("chelsea", data.chelsea()), ("page", data.page()[:95])):
        Image.fromarray(craft.as_rgb(image)).save(folder / f"{name}.png")
    with pytest.warns(UserWarning, match=r"kept dense: basenet\.slice1\.0 \(input channels 3 not divisible by 4"):
        report = spruce.compile(f"{EXAMPLES / 'craft.py'}:make", data=f"images:{folder}", out=tmp_path / "out",
                                structure="2:4", sparsity=0.5, method="static", target="torch", recover="none",
                                budget=None, prepare=f"{EXAMPLES / 'craft.py'}:prepare", bench_iters=2,
                                bench_warmup=1, bench_batch_sizes=(1,), quiet=True, floor="none")
    out, document = report.out_dir, report.document
    # its outputs get map kinds by the rule (4-D: maps unless declared), distilled as maps, not class scores
    assert [(o["kind"], o["batch_dim"], o["kind_from"].startswith("guessed")) for o in
            document["evaluation"]["outputs"]] == [("map", 0, True), ("map", 0, True)]
    dense = craft.load_craft()
    convs = [name for name, module in dense.named_modules() if isinstance(module, torch.nn.Conv2d)]
    assert len(convs) == 27 and not any(isinstance(m, torch.nn.Linear) for m in dense.modules())
    exported = torch.export.load(out / document["compiled"]["artifact"]).state_dict
    assert craft.nm_violations(exported, dense) == {}
    assert craft.nm_violations(torch.load(out / "model.pt", weights_only=False).state_dict(), dense) == {}
    eligible = set(document["sparsity"])
    assert eligible == set(convs) - {"basenet.slice1.0"}  # the first conv: 3 input channels
    assert all(value == 0.5 for value in document["sparsity"].values())
    assert torch.equal(exported["basenet.slice1.0.weight"], dense.basenet.slice1[0].weight)  # left dense
    # the check can fail: on the dense export, and on an exact 2:4 mask drawn at random
    dense_export = torch.export.load(out / document["dense"]["artifact"]).state_dict
    assert set(craft.nm_violations(dense_export, dense)) == eligible
    trained = dense.upconv4.conv[3].weight.detach()
    scores = torch.rand(trained.shape, generator=torch.Generator().manual_seed(0))
    random_mask = {**exported, "upconv4.conv.3.weight": trained * nm_mask(scores, 2, 4)}
    assert craft.nm_violations(random_mask, dense) == {"upconv4.conv.3": "kept weights are not the largest |w| of the "
                                                                      "trained ones"}
    # the report states the structure
    assert document["recipe"]["structure"] == "2:4" and document["recipe"]["target"] == "torch"
    assert "structure `2:4`" in (out / "report.md").read_text()
    assert document["recovery"]["mode"] == "none" and document["recovery"]["steps"] == 0
