"""The docs' "write a method" how-to, followed to the letter: a toy method in one new module
works by string, by config object, in a recipe file, on the CLI and through checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import spruce
import torch
import torch.nn as nn
from spruce.cli.main import main
from spruce.compiler.recipes import load_recipe
from spruce.passes.sparsity.method import METHODS, RunLength
from spruce.passes.sparsity.registry import method_names

EXTEND_PAGE = Path(__file__).resolve().parents[2] / "docs" / "howto" / "extend.md"
X = torch.randn(2, 1, 8, 8)


def toy_source() -> str:
    """The toy method module exactly as the docs' "A sparse-training method" section shows it."""
    section = EXTEND_PAGE.read_text(encoding="utf-8").split("## A sparse-training method", 1)[1]
    return re.search(r"```python\n(# toy_method\.py.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Import the docs' module (one new file) the way a user's code would."""
    folder = tmp_path_factory.mktemp("toy")
    (folder / "toy_method.py").write_text(toy_source())
    spec = importlib.util.spec_from_file_location("toy_method", folder / "toy_method.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_method"] = module
    spec.loader.exec_module(module)
    yield module
    METHODS.pop("toy", None)
    sys.modules.pop("toy_method", None)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))


def train(sm, opt, steps: int, gen: torch.Generator | None = None) -> None:
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(sm(torch.randn(4, 1, 8, 8, generator=gen)),
                                           torch.randint(0, 10, (4,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()


def masks(sm) -> list[torch.Tensor]:
    return [layer.masked.mask.clone() for layer in sm.layers]


def test_the_toy_method_is_registered_by_its_one_module(toy):
    assert "toy" in method_names()
    assert METHODS["toy"].Config is toy.ToyConfig and toy.ToyConfig.handler is toy.Toy
    with pytest.raises(ValueError, match="toy: every must be >= 1"):
        toy.ToyConfig(every=0)
    assert toy.ToyConfig().for_run(RunLength(total_steps=50)).every == 5  # unset: scaled to the run
    assert toy.ToyConfig(every=7).for_run(RunLength(total_steps=50)).every == 7


@pytest.mark.parametrize("by", ["string", "config"])
def test_the_toy_method_trains_by_string_and_by_config_object(toy, by):
    method = {"method": "toy", "every": 2} if by == "string" else {"method": toy.ToyConfig(every=2)}
    sm = spruce.sparsify(cnn(), X, sparsity=0.5, total_steps=6, **method)
    assert isinstance(sm.method, toy.Toy) and sm.method.config == toy.ToyConfig(every=2)
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    sm.attach(opt)
    before = masks(sm)
    train(sm, opt, 6)
    assert sm.method.redraws == 3 and len(sm.metrics) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, masks(sm)))
    for layer in sm.layers:  # the invariant every method keeps: each layer's sparsity on its (ERK) target
        assert int(layer.masked.mask.sum()) == round(layer.density * layer.masked.mask.numel())
    with pytest.raises(ValueError, match="toy.*does not support structure='channel'"):
        spruce.sparsify(cnn(), X, toy.ToyConfig(), structure="channel", sparsity=0.5, distribution="uniform",
                        total_steps=6)


def test_the_toy_method_in_a_recipe_file_and_on_the_cli(toy, tmp_path, capsys):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("method: {name: toy, every: 4}\nstructure: unstructured\nsparsity: 0.5\nbudget: null\n"
                      "epochs: 1\nbench_iters: 1\nbench_warmup: 0\nbench_batch_sizes: [1]\nfloor: none\n")
    assert load_recipe(recipe).method == toy.ToyConfig(every=4)
    out = tmp_path / "out"
    code = main(["compile", "--recipe", str(recipe), "--method-option", "every=3", "--out", str(out), "--quiet",
                 "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"]["method"] == {"name": "toy", "every": 3}
    assert report["metrics"] and all(m["step"] % 3 == 0 for m in report["metrics"])
    assert report["compiled"]["params"] == report["dense"]["params"]  # unstructured: folded, not compacted
    assert main(["compile", "--method", "toy", "--method-option", "every=0", "--structure", "unstructured",
                 "--sparsity", "0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "toy: every must be >= 1" in capsys.readouterr().err


def test_the_toy_method_through_checkpoint_save_and_load(toy, tmp_path):
    def start():
        sm = spruce.sparsify(cnn(), X, toy.ToyConfig(every=2), sparsity=0.5, total_steps=8)
        opt = torch.optim.SGD(sm.parameters(), lr=0.1, momentum=0.9)
        sm.attach(opt)
        return sm, opt

    whole, whole_opt = start()
    train(whole, whole_opt, 8, torch.Generator().manual_seed(0))
    first, first_opt = start()
    data = torch.Generator().manual_seed(0)
    train(first, first_opt, 5, data)  # killed after step 5, mid-way between two re-draws
    path = spruce.save(first, tmp_path / "toy.pt", first_opt)
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    resumed = spruce.load(path, model, optimizer=opt)
    assert isinstance(resumed.method, toy.Toy) and resumed.method.config == toy.ToyConfig(every=2)
    assert resumed.method.redraws == 2 and resumed.step_count == 5
    train(resumed, opt, 3, data)
    assert resumed.method.redraws == whole.method.redraws == 4
    assert all(torch.equal(a, b) for a, b in zip(masks(resumed), masks(whole)))
    for a, b in zip(resumed.layers, whole.layers):
        assert torch.equal(a.module.weight, b.module.weight)


def test_a_method_declared_as_an_entry_point_is_found_in_a_fresh_process(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "toy_method.py").write_text(toy_source())
    info = site / "toy_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[spruce.methods]\ntoy = toy_method\n")
    code = ("from spruce.passes.sparsity.registry import method_config, method_names\n"
            "print('toy' in method_names(), type(method_config('toy', every=3)).__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "ToyConfig"]
