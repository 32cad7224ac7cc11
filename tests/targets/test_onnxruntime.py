"""ONNX export and ONNX Runtime checks on real models and real sessions."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from spruce.targets import onnxruntime as ort_target
from spruce.targets.onnxruntime import OnnxExportError, OnnxRuntimeCPU, check_onnx, export_onnx, run_onnx
from torch import nn


class TwoHeads(nn.Module):
    """Two outputs, one of them large, to exercise multi-output and relative checks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.small = nn.Linear(8, 4)
        self.large = nn.Linear(8, 2)
        with torch.no_grad():
            self.large.weight.mul_(1e4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.body(x).mean(dim=(2, 3))
        return self.small(pooled), self.large(pooled)


class Unexportable(nn.Module):
    """A forward pass that always fails, so every exporter fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model cannot run")


@pytest.fixture(scope="module")
def resnet18_64() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = torchvision.models.resnet18(weights=None).eval()
    return model, (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)


def test_resnet18_exports_and_matches_torch(resnet18_64, tmp_path: Path) -> None:
    model, inputs = resnet18_64
    path = export_onnx(model, inputs, tmp_path / "resnet18.onnx")
    assert path == tmp_path / "resnet18.onnx"
    onnx.checker.check_model(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18.onnx"]
    (logits,) = run_onnx(path, inputs)
    assert logits.shape == (1, 1000)
    assert check_onnx(path, model, inputs) < 1e-4


def test_fx_graph_module_exports(resnet18_64, tmp_path: Path) -> None:
    model, inputs = resnet18_64
    graph_module = torch.fx.symbolic_trace(model)
    path = export_onnx(graph_module, inputs, tmp_path / "gm.onnx")
    assert check_onnx(path, graph_module, inputs) < 1e-4


def test_check_detects_a_model_that_changed(tmp_path: Path) -> None:
    model = TwoHeads().eval()
    inputs = (torch.randn(2, 3, 16, 16),)
    path = export_onnx(model, inputs, tmp_path / "heads.onnx")
    assert check_onnx(path, model, inputs) < 1e-5
    with torch.no_grad():
        model.small.bias.add_(1.0)
    assert check_onnx(path, model, inputs) >= 0.5


def test_relative_error_uses_output_scale() -> None:
    expected = np.array([1000.0, -2000.0])
    assert ort_target._relative_error(expected, expected + 1.0) == pytest.approx(1.0 / 2000.0)
    small = np.array([0.1, 0.2])
    assert ort_target._relative_error(small, small + 0.01) == pytest.approx(0.01)


def test_failed_export_leaves_nothing_and_keeps_old_file(tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match="(?s)torchscript.*dynamo"):
        export_onnx(Unexportable(), (torch.zeros(1, 3),), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "kept.onnx").write_bytes(b"previous")
    with pytest.raises(OnnxExportError):
        export_onnx(Unexportable(), (torch.zeros(1, 3),), tmp_path / "kept.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["kept.onnx"]
    assert (tmp_path / "kept.onnx").read_bytes() == b"previous"


def test_falls_back_to_dynamo_exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def torchscript_unavailable(*args: object) -> None:
        raise RuntimeError("torchscript exporter refused")

    monkeypatch.setattr(ort_target, "_export_torchscript", torchscript_unavailable)
    model = TwoHeads().eval()
    inputs = (torch.randn(1, 3, 16, 16),)
    path = export_onnx(model, inputs, tmp_path / "dynamo.onnx")
    assert check_onnx(path, model, inputs) < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["dynamo.onnx"]


def test_run_onnx_rejects_wrong_input_count(tmp_path: Path) -> None:
    model = TwoHeads().eval()
    inputs = (torch.randn(1, 3, 16, 16),)
    path = export_onnx(model, inputs, tmp_path / "heads.onnx")
    with pytest.raises(ValueError, match="takes 1 inputs, 2 were given"):
        run_onnx(path, [inputs[0], inputs[0]])


def test_target_builds_one_artifact_for_every_batch_size(resnet18_64, tmp_path: Path) -> None:
    model, inputs = resnet18_64
    target = ort_target.OnnxRuntimeCPU(threads=1, save_optimized=True)
    artifact = target.build(model, inputs, tmp_path / "r18.onnx")
    assert artifact.info["dynamic_batch"] and artifact.info["max_relative_error"] <= 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.onnx", "r18.onnx.spruce.json"]
    runner = target.load(artifact)
    batch8 = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(batch8).numpy()
    for batch in (inputs[0], batch8):
        (logits,) = runner([batch.numpy()])
        assert logits.shape == (batch.shape[0], 1000)
    np.testing.assert_allclose(runner([batch8.numpy()])[0], expected, rtol=1e-3, atol=1e-3)


def test_target_refuses_an_artifact_beyond_tolerance(tmp_path: Path) -> None:
    model = TwoHeads().eval()
    inputs = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    with pytest.raises(ValueError, match="tolerance"):
        ort_target.OnnxRuntimeCPU(tolerance=0)
    target = ort_target.OnnxRuntimeCPU(tolerance=1e-12)
    error = check_onnx(export_onnx(model, inputs, tmp_path / "probe.onnx"), model, inputs)
    if error <= 1e-12:
        pytest.skip("this build of ONNX Runtime reproduces torch exactly; no mismatch to provoke")
    with pytest.raises(ort_target.OnnxMismatchError, match="tolerance"):
        target.build(model, inputs, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["probe.onnx"]


def test_dynamo_exporter_makes_a_batch_of_one_dynamic(tmp_path: Path) -> None:
    model = TwoHeads().eval()
    inputs = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    path = tmp_path / "dyn.onnx"
    ort_target._export_dynamo(model, inputs, path, dynamic_batch=True)
    batch4 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    small, large = run_onnx(path, (batch4,))
    with torch.no_grad():
        expected_small, expected_large = model(batch4)
    np.testing.assert_allclose(small, expected_small.numpy(), rtol=1e-4, atol=1e-4)
    assert large.shape == (4, 2)


@pytest.mark.parametrize(("layer", "shape"), [
    (nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), (2, 8, 10, 10)),
    (nn.Conv2d(6, 6, 3, padding=(2, 1), dilation=2, groups=6, bias=False), (1, 6, 9, 7)),
    (nn.Conv1d(4, 8, 5), (3, 4, 20)),
    (nn.Conv3d(2, 4, 3, padding=(1, 0, 2)), (1, 2, 5, 6, 7)),
    (nn.Linear(8, 4), (2, 8)),
    (nn.Linear(8, 4, bias=False), (2, 5, 8)),
    (nn.Linear(8, 4), (2, 3, 5, 8)),
])
def test_timing_runner_of_a_lone_layer_computes_what_torch_does(layer, shape, tmp_path: Path) -> None:
    """Timing runs write a lone Conv/Linear layer's ONNX graph directly (no trace): it must do
    the layer's work, i.e. give torch's output, also at another batch size."""
    from spruce.targets.onnxruntime import layer_onnx

    torch.manual_seed(0)
    layer = layer.eval()
    x = torch.randn(shape)
    assert layer_onnx(layer, x) is not None
    runner, inputs = OnnxRuntimeCPU(threads=1).model_runner(layer, (x,), tmp_path / "layer")
    with torch.no_grad():
        np.testing.assert_allclose(runner(inputs)[0], layer(x).numpy(), rtol=1e-4, atol=1e-5)
        bigger = torch.randn((3, *shape[1:]))
        np.testing.assert_allclose(runner([bigger.numpy()])[0], layer(bigger).numpy(), rtol=1e-4, atol=1e-5)
    assert layer_onnx(nn.Conv2d(3, 3, 3, padding="same"), torch.randn(1, 3, 8, 8)) is None  # exported instead
    assert layer_onnx(nn.BatchNorm2d(3), torch.randn(1, 3, 8, 8)) is None


class Positions(nn.Module):
    """Adds each position's index along dim 1; ``frozen`` reads the length through ``int()``,
    which TorchScript tracing records as the example's constant."""

    def __init__(self, frozen: bool) -> None:
        super().__init__()
        self.frozen = frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = int(x.shape[1]) if self.frozen else x.shape[1]
        return x + torch.arange(length, dtype=x.dtype)[:, None]


def test_declared_dims_stay_dynamic_or_the_exporter_is_passed_over(tmp_path: Path) -> None:
    """A TorchScript file that froze a declared dim fails the doubled-size check and the
    torch.export-based exporter's file (of ``dynamo_model``) is kept; without the
    declaration the frozen file is kept, and ONNX Runtime refuses another length."""
    x = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    longer = torch.randn(3, 13, 4, generator=torch.Generator().manual_seed(1))
    seq = torch.export.Dim("seq", min=2, max=64)
    kept = export_onnx(Positions(frozen=True), (x,), tmp_path / "kept.onnx", dynamic_batch=True,
                       dynamo_model=Positions(frozen=False), dynamic_dims=[{1: seq}])
    (graph_input,) = onnx.load(kept).graph.input
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["batch", "seq", 4]
    (got,) = run_onnx(kept, (longer,))
    np.testing.assert_allclose(got, Positions(frozen=False)(longer).numpy(), rtol=1e-5, atol=1e-5)
    frozen = export_onnx(Positions(frozen=True), (x,), tmp_path / "frozen.onnx", dynamic_batch=True,
                         dynamo_model=Positions(frozen=False))
    with pytest.raises(Exception):  # noqa: B017, PT011 - ONNX Runtime's own error type
        run_onnx(frozen, (longer,))


def _spinning_entry(target: OnnxRuntimeCPU, path: Path) -> str:
    options = target.session(path).get_session_options()
    return options.get_session_config_entry("session.intra_op.allow_spinning")


def test_timing_sessions_do_not_spin_by_default_and_tables_record_the_setting(tmp_path):
    # A spinning session's idle workers take the cores from the session being timed next to
    # it (bench/results/ort_spinning.md: copies of one model 8-11 % apart), so every session the
    # target opens (build checks, model_runner for profiling and measure_models, load) is
    # non-spinning unless asked, and a table profiled one way is not used the other way.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    example = (torch.randn(1, 3, 8, 8),)
    quiet, spinning = OnnxRuntimeCPU(threads=1), OnnxRuntimeCPU(threads=1, spinning=True)
    artifact = quiet.build(model, example, tmp_path / "m.onnx")
    assert _spinning_entry(quiet, artifact.path) == "0"
    assert _spinning_entry(spinning, artifact.path) == "1"
    quiet.model_runner(model, example, tmp_path / "runner")
    assert _spinning_entry(quiet, tmp_path / "runner.onnx") == "0"
    assert quiet.fingerprint()["spinning"] == "False" and spinning.fingerprint()["spinning"] == "True"


def _new_threads_cpus(before: set[str], wanted: str | None = None) -> list[str]:
    """Cpus_allowed_list of the threads of this process that are not in ``before``. An ONNX
    Runtime worker pins itself once it is scheduled, so with ``wanted`` this waits (up to 10 s,
    however busy the machine) for a thread allowed exactly ``wanted``."""
    for _ in range(100):
        time.sleep(0.1)
        found = _threads_cpus(before)
        if wanted is None or wanted in found:
            break
    return found


def _threads_cpus(before: set[str]) -> list[str]:
    found = []
    for tid in set(os.listdir("/proc/self/task")) - before:
        with open(f"/proc/self/task/{tid}/status") as status:
            found += [line.split(":")[1].strip() for line in status if line.startswith("Cpus_allowed_list")]
    return found


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs thread affinities and two CPUs")
def test_timed_sessions_pin_their_worker_and_the_timing_thread_one_per_cpu(tmp_path):
    """Pinned, a busy process shares a core with the same thread every call (see
    spruce.targets.timing); only timed sessions are pinned, the fingerprint says so, and
    ``pin_threads=False`` or too few CPUs pins nothing."""
    cpus = sorted(os.sched_getaffinity(0))
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU()).eval()  # large enough to run in parallel:
    example = (torch.randn(1, 3, 64, 64),)  # ONNX Runtime pins a worker when it first runs a task
    target = OnnxRuntimeCPU(threads=2)
    assert target.pinned_cpus == tuple(cpus[:2]) and target.caller_cpu() == cpus[0]
    assert target.fingerprint()["pinned cpus"] == f"{cpus[0]},{cpus[1]}"
    before = set(os.listdir("/proc/self/task"))
    runner, inputs = target.model_runner(model, example, tmp_path / "timed")
    for _ in range(3):
        runner(inputs)
    assert str(cpus[1]) in _new_threads_cpus(before, str(cpus[1]))  # the intra-op worker, on the second CPU
    artifact = target.build(model, example, tmp_path / "m.onnx")
    before = set(os.listdir("/proc/self/task"))
    deployed = target.load(artifact)  # held: a dropped session's worker exits
    for _ in range(3):
        deployed(inputs)
    found = _new_threads_cpus(before)
    assert found and str(cpus[1]) not in found  # deployment: its worker is not pinned
    before = set(os.listdir("/proc/self/task"))
    timed = target.timing_runner(artifact)
    for _ in range(3):
        timed(inputs)
    assert str(cpus[1]) in _new_threads_cpus(before, str(cpus[1]))
    unpinned = OnnxRuntimeCPU(threads=2, pin_threads=False)
    assert unpinned.pinned_cpus is None and unpinned.caller_cpu() is None
    assert unpinned.fingerprint()["pinned cpus"] == "off"
    assert OnnxRuntimeCPU(threads=len(cpus) + 1).pinned_cpus is None  # more threads than CPUs
