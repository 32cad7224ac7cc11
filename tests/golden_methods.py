"""Golden runs of every sparse-training method and of a shortened ``spruce compile``.

Recorded once from commit a5751ab (before the issue-10 redesign) with
``python tests/golden_methods.py tests/data/golden_a5751ab.json``; compared by
``tests/compiler/test_golden.py``. Only the public API is used (``spruce.sparsify``
with a method name and keyword options, ``spruce.compile``), so the same code runs on
both sides of the redesign.

Each method case trains a tiny seeded model for a few steps on seeded random batches
(one intra-op thread) and records, bitwise: a digest of every mask after every step,
each layer's final mask and weight digests, and ``sm.metrics`` (floats round-trip
exactly through JSON). Each compile case records ``report.json`` without its timings.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

STEPS = 24


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8),
    )


# name -> (sparsify keyword arguments, optimizer steps)
CASES: dict[str, dict] = {
    "static_random_erk": dict(method="static", sparsity=0.8, distribution="erk"),
    "static_magnitude_global": dict(method="static", sparsity=0.7, distribution="global", init="magnitude"),
    "static_channel": dict(method="static", structure="channel", sparsity=0.5, distribution="uniform",
                           init="magnitude"),
    "gmp_uniform": dict(method="gmp", sparsity=0.8, distribution="uniform", delta_t=4, total_steps=STEPS),
    "gmp_global": dict(method="gmp", sparsity=0.8, distribution="global", delta_t=4, total_steps=STEPS),
    "gmp_channel": dict(method="gmp", structure="channel", sparsity=0.5, distribution="uniform", delta_t=4,
                        total_steps=STEPS),
    "set_erk": dict(method="set", sparsity=0.8, distribution="erk", delta_t=4, total_steps=STEPS),
    "rigl_erk": dict(method="rigl", sparsity=0.8, distribution="erk", delta_t=4, total_steps=STEPS),
    "rigl_constant": dict(method="rigl", sparsity=0.7, distribution="uniform", delta_t=3, decay="constant",
                          total_steps=STEPS),
    # since issue 15 IEE's Reactivate & Explore freezes the whole active structure, channel IEE's
    # cycles end at 5/130 of training and its grow fills back to Psi; freeze="weights" (and
    # end_fraction=0.75, grow="omega" for channels) is the rule of a5751ab, which must reproduce it bitwise
    "iee_unstructured": dict(method="iee", sparsity=0.8, distribution="erk", h=3, j=2, q=2, total_steps=STEPS,
                             freeze="weights"),
    "iee_2_4": dict(method="iee", structure="2:4", h=3, j=2, q=2, total_steps=STEPS, freeze="weights"),
    "iee_channel_flops": dict(method="iee", structure="channel", budget={"flops": 0.5}, h=3, j=2, q=2,
                              total_steps=STEPS, freeze="weights", end_fraction=0.75, grow="omega"),
    "iee_channel_params_random": dict(method="iee", structure="channel", budget={"params": 0.6}, h=3, j=2, q=2,
                                      init="random", round_to=2, total_steps=STEPS, freeze="weights",
                                      end_fraction=0.75, grow="omega"),
    "halp_flops": dict(method="halp", structure="channel", budget={"flops": 0.5}, interval=3, total_steps=STEPS),
    "halp_params_linear": dict(method="halp", structure="channel", budget={"params": 0.6}, interval=4,
                               schedule="linear", round_to=2, total_steps=STEPS),
    # c = 1e-3 was the default at a5751ab; since issue 15 it selects the paper's absolute c (the default
    # c is relative to the gradients), which must reproduce a5751ab bitwise
    "dst_ee": dict(method="dst_ee", sparsity=0.8, distribution="erk", delta_t=4, c=1e-3, total_steps=STEPS),
    "feather_global": dict(method="feather", sparsity=0.8, distribution="global", total_steps=STEPS,
                           record_every=4),
    "feather_uniform_delta": dict(method="feather", sparsity=0.96, distribution="uniform", delta_t=3,
                                  total_steps=STEPS, record_every=2),
    "feather_2_4": dict(method="feather", structure="2:4", total_steps=STEPS, record_every=4),
    # since issue 15 OptG's default schedule is scaled to the run and ties go by magnitude;
    # schedule="paper", ties="random" is the rule of a5751ab, which must reproduce it bitwise
    "optg_global": dict(method="optg", sparsity=0.8, distribution="global", steps_per_epoch=6, total_steps=STEPS,
                        schedule="paper", ties="random"),
    "optg_erk": dict(method="optg", sparsity=0.8, distribution="erk", steps_per_epoch=8, alpha=1.0,
                     total_steps=STEPS, schedule="paper", ties="random"),
}


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:24]


def run_case(name: str) -> dict:
    """Train case ``name`` and return its record."""
    import spruce

    torch.set_num_threads(1)
    options = dict(CASES[name])
    model = _cnn()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sm = spruce.sparsify(model, x, **options)
    gen = torch.Generator().manual_seed(2)
    opt = torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sm.attach(opt)
    steps = []
    for _ in range(STEPS):
        inputs = torch.randn(4, 4, 8, 8, generator=gen)
        labels = torch.randint(0, 8, (4,), generator=gen)
        loss = nn.functional.cross_entropy(sm(inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        steps.append(_digest(torch.cat([layer.masked.mask.reshape(-1) for layer in sm.layers])))
    return {
        "step_masks": steps,
        "masks": {layer.name: [_digest(layer.masked.mask), int(layer.masked.mask.sum())] for layer in sm.layers},
        "weights": {layer.name: _digest(layer.module.weight) for layer in sm.layers},
        "metrics": json.loads(json.dumps(sm.metrics)),
    }


# Shortened compiles of the embedded digits CNN: the default (structured IEE) but with a FLOPs
# budget (a latency budget would make the selection depend on this machine's timings), and
# unstructured RigL (the fold path).
_SHORT = dict(bench_iters=2, bench_warmup=1, bench_batch_sizes=(1,))
COMPILES: dict[str, dict] = {
    # the default method (structured IEE) with the rules of a5751ab (see CASES)
    "default_flops": dict(epochs=2, budget={"flops": 0.5}, method={"name": "iee", "freeze": "weights",
                                                                   "end_fraction": 0.75, "grow": "omega"},
                          **_SHORT),
    "rigl_unstructured": dict(epochs=1, method="rigl", structure="unstructured", sparsity=0.8, distribution="erk",
                              **_SHORT),
}
# report.json fields that are timings or depend on the machine
VOLATILE = ("timings", "wall_s", "bench")


def run_compile(name: str) -> dict:
    """Compile case ``name``'s report.json without its timings."""
    import spruce

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        report = spruce.compile(out=Path(folder) / "out", quiet=True, **COMPILES[name])
        document = json.loads((Path(folder) / "out" / "report.json").read_text())
    assert report.document["format"] == "spruce-compile-report"
    return {k: v for k, v in document.items() if k not in VOLATILE}


# The method options ``compile`` derived from a run length at a5751ab (its private
# ``pipeline._method_options``): the redesign moves this into each method's config. Options that
# select a method's rule of a5751ab where issue 15 changed the default: see OLD_RULES.
SCALED = [(method, structure, steps) for method in ("static", "gmp", "set", "rigl", "iee", "dst_ee", "feather",
                                                     "optg", "halp")
          for structure in ("channel", "unstructured") for steps in (1, 11, 12, 100, 239, 5000)]


OLD_RULES: dict[tuple[str, str], dict] = {("iee", "channel"): {"end_fraction": 0.75},
                                          # issue 30: GMP's delta_t is scaled to the run (a5751ab kept 100)
                                          ("gmp", "channel"): {"delta_t": 100},
                                          ("gmp", "unstructured"): {"delta_t": 100}}


def old_scaled_defaults() -> list:
    from spruce.compiler.pipeline import _method_options
    from spruce.compiler.recipes import Recipe

    return [[method, structure, steps, _method_options(Recipe(method=method, structure=structure), steps)]
            for method, structure, steps in SCALED]


# Format-1 checkpoints written at a5751ab (``tests/data/checkpoint_v1_{name}.pt``) and what
# resuming them for 8 more steps gave there (``tests/data/checkpoint_v1_resumed.json``).
CHECKPOINTS = {"rigl": dict(method="rigl", sparsity=0.8, distribution="erk", delta_t=4, total_steps=STEPS),
               "iee": dict(method="iee", sparsity=0.8, h=3, j=2, q=2, total_steps=STEPS)}


def _batches(seed: int, count: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(4, 4, 8, 8, generator=gen), torch.randint(0, 8, (4,), generator=gen)


def write_checkpoint(name: str, path: str) -> None:
    import spruce

    torch.set_num_threads(1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sm = spruce.sparsify(_cnn(), x, **CHECKPOINTS[name])
    opt = torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9)
    sm.attach(opt)
    for inputs, labels in _batches(2, 10):
        loss = nn.functional.cross_entropy(sm(inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
    spruce.save(sm, path, optimizer=opt, extra={"epoch": 3})


def resume_checkpoint(path: str) -> dict:
    """Load a checkpoint into a fresh model and train 8 more steps: masks, weights, steps."""
    import spruce

    torch.set_num_threads(1)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sm = spruce.load(path, model, optimizer=opt)
    for inputs, labels in _batches(3, 8):
        loss = nn.functional.cross_entropy(sm(inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
    return {"masks": {layer.name: _digest(layer.masked.mask) for layer in sm.layers},
            "weights": {layer.name: _digest(layer.module.weight) for layer in sm.layers},
            "step_count": sm.step_count, "extra": sm.checkpoint_extra}


def kernel_canary() -> str:
    """A digest of how this machine's CPU kernels round: the golden CNN trained 3 dense SGD steps
    (one thread) on the golden batches. Equal digests mean the method cases' weights can be
    compared bitwise with a record made on that machine; masks and metrics do not depend on it."""
    torch.set_num_threads(1)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for inputs, labels in _batches(2, 3):
        loss = nn.functional.cross_entropy(model(inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _digest(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def main(path: str) -> None:
    record = {"commit": "a5751ab", "steps": STEPS, "cases": {name: run_case(name) for name in CASES},
              "compile": {name: run_compile(name) for name in COMPILES}, "scaled_defaults": old_scaled_defaults()}
    Path(path).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
