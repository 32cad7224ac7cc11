"""torch target: eager and torch.compile artifacts at several batch sizes; the 2:4 semi-structured plan."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import sparsify
from spruce.targets.base import ArtifactError, read_artifact
from spruce.targets.pytorch import (
    TorchTarget,
    has_2_4_pattern,
    semi_structured_constraints,
    semi_structured_plan,
)
from torch import nn


def mlp(widths: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.mark.parametrize("compile", [False, True])
def test_cpu_artifact_runs_at_batch_1_and_8(compile: bool, tmp_path: Path) -> None:
    model = mlp((12, 24, 5))
    target = TorchTarget(compile=compile)
    artifact = target.build(model, (torch.randn(1, 12),), tmp_path / "m.pt2")
    assert read_artifact(artifact.path, "torch").info == {"device": "cpu", "dtype": "float32", "compile": compile,
                                                          "semi_structured": False}
    runner = target.load(artifact)
    for batch in (1, 8):
        x = torch.randn(batch, 12)
        torch.testing.assert_close(runner([x]), model(x), rtol=1e-5, atol=1e-5)


def test_semi_structured_plan_converts_2_4_layers_whose_shapes_fit() -> None:
    rows, cols = semi_structured_constraints(torch.float16)
    assert rows >= 1 and cols >= 4
    wide, odd = 4 * max(rows, cols), 4 * max(rows, cols) + 4  # odd: a multiple of 4 but not of the constraint
    model = mlp((wide, wide, odd, 10))
    x = torch.randn(2, wide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparsify names the layers it keeps dense
        folded = sparsify(model, x, structure="2:4").fold()
    plan = {d.name: d for d in semi_structured_plan(folded, torch.float16)}
    linears = {name: m for name, m in folded.named_modules() if isinstance(m, nn.Linear)}
    assert plan.keys() == linears.keys()
    for name, decision in plan.items():
        weight = linears[name].weight
        fits = weight.shape[0] % rows == 0 and weight.shape[1] % cols == 0
        assert decision.convert == (has_2_4_pattern(weight) and fits), decision
        assert decision.shape == tuple(weight.shape)
    first, second, head = plan.values()
    assert first.convert and first.reason == "2:4"
    assert not second.convert and "not a multiple" in second.reason  # odd output width
    dense = semi_structured_plan(mlp((wide, wide, odd, 10)), torch.bfloat16)
    assert not any(d.convert for d in dense) and all("2:4 pattern" in d.reason for d in dense)


def test_has_2_4_pattern_counts_groups_of_input_channels() -> None:
    weight = torch.zeros(2, 8)
    weight[:, [0, 3, 5, 6]] = 1.0
    assert has_2_4_pattern(weight)
    weight[1, 1] = 1.0
    assert not has_2_4_pattern(weight)
    assert not has_2_4_pattern(torch.zeros(2, 6))  # input width not a multiple of 4


def test_bad_options_and_semi_structured_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="semi_structured=True needs device='cuda'"):
        TorchTarget(semi_structured=True)
    with pytest.raises(ValueError, match="dtype"):
        TorchTarget(dtype="float64")
    assert not TorchTarget(device="cuda", dtype="float32").semi_structured
    assert TorchTarget(device="cuda", dtype="float16").semi_structured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need a CUDA GPU")
def test_cuda_fp16_artifact_converts_planned_layers(tmp_path: Path) -> None:  # pragma: no cover - GPU only
    model = mlp((256, 512, 256, 10))
    x = torch.randn(1, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = sparsify(model, x, structure="2:4").fold()
    target = TorchTarget(device="cuda", dtype="float16")
    artifact = target.build(folded, (x,), tmp_path / "m.pt2")
    assert artifact.info["semi_structured"] and artifact.info["converted"] == ["0", "2"]
    assert "4" in artifact.info["skipped"]
    runner = target.load(artifact)
    xb = torch.randn(8, 256)
    expected = folded.cuda().half()(xb.cuda().half())
    torch.testing.assert_close(runner([xb.cuda().half()]), expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(ArtifactError, match="need device 'cuda' and float16"):
        TorchTarget(device="cuda", dtype="float32").load(artifact)
