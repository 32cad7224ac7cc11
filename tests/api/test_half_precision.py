"""fp16 and bf16 models through masks, training steps, fold/compact and one-shot prune (CPU)."""

from __future__ import annotations

import pytest
import spruce
import torch
from helpers import randomize, relative_error
from torch import nn

DTYPES = [torch.float16, torch.bfloat16]
# (method, structure, options); structure="channel" runs with a uniform distribution
RUNS = [
    ("static", "unstructured", {}),
    ("rigl", "unstructured", {"delta_t": 2}),
    ("dst_ee", "unstructured", {"delta_t": 2}),
    ("iee", "unstructured", {"h": 1, "j": 1, "q": 1}),
    ("gmp", "unstructured", {"delta_t": 2}),
    ("feather", "unstructured", {}),
    ("optg", "unstructured", {"steps_per_epoch": 3}),
    ("static", "2:4", {}),
    ("iee", "2:4", {"h": 1, "j": 1, "q": 1}),
    ("static", "channel", {}),
    ("gmp", "channel", {"delta_t": 2}),
    ("halp", "channel", {"interval": 2, "budget": {"flops": 0.6}}),
    ("iee", "channel", {"h": 1, "j": 1, "q": 1, "budget": {"params": 0.6}}),
]
STEPS = 6
# half precision rounds differently once channels are physically gone (shorter sums)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def decoder(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    return randomize(model).to(dtype)


def inputs(dtype: torch.dtype, seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("run", RUNS, ids=lambda r: f"{r[0]}-{r[1]}")
def test_half_precision_sparse_training_and_export(dtype, run):
    method, structure, options = run
    extra = {"distribution": "uniform"} if structure == "channel" else {}
    sm = spruce.sparsify(decoder(dtype), inputs(dtype, 0), method=method, structure=structure, sparsity=0.5,
                         total_steps=STEPS, **extra, **options)
    assert [layer.name for layer in sm.layers] == ["0", "3", "5", "8"]
    targets = [int(layer.masked.mask.sum()) for layer in sm.layers]
    opt = torch.optim.SGD(sm.parameters(), lr=0.01, momentum=0.9)
    sm.attach(opt)
    sm.train()
    for step in range(STEPS):
        loss = sm(inputs(dtype, step + 1, batch=4)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
        for layer in sm.layers:
            weight = layer.module.weight
            assert weight.dtype == dtype and torch.isfinite(weight).all(), layer.name
            if not sm.method.keeps_pruned_weights:
                assert torch.all(weight[~layer.masked.mask] == 0), f"pruned weights of {layer.name} moved"
        if method in ("static", "rigl", "dst_ee") and structure != "channel":
            assert [int(layer.masked.mask.sum()) for layer in sm.layers] == targets
    sm.eval()
    exported = [("fold", sm.fold().eval())]
    if structure == "channel":
        exported.append(("compact", sm.compact().eval()))
    x = inputs(dtype, 99, batch=3)
    with torch.no_grad():
        reference = sm(x)
        assert reference.dtype == dtype
        for what, model in exported:
            out = model(x)
            assert out.dtype == dtype
            assert all(p.dtype == dtype for p in model.parameters())
            err = relative_error(reference.float(), out.float())
            assert err < TOLERANCE[dtype], f"{what}() differs from the SparseModel by {err:.2e} in {dtype}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_precision_prune(dtype):
    model = decoder(dtype).eval()
    x = inputs(dtype, 0)
    result = spruce.prune(model, x, ratio=0.5)
    assert result.kept and all(p.dtype == dtype for p in result.model.parameters())
    with torch.no_grad():
        err = relative_error(result.masked(x).float(), result.model(x).float())
    assert err < TOLERANCE[dtype]
