"""Resume across processes: k steps, save, load in a fresh process, k more == 2k steps."""

import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn as nn
    import spruce

    method, steps, load, save = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 8))
    options = {"iee": {"h": 3, "j": 2, "q": 2},
               "feather": {"delta_t": 2, "record_every": 4}}.get(method, {"delta_t": 4})
    sm = spruce.sparsify(model, torch.randn(2, 4, 8, 8), method=method, sparsity=0.9, total_steps=48, **options)
    opt = torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(7)
    if load != "-":
        ckpt = torch.load(load, weights_only=False)
        sm.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
    sm.attach(opt)
    sm.train()
    for _ in range(steps):
        x = torch.randn(4, 4, 8, 8, generator=gen)
        y = torch.randint(0, 8, (4,), generator=gen)
        loss = nn.functional.cross_entropy(sm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
    torch.save({"model": sm.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()}, save)
    """
)


def run(tmp_path, *args):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("method", ["iee", "dst_ee", "feather"])
def test_resume_in_a_fresh_process_equals_uninterrupted(tmp_path, method):
    run(tmp_path, method, 24, "-", tmp_path / "half.pt")
    run(tmp_path, method, 24, tmp_path / "half.pt", tmp_path / "resumed.pt")
    run(tmp_path, method, 48, "-", tmp_path / "whole.pt")
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)["model"]
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)["model"]
    assert resumed.keys() == whole.keys()
    masks = [k for k in whole if k.endswith(".mask")]
    assert masks
    for key, value in whole.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed[key]), key
    assert resumed["_extra_state"]["metrics"] == whole["_extra_state"]["metrics"]
    assert len(whole["_extra_state"]["metrics"]) >= 3
