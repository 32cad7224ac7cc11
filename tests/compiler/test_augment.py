"""Augmented ``images:DIR`` recovery data (#14): fresh samples every epoch, at the size asked,
from real photographs; the held-out images untouched; bad options refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from spruce.compiler.augment import Augment, AugmentedImages, AugmentError
from spruce.compiler.datasets import DataError, load_data
from spruce.compiler.recipes import Recipe, RecipeError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("augment")
    (root / "recover").mkdir()
    (root / "heldout").mkdir()
    for name in ("astronaut", "coffee", "camera"):
        image = getattr(data, name)()
        Image.fromarray(image).save(root / "recover" / f"{name}.png")
    page = data.page()
    Image.fromarray(page[:90]).save(root / "recover" / "page_top.png")
    Image.fromarray(page[100:]).save(root / "heldout" / "page_bottom.png")
    return root


def test_samples_are_fresh_each_draw_and_sized_as_asked(folder):
    augment = Augment(copies=3, paste=1.0, paste_from="page_*", text=1.0, size=(48, 64))
    example = torch.zeros(1, 3, 96, 128)
    loaders = load_data(f"images:{folder}", seed=0, batch_size=4, example=example, augment=augment)
    batches = list(loaders.train)
    assert len(loaders.train.dataset) == 3 * 4
    assert all(tuple(b.shape) == (4, 3, 48, 64) for b in batches)  # the recovery windows' size
    assert [tuple(b.shape) for b in loaders.test] == [(1, 3, 96, 128)]  # held out at the example's, as given
    again = torch.cat(list(loaders.train))
    assert not torch.equal(torch.cat(batches), again)  # a new epoch draws new samples
    assert torch.cat(batches).std() > 0.05  # real pictures, not blank canvases


def test_photometric_jitter_and_scaling_change_an_image_but_keep_its_size():
    image = np.tile(np.linspace(0, 255, 80, dtype=np.uint8)[None, :, None], (60, 1, 3))
    plain = AugmentedImages([image], ["a.png"], Augment(scale=(1.0, 1.0), photometric=0.0, grey=0.0, blur=0.0),
                            lambda i, s: i, (60, 80))
    assert np.array_equal(plain.sample(0), image)  # no augmentation asked: the image itself
    jittered = AugmentedImages([image], ["a.png"], Augment(scale=(1.0, 1.0), photometric=0.5),
                               lambda i, s: i, (60, 80), seed=1)
    samples = [jittered.sample(0) for _ in range(4)]
    assert all(s.shape == image.shape for s in samples)
    assert any(not np.array_equal(s, image) for s in samples)
    scaled = AugmentedImages([image], ["a.png"], Augment(scale=(0.5, 0.5), photometric=0.0, grey=0.0, blur=0.0),
                             lambda i, s: i, (60, 80))
    assert scaled.sample(0).shape == (30, 40, 3)  # half the fitted size, padded later by prepare


def test_bad_augment_options_are_refused_by_name(folder):
    with pytest.raises(AugmentError, match="scale"):
        Augment(scale=(2.0, 1.0))
    with pytest.raises(RecipeError, match="augment"):
        Recipe(augment={"copies": 0})
    assert Recipe(augment={"size": [64, 96], "scale": [0.5, 1.5]}).augment.size == (64, 96)
    with pytest.raises(DataError, match="paste_from 'sign_\\*' matches none"):
        load_data(f"images:{folder}", example=torch.zeros(1, 3, 32, 32), augment=Augment(paste=0.5,
                                                                                          paste_from="sign_*"))
    with pytest.raises(DataError, match="augment applies to images:DIR only"):
        load_data("digits", augment=Augment())


def _recovery_batches(folder, monkeypatch, read_before: int) -> list[torch.Tensor]:
    """The batches the recovery stage hands ``recover`` (its first pass over the loader), after
    ``read_before`` batches were read from the same loaders by an earlier stage."""
    from spruce.compiler import stages
    from spruce.compiler.recovery import RecoveryLog
    from spruce.compiler.results import Captured, Profiled, Reference, Setup, Sparsified, Workspace
    from spruce.compiler.training import TrainLog
    from torch import nn

    recipe = Recipe(augment={"copies": 2, "paste": 0.5, "paste_from": "page_*", "text": 0.5, "size": [24, 32]},
                    seed=3)
    example = torch.zeros(1, 3, 48, 64)
    data = load_data(f"images:{folder}", seed=recipe.seed, batch_size=2, example=example, augment=recipe.augment)
    for _, _ in zip(range(read_before), data.train):  # e.g. the output plan's guess on the first batches
        pass
    seen: list[torch.Tensor] = []

    def recover(student, teacher, loader, mode, plan, **options):
        seen.extend(loader)
        return RecoveryLog(mode)

    monkeypatch.setattr(stages, "recover", recover)
    model = nn.Conv2d(3, 2, 3)
    setup = Setup(recipe, None, data, model, example, {}, plan=None, mode="distill")
    stages.recover_student(setup, Reference(model, TrainLog()), Captured(model, None), Profiled(None),
                           Sparsified(recipe.method, None, 0), Workspace(folder, quiet=True))
    return seen


def test_recovery_sees_the_same_batches_whatever_read_the_data_before(folder, monkeypatch):
    fresh = _recovery_batches(folder, monkeypatch, read_before=0)
    after_a_stage = _recovery_batches(folder, monkeypatch, read_before=3)  # order and augmentation both drawn
    assert len(fresh) == len(after_a_stage) == 4
    assert all(torch.equal(a, b) for a, b in zip(fresh, after_a_stage))


def test_shade_and_invert_change_lighting_and_polarity_as_documented():
    page = np.full((60, 80, 3), 220, np.uint8)
    page[20:40, 10:70] = 30  # a dark stroke on a light page
    still = Augment(scale=(1.0, 1.0), photometric=0.0, grey=0.0, blur=0.0)
    plain = AugmentedImages([page], ["p.png"], still, lambda i, s: i, (60, 80), seed=2).sample(0)
    assert np.array_equal(plain, page)
    inverted = AugmentedImages([page], ["p.png"], still.model_copy(update={"invert": 1.0}), lambda i, s: i, (60, 80),
                               seed=2).sample(0)
    assert np.array_equal(inverted, 255 - page)  # light stroke on a dark page
    for seed in range(4):
        shaded = AugmentedImages([page], ["p.png"], still.model_copy(update={"shade": 1.0}), lambda i, s: i,
                                 (60, 80), seed=seed).sample(0).astype(float)
        background = shaded[np.ones((60, 80), bool) & (page[:, :, 0] == 220)]
        assert background.max() - background.min() > 20  # uneven lighting across the page
        assert shaded[:, :, 0].max() <= 220  # darker, never brighter than the page
        stroke = shaded[20:40, 10:70, 0]
        assert (background.mean() - stroke.mean()) < 190 * 0.9  # lower contrast than the page's 190
