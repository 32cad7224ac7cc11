"""The fidelity floor fails a compile that broke its model (#27): a small CTC recogniser (a
conv + linear head over a sequence, time-major (T, N, C) scores, fixed seeded weights) pruned
far past what it tolerates, compiled one-shot on real ONNX Runtime sessions. The budget is
met, the greedy decodes are not: the compile raises, with its artifacts kept and marked."""

from __future__ import annotations

import json

import pytest
import spruce
import torch
from spruce.compiler.floors import FidelityFloorError
from torch import nn

FEATURES, STEPS, CLASSES = 8, 24, 6


class Recogniser(nn.Module):
    """(N, FEATURES, STEPS) -> time-major CTC scores (STEPS, N, CLASSES), class 0 the blank."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(FEATURES, 64, 3, padding=1), nn.ReLU(),
                                      nn.Conv1d(64, 64, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).permute(2, 0, 1))


def _sequences(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, FEATURES, STEPS, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    torch.manual_seed(0)
    model = Recogniser().eval()
    out = tmp_path_factory.mktemp("floor") / "out"
    with pytest.raises(FidelityFloorError) as failure:
        spruce.compile(model, _sequences(1, 9)[0][:1], data=(_sequences(2, 1), _sequences(3, 2)), out=out,
                       budget={"params": 0.15}, recover="none", min_keep=0.0, outputs={"output": {"kind": "ctc"}},
                       bench_batch_sizes=(1,), bench_warmup=1, bench_iters=3, quiet=True)
    return failure.value, out


def test_a_compile_that_breaks_its_ctc_model_fails_its_floor(broken):
    error, out = broken
    assert str(error).startswith("fidelity floor missed: output sequence_agreement") and "\n" not in str(error)
    document = json.loads((out / "report.json").read_text())
    assert document == error.report.document | {"plots": document["plots"]}
    (output,) = document["evaluation"]["outputs"]
    assert (output["kind"], output["kind_from"], output["distill_loss"], output["batch_dim"]) == \
        ("ctc", "declared", "kl", 1)
    assert document["budget"]["ratio"] <= 0.15  # the budget was met: only the floor failed
    floor = document["floor"]
    assert not floor["met"] and floor["source"] == "default per output kind"
    (check,) = floor["checks"]
    assert check["measure"] == "sequence_agreement" and check["actual"] < 0.9
    fidelity = document["evaluation"]["fidelity"]["per_output"]["output"]
    assert 0 <= fidelity["sequence_agreement"] < 0.9 and fidelity["cer"] > 0 and -1 <= fidelity["cosine"] <= 1
    assert (out / "report.md").read_text().splitlines()[0].startswith("**FAILED: fidelity floor missed")
    manifest = json.loads((out / f"{document['compiled']['artifact']}.spruce.json").read_text())
    assert manifest["fidelity_floor"]["met"] is False
    assert (out / document["compiled"]["artifact"]).stat().st_size > 0  # the artifacts stay


def test_without_a_floor_the_same_compile_succeeds(broken, tmp_path):
    torch.manual_seed(0)
    model = Recogniser().eval()
    report = spruce.compile(model, _sequences(1, 9)[0][:1], data=(_sequences(2, 1), _sequences(3, 2)),
                            out=tmp_path / "out", budget={"params": 0.15}, recover="none", min_keep=0.0,
                            outputs={"output": {"kind": "ctc"}}, floor="none", bench_batch_sizes=(1,),
                            bench_warmup=1, bench_iters=3, quiet=True)
    assert report.document["floor"] == {"met": True, "source": "recipe", "checks": [], "missed": []}
    assert report.document["model"] == "live Recogniser"  # not the embedded default's name
    assert "Model: live Recogniser on " in (tmp_path / "out" / "report.md").read_text()
