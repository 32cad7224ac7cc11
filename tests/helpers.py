"""Shared test helpers: non-trivial weights and the equivalence oracle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm statistic non-trivial values, so zero-initialised
    heads, unit BatchNorms or 1e-6 layer scales cannot hide a wrong channel removal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or float(p.std()) == 0.0:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model


def randomise_transformer(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights N(0, 0.2), biases N(0, 0.1), norm weights U(0.5, 1.5): a dropped bias or a norm
    computed over the wrong width changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = "norm" in type(module).__name__.lower()
            for name, param in module.named_parameters(recurse=False):
                if norm and name == "weight":
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
                elif name == "bias" or norm:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def first_output(value):
    """The main tensor of a model output (logits of GoogLeNet/Inception named tuples)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return next(iter(value.values()))
    return value[0]


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |a - b| relative to the output scale (at least 1)."""
    reference, other = reference.detach(), other.detach()
    scale = max(1.0, float(reference.abs().max()))
    return float((reference - other).abs().max()) / scale


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's real 8x8 digits as (N, 1, 8, 8) floats in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(data.target)


def small_digits_cnn(seed: int = 0) -> nn.Module:
    """Two 3x3 convs and a linear classifier for 8x8 inputs (seeded)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 64, 10))


class SGDLoop:
    """A real SGD training loop around a SparseModel ``sm``: the optimizer given, or SGD (lr
    0.05, momentum 0.9, ``weight_decay``). Each step draws a batch of ``shape`` with labels in
    ``[0, classes)`` from ``gen`` or a generator seeded with ``seed`` (two loops with one seed
    see the same batches); ``step`` = backward, optimizer step, then ``sm.step()``."""

    def __init__(self, sm, shape: tuple[int, ...], classes: int, seed: int = 0, opt=None, train: bool = False,
                 weight_decay: float = 1e-3, gen: torch.Generator | None = None):
        self.sm, self.shape, self.classes = sm, shape, classes
        self.gen = gen if gen is not None else torch.Generator().manual_seed(seed)
        self.opt = opt if opt is not None else torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9,
                                                               weight_decay=weight_decay)
        sm.attach(self.opt)
        if train:
            sm.train()

    def backward(self) -> None:
        x = torch.randn(*self.shape, generator=self.gen)
        y = torch.randint(0, self.classes, (self.shape[0],), generator=self.gen)
        loss = nn.functional.cross_entropy(self.sm(x), y)
        self.opt.zero_grad()
        loss.backward()

    def step(self) -> None:
        self.backward()
        self.opt.step()
        self.sm.step()



def save_run(path: Path, sm, loop: SGDLoop) -> None:
    """Checkpoint a training run mid-way: the SparseModel's state, its optimizer's and the batch generator's."""
    torch.save({"m": sm.state_dict(), "o": loop.opt.state_dict(), "g": loop.gen.get_state()}, path)


def resume_run(path: Path, sm, make_loop) -> SGDLoop:
    """Resume the run :func:`save_run` wrote into a fresh SparseModel ``sm``: its state loaded first,
    then the loop ``make_loop(sm)`` built, its optimizer and batch generator restored."""
    checkpoint = torch.load(path, weights_only=False)
    sm.load_state_dict(checkpoint["m"])
    loop = make_loop(sm)
    loop.opt.load_state_dict(checkpoint["o"])
    loop.gen.set_state(checkpoint["g"])
    return loop

# --- the floors' own entry points, for tests of passes/, targets/, runtime/ and capture/ -------
# These tests never import spruce.api / compiler / cli (tests/test_test_layout.py checks it); they
# capture with spruce.capture and hand the graph to the pass, as the library verbs do.

def analyze_model(model: nn.Module, example_inputs: object, leaf_modules=(), dynamic_shapes=None, **options):
    """Capture ``model`` (spruce.capture.trace.capture) and analyse its channels
    (spruce.passes.analysis.analyze, ``options`` are its own)."""
    from spruce.capture.trace import capture
    from spruce.passes.analysis import analyze

    return analyze(capture(model, example_inputs, leaf_modules, dynamic_shapes), **options)


def channel_groups(model: nn.Module, example_inputs: object, leaf_modules=(), dynamic_shapes=None) -> list:
    """Every set of coupled channels of ``model`` (its analysis' groups)."""
    return analyze_model(model, example_inputs, leaf_modules, dynamic_shapes).groups


def sparsify(model: nn.Module, example_inputs: object, *args, **options):
    """A SparseModel of ``model``: captured, then spruce.passes.sparsity.model.sparsify_captured
    (positional and keyword arguments are its own: method, structure, sparsity, ...)."""
    from spruce.capture.trace import capture
    from spruce.passes.sparsity.model import sparsify_captured

    return sparsify_captured(capture(model, example_inputs), *args, **options)


def profile(model: nn.Module, example_inputs: object, target="onnxruntime", step: int = 8, **options):
    """The latency table of ``model`` on ``target`` (spruce.runtime.profile.profile with the
    model's channel analysis; ``options`` are its own)."""
    from spruce.runtime.profile import profile as profile_layers

    return profile_layers(model, example_inputs, target, step, analysis=analyze_model(model, example_inputs),
                          **options)


def count_params(model: nn.Module) -> int:
    """Parameter elements of ``model`` (a shared parameter once): the oracle budgets are checked with."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward pass, by torch's own FLOP counter (one MAC = two FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example_inputs)
    return counter.get_total_flops() // 2


def bench_cnn(width: int) -> nn.Module:
    """A small seeded CNN for 32x32 images, ``width`` channels wide (eval mode)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def bench_artifacts(folder: Path) -> dict[str, Path]:
    """Built artifacts to time, in ``folder``: ``dense`` (ONNX Runtime, 64 wide), ``pruned`` (ONNX
    Runtime, 16 wide) and ``torch`` (the 16-wide model as a torch .pt2), each with its manifest."""
    from spruce.targets.base import get_target

    x = (torch.randn(1, 3, 32, 32),)
    ort = get_target("onnxruntime", threads=1)
    return {
        "dense": ort.build(bench_cnn(64), x, folder / "dense.onnx").path,
        "pruned": ort.build(bench_cnn(16), x, folder / "pruned.onnx").path,
        "torch": get_target("torch").build(bench_cnn(16), x, folder / "pruned.pt2").path,
    }


def copy_artifact(source: Path, folder: Path, name: str = "model.onnx") -> Path:
    """A copy of artifact ``source`` in ``folder`` under ``name``, its manifest pinning the copy."""
    copy = folder / name
    copy.write_bytes(source.read_bytes())
    manifest = json.loads(Path(str(source) + ".spruce.json").read_text())
    manifest["file"] = name
    if "files" in manifest:  # a copy under a new name, pinned (manifests of a5751ab pin nothing)
        manifest["files"] = {name: manifest["files"].pop(source.name)}
    Path(str(copy) + ".spruce.json").write_text(json.dumps(manifest))
    return copy


# --- tests of the low floors stay on their floors -------------------------------------------------

FLOOR_TEST_FOLDERS = ("passes", "targets", "runtime", "capture")  # tests/<folder>
HIGH_PACKAGES = ("spruce.api", "spruce.compiler", "spruce.cli")  # what those tests never load


def is_high(module: str) -> bool:
    """Whether ``module`` is (under) spruce.api, spruce.compiler or spruce.cli."""
    return any(module == package or module.startswith(package + ".") for package in HIGH_PACKAGES)


def high_modules_after(test_files, loaded_modules, tests_root: Path) -> list[str]:
    """The spruce.api / compiler / cli modules among ``loaded_modules`` when every file of
    ``test_files`` lies in a floor test folder (tests/passes, targets, runtime, capture), else []."""
    folders = set()
    for path in test_files:
        try:
            folders.add(Path(path).resolve().relative_to(tests_root.resolve()).parts[0])
        except ValueError:
            return []
    if not folders or not folders <= set(FLOOR_TEST_FOLDERS):
        return []
    return sorted(m for m in loaded_modules if is_high(m))



# --- shared set-ups of the tests of spruce.api (never used by the tests of lower floors) ------------

def assert_pt2_reloads_in_a_fresh_process(results: dict, folder: Path, tolerance: float = 1e-5) -> None:
    """Every captured part of each pruned model (``results``: name -> PruneResult) saved as ``.pt2``
    in ``folder``, reloaded in one fresh process, matches its part within ``tolerance``."""
    from spruce.api import deploy

    programs = []
    for name, result in results.items():
        for part in deploy.parts(result.model, result.analysis.captured):
            programs.append((deploy.save_pt2(part, folder / f"{name}.{part.name}.pt2"), part))
    errors = deploy.check_pt2_in_fresh_process(programs)
    assert len(errors) == len(programs) and max(errors) <= tolerance, errors


def assert_every_parameter_placed(model: nn.Module, groups) -> None:
    """Every parameter of ``model`` is a member of some channel group of ``groups``, and each
    group it is in is prunable or says why not (issue 28's walk over ``named_parameters()``)."""
    placed: dict[str, list] = {}
    for group in groups:
        for member in group.members:
            placed.setdefault(member.name, []).append(group)
    for name, _ in model.named_parameters():
        assert placed.get(name), f"{name} is in no group"
        assert all(g.prunable or g.reason for g in placed[name]), name
