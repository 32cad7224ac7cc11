"""DDP: 2 CPU processes (gloo) train a small CNN on sklearn digits with ``iee`` and ``rigl``.

Masks must be equal on both ranks after every step (so at every update), and equal to a
single process that trains on the whole global batch. Models run in float64 so the
DDP gradient average (two half-batch means) and the single-process full-batch mean agree
to ~1e-15: masks are then compared exactly, weights with a 1e-9 tolerance. Each rank
initialises its model from a different seed: ``sparsify`` itself must make rank 0's
weights, masks and method state everyone's. DDP runs with ``broadcast_buffers=False``, so
DDP's own buffer broadcast (which includes the packed mask buffers) cannot hide a
disagreement: spruce's synchronisation alone has to keep the ranks equal.

The file is also the worker script: ``python test_ddp.py RANK WORLD INIT_FILE OUT_DIR``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

METHODS = {"iee": {"h": 3, "j": 2, "q": 2}, "rigl": {"delta_t": 3}}
STEPS = 24
GLOBAL_BATCH = 32


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float64).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10)).double()


def train(method: str, rank: int, world: int, seed: int) -> dict:
    """Train ``method`` for STEPS steps on this rank's share of each global batch; returns
    the masks after every step, the final weights and the final method state."""
    from spruce.capture.trace import capture
    from spruce.passes.sparsity.model import sparsify_captured

    x, y = digits()
    sm = sparsify_captured(capture(cnn(seed), (x[:2],)), method=method, sparsity=0.8, total_steps=STEPS,
                           **METHODS[method])
    model = sm
    if world > 1:
        model = nn.parallel.DistributedDataParallel(sm, broadcast_buffers=False)
    opt = torch.optim.SGD(sm.parameters(), lr=0.1, momentum=0.9)
    sm.attach(opt)
    sm.train()
    share = GLOBAL_BATCH // world
    masks = []
    for step in range(STEPS):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[:GLOBAL_BATCH]
        mine = order[rank * share:(rank + 1) * share]
        loss = nn.functional.cross_entropy(model(x[mine]), y[mine])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        masks.append([layer.masked.mask.clone() for layer in sm.layers])
    return {"masks": masks, "weights": [layer.module.weight.detach().clone() for layer in sm.layers],
            "state": sm.method.state_dict(), "metrics": sm.metrics}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for method in METHODS:
            torch.save(train(method, rank, world, seed=rank), Path(out_dir) / f"{method}-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def assert_same(a, b, where: str, exact: bool = True) -> None:
    if isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b), where
        else:
            assert torch.allclose(a, b, rtol=0, atol=1e-9), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}", exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, z) in enumerate(zip(a, b)):
            assert_same(x, z, f"{where}[{i}]", exact)
    else:
        assert a == b, where


def test_ddp_masks_agree_across_ranks_and_with_one_process(tmp_path):
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), "2", str(tmp_path / "rendezvous"), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    single = {method: train(method, rank=0, world=1, seed=0) for method in METHODS}
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output[-3000:]
    for method in METHODS:
        ranks = [torch.load(tmp_path / f"{method}-rank{r}.pt", weights_only=False) for r in range(2)]
        reference = single[method]
        changes = 0
        for step in range(STEPS):
            for layer, (m0, m1, ref) in enumerate(zip(ranks[0]["masks"][step], ranks[1]["masks"][step],
                                                      reference["masks"][step])):
                assert torch.equal(m0, m1), f"{method}: masks differ across ranks after step {step + 1}, layer {layer}"
                assert torch.equal(m0, ref), f"{method}: DDP mask != single-process mask after step {step + 1}"
            if step and any(not torch.equal(a, b) for a, b in zip(reference["masks"][step],
                                                                     reference["masks"][step - 1])):
                changes += 1
        assert changes >= 3, f"{method}: too few mask updates ({changes}) to test anything"
        assert_same(ranks[0]["state"], ranks[1]["state"], f"{method} state")  # rank-independent method state
        assert_same(ranks[0]["metrics"], ranks[1]["metrics"], f"{method} metrics")
        for w0, w1, ref in zip(ranks[0]["weights"], ranks[1]["weights"], reference["weights"]):
            assert torch.equal(w0, w1)
            assert_same(w0, ref, f"{method} weights", exact=False)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
