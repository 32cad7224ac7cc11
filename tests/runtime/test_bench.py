"""spruce.bench on real ONNX Runtime and torch artifacts; damaged artifacts are one clear error."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
from helpers import bench_artifacts, copy_artifact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spruce.runtime.bench import BenchReport, bench
from spruce.targets.base import ArtifactError, get_target


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    return bench_artifacts(tmp_path_factory.mktemp("artifacts"))


def check_rows(report: BenchReport, which: tuple[str, ...], batch_sizes: tuple[int, ...]) -> None:
    assert [(r.which, r.batch_size) for r in report.rows] == [(w, b) for b in batch_sizes for w in which]
    for row in report.rows:
        assert 0 < row.median_ms <= row.p90_ms <= row.p99_ms
        assert row.images_per_s == pytest.approx(row.batch_size * 1e3 / row.median_ms)
        assert 0 < row.robust_ms <= row.p99_ms


def test_a_load_change_during_the_run_slows_compiled_and_dense_alike(artifacts, monkeypatch) -> None:
    """The same artifact as compiled and dense, under a load that grows through the run
    (each call sleeps 0.5 ms longer than the one before): the speed-up must stay about 1.
    Timing one artifact's calls and then the other's gave the first artifact the low end of
    the ramp (a speed-up of about 2)."""
    target = get_target("onnxruntime", threads=1)
    load, calls = target.timing_runner, itertools.count()

    def loaded(artifact):
        runner = load(artifact)

        def call(inputs):
            time.sleep(5e-4 * next(calls))
            return runner(inputs)

        return call

    monkeypatch.setattr(target, "timing_runner", loaded)
    report = bench(artifacts["dense"], target, batch_sizes=(1,), warmup=3, iters=15, dense=artifacts["dense"])
    assert next(calls) == 2 * (3 + 15) and report.row("dense", 1).median_ms > 5  # the ramp ran
    assert 0.8 < report.speedup[1] < 1.25 and 0.8 < report.robust_speedup[1] < 1.25, report.format_table()


def test_bench_compares_with_dense_on_onnxruntime(artifacts) -> None:
    report = bench(artifacts["pruned"], get_target("onnxruntime", threads=1), batch_sizes=(1, 4), warmup=3,
                   iters=15, dense=artifacts["dense"])
    check_rows(report, ("compiled", "dense"), (1, 4))
    for batch in (1, 4):
        assert report.speedup[batch] == pytest.approx(report.row("dense", batch).median_ms
                                                      / report.row("compiled", batch).median_ms)
        assert report.robust_speedup[batch] == pytest.approx(report.row("dense", batch).robust_ms
                                                             / report.row("compiled", batch).robust_ms)
    assert report.speedup[4] > 1.0  # 16 channels instead of 64: 12x fewer MACs
    assert report.fingerprint["target"] == "onnxruntime"
    table = report.format_table()
    assert "speedup" in table and len(table.splitlines()) == 2 + 4
    assert json.loads(json.dumps(report.to_dict()))["speedup"].keys() == {"1", "4"}


def test_bench_torch_artifact(artifacts) -> None:
    report = bench(artifacts["torch"], "torch", batch_sizes=(2,), warmup=2, iters=10)
    check_rows(report, ("compiled",), (2,))
    assert report.speedup == {}


def test_bench_refuses_another_targets_artifact_and_bad_options(artifacts) -> None:
    with pytest.raises(ArtifactError, match="built for target 'onnxruntime', not 'torch'"):
        bench(artifacts["pruned"], "torch")
    with pytest.raises(ValueError, match="batch_sizes"):
        bench(artifacts["pruned"], "onnxruntime", batch_sizes=(0,))
    with pytest.raises(ValueError, match="iters"):
        bench(artifacts["pruned"], "onnxruntime", iters=0)


# --- manifests pin their artifact (#13 kind 7) ---------------------------------------------------


_EDITS = {
    "input shape": lambda m: m["input_shapes"][0].__setitem__(1, 4),
    "input count": lambda m: m["input_shapes"].append([1, 3, 32, 32]),
    "sha256": lambda m: m["files"]["model.onnx"].__setitem__("sha256", "0" * 64),
    "size": lambda m: m["files"]["model.onnx"].__setitem__("size", 12),
    "no pins": lambda m: m.pop("files"),
    "pin outside": lambda m: m["files"].__setitem__("../x", {"size": 1, "sha256": "0"}),
    "not a mapping": lambda m: m.__setitem__("files", [1]),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.one_of(st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
                        st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True)),
                        st.tuples(st.just("edit"), st.sampled_from(sorted(_EDITS)))))
def test_any_damaged_artifact_or_edited_manifest_is_one_clear_error(artifacts, tmp_path_factory, damage) -> None:
    folder = tmp_path_factory.mktemp("damaged")
    copy = copy_artifact(artifacts["pruned"], folder)
    kind, where = damage
    data = bytearray(copy.read_bytes())
    if kind == "truncate":
        copy.write_bytes(bytes(data[:int(where * len(data))]))
    elif kind == "flip":
        data[int(where * len(data))] ^= 0x01
        copy.write_bytes(bytes(data))
    else:
        manifest_path = Path(str(copy) + ".spruce.json")
        manifest = json.loads(manifest_path.read_text())
        _EDITS[where](manifest)
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="changed|truncated|not a valid spruce manifest|manifest was edited"):
        bench(copy, target=get_target("onnxruntime", threads=1), batch_sizes=(1,), warmup=0, iters=1)


def test_the_manifest_pins_onnx_external_data(artifacts, tmp_path) -> None:
    import onnx
    from spruce.targets.base import Artifact, read_artifact

    path = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(artifacts["pruned"])), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    original = read_artifact(copy_artifact(artifacts["pruned"], tmp_path, "orig.onnx"))
    target = get_target("onnxruntime", threads=1)
    Artifact(path=path, target="onnxruntime", input_shapes=original.input_shapes).write_manifest()
    with pytest.raises(ArtifactError, match=r"reads external data \['ext.onnx.data'\] that its manifest does not"):
        bench(path, target=target, batch_sizes=(1,), warmup=0, iters=1)  # a manifest that forgot it
    from spruce.targets.onnxruntime import external_data_files

    Artifact(path=path, target="onnxruntime", input_shapes=original.input_shapes,
             data_files=external_data_files(path)).write_manifest()
    assert bench(path, target=target, batch_sizes=(1,), warmup=0, iters=1).rows
    data = bytearray((tmp_path / "ext.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x04  # one weight changed, the .onnx file untouched
    (tmp_path / "ext.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="ext.onnx.data does not match the sha256"):
        bench(path, target=target, batch_sizes=(1,), warmup=0, iters=1)
