"""``spruce.compile(..., precision="int8")`` end to end on a small CNN and the real digits (one
compile, real ONNX Runtime sessions): the compiled artifact is INT8, quantized after channel
removal and calibrated on 128 recovery samples; the dense reference stays fp32; the dense
model at INT8 is built and timed beside them; the report holds fidelity and same-run latency
of the three and judges the floor on the INT8 artifact as ONNX Runtime runs it."""

from __future__ import annotations

import json

import pytest
import spruce
import torch
from spruce.compiler.recipes import Recipe
from spruce.targets.base import read_artifact
from spruce.targets.quantize import MIN_CALIBRATION_SAMPLES, integer_mac_share
from torch import nn


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "out"
    report = spruce.compile(_cnn(), torch.zeros(1, 1, 32, 32), data="digits", out=out, precision="int8",
                            budget={"flops": 0.5}, recover="none", floor="none", bench_batch_sizes=(1,),
                            bench_warmup=1, bench_iters=5, target_options={"threads": 1}, quiet=True)
    return report, out


def test_the_compiled_artifact_is_int8_after_channel_removal_and_dense_stays_fp32(compiled):
    report, out = compiled
    shipped = read_artifact(out / "model.onnx", "onnxruntime").info
    assert shipped["precision"] == "int8"
    assert shipped["quantization"]["calibration_samples"] == MIN_CALIBRATION_SAMPLES
    assert integer_mac_share(out / "model.onnx", [torch.zeros(1, 1, 32, 32).numpy()]).integer_share >= 0.9
    assert read_artifact(out / "dense.onnx").info["precision"] == "fp32"
    assert read_artifact(out / "dense.int8.onnx").info["precision"] == "int8"
    # channels were removed before quantizing: the INT8 file has the compact widths
    assert report.document["compiled"]["macs"] < report.document["dense"]["macs"]


def test_the_report_compares_dense_fp32_dense_int8_and_compiled_int8(compiled):
    report, _ = compiled
    precision = report.document["precision"]
    assert [row["model"] for row in precision["rows"]] == ["dense fp32", "dense int8", "compiled int8"]
    for row in precision["rows"][1:]:
        measures = row["fidelity"]["per_output"]["output"]
        assert 0.0 <= measures["top1_agreement"] <= 1.0 and row["accuracy"] is not None
        assert row["latency"]["1"]["robust_ms"] > 0
    # quantization alone keeps the (untrained) model's decisions; pruning half its MACs one-shot does not
    assert precision["rows"][1]["fidelity"]["per_output"]["output"]["top1_agreement"] >= 0.9
    assert precision["rows"][0]["latency"]["1"]["robust_ms"] > 0
    assert precision["fake_quant_recovery"] is None and precision["kept_fp32"] == []
    text = report.format_table()
    assert "compiled int8" in text and "dense int8" in text and "Layers kept fp32 by the sensitivity rule: none" in text


def test_the_int8_artifact_is_evaluated_as_it_runs_not_as_the_torch_model(compiled):
    report, _ = compiled
    rows = report.document["precision"]["rows"]
    int8 = rows[2]["fidelity"]["per_output"]["output"]
    torch_model = rows[2]["torch_model_fidelity"]["per_output"]["output"]
    assert int8["relative_l2"] != torch_model["relative_l2"]  # quantization moved the outputs


def _wider_cnn() -> nn.Module:
    """Wide enough for INT8 to pay on ONNX Runtime (the 16/32-channel CNN above measures about as
    fast in INT8 as in fp32), so that a latency budget of 0.5 of dense fp32 is reachable."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def test_channels_chosen_on_the_fp32_table_then_quantized_meet_the_budget_as_int8_measures(tmp_path):
    """The control of choosing channels for the precision that ships: ``selection_precision: fp32``
    profiles the latency table in fp32 (the knapsack sees fp32 layer costs) while the budget loop
    times every selection as the INT8 artifact against dense fp32 and re-aims until that is in band,
    and the shipped artifact is INT8. Without the option the table is the INT8 one."""
    out = tmp_path / "out"
    report = spruce.compile(_wider_cnn(), torch.zeros(1, 1, 32, 32), data="digits", out=out, precision="int8",
                            selection_precision="fp32", budget={"latency": 0.5}, recover="none", floor="none",
                            bench_batch_sizes=(1,), bench_warmup=1, bench_iters=5, target_options={"threads": 1},
                            quiet=True)
    table = json.loads((out / "latency_table.json").read_text())
    assert table["fingerprint"]["precision"] == "fp32"
    budget = report.document["budget"]
    assert (budget["table_precision"], budget["timed_precision"], budget["dense_precision"]) == ("fp32", "int8",
                                                                                                   "fp32")
    assert budget["attempts"] and all(a["measured_ms"] > 0 for a in budget["attempts"])
    assert read_artifact(out / "model.onnx", "onnxruntime").info["precision"] == "int8"
    assert "Latency table (`latency_table.json` at fp32)" in (out / "report.md").read_text()
    # the default: the table at the shipped precision, its fp32 control on the dense reference's target
    setup_recipe = Recipe(precision="int8", budget={"latency": 0.5})
    assert setup_recipe.table_precision == "int8"
    assert Recipe(precision="int8", selection_precision="fp32", budget={"latency": 0.5}).table_precision == "fp32"
