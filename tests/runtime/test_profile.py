"""Latency tables: interpolation, shared signatures, the disk cache, prediction on real ONNX Runtime sessions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spruce.compiler import cli, cli_profile
from spruce.compiler.api import analyze_model, profile
from spruce.runtime.profile import (
    LatencyTable,
    LayerEntry,
    ProfileError,
    compact_at_widths,
    find_layers,
    layer_signature,
    random_group_widths,
)
from spruce.targets.base import resized_layer
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from torch import nn

FAST = {"warmup": 1, "repeats": 3, "coarse": 3, "calibration_random": 1, "retries": 0, "progress": False}


class CountingORT(OnnxRuntimeCPU):
    """The real ONNX Runtime target, counting what it is asked to time."""

    def __init__(self, threads: int = 1):
        super().__init__(threads=threads)
        self.layer_calls: list[tuple] = []
        self.model_calls = 0

    def time_layer(self, layer, input_shape, active_in, active_out, batch_size=None, warmup=10, repeats=50):
        self.layer_calls.append((layer_signature(layer, input_shape, torch.float32), active_in, active_out))
        return super().time_layer(layer, input_shape, active_in, active_out, batch_size, warmup, repeats)

    def time_model(self, model, example_inputs, warmup=10, repeats=50):
        self.model_calls += 1
        return super().time_model(model, example_inputs, warmup, repeats)


class TwinBlocks(nn.Module):
    """Two residual blocks with identical convolution shapes, a depthwise conv and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(24, 16, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(24, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + self.a2(torch.relu(self.a1(x)))
        x = x + self.b2(torch.relu(self.b1(x)))
        x = torch.relu(self.dw(x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def twin() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return TwinBlocks().eval(), (torch.randn(1, 3, 16, 16),)


@pytest.fixture(scope="module")
def profiled(twin, tmp_path_factory):
    """One profiling run with a fresh cache: (table, counting target, cache dir)."""
    cache = tmp_path_factory.mktemp("cache")
    target = CountingORT()
    table = profile(*twin, target, step=8, cache_dir=cache, **FAST)
    return table, target, cache


# --- interpolation ----------------------------------------------------------------------


def _synthetic_table(values, full_in=64, full_out=48, step=8, coarse=(8, 32, 64), coarse_out=(8, 24, 48)):
    fine_in, fine_out = tuple(range(step, full_in + 1, step)), tuple(range(step, full_out + 1, step))
    entry = LayerEntry("conv", "sig", full_in, full_out, in_coarse=coarse, out_coarse=coarse_out,
                       in_fine=fine_in, out_fine=fine_out)
    points = {"sig": {p: float(values(*p)) for p in entry.points()}}
    return LatencyTable({"conv": entry}, points, {"target": "synthetic"}), fine_in, fine_out


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=8, max_size=8), st.lists(st.floats(0.1, 10.0), min_size=6, max_size=6))
def test_interpolation_exact_for_separable_staircases(f_in, f_out):
    """Any latency of the form f(in) * g(out) (staircases included) is reproduced at every grid point,
    though only the coarse rectangle and the two full-width edges were measured."""
    table, fine_in, fine_out = _synthetic_table(lambda i, o: f_in[i // 8 - 1] * f_out[o // 8 - 1])
    for i in fine_in:
        for o in fine_out:
            assert table.isolated_ms("conv", i, o) == pytest.approx(f_in[i // 8 - 1] * f_out[o // 8 - 1], rel=1e-9)


def test_interpolation_linear_between_points_and_exact_on_bilinear():
    def bilinear(i, o):
        return 0.05 + 0.002 * i + 0.003 * o + 0.0004 * i * o

    table, _, _ = _synthetic_table(bilinear)
    for i in (1, 5, 13, 37, 64):
        for o in (3, 20, 47):
            assert table.isolated_ms("conv", i, o) == pytest.approx(bilinear(max(i, 8), max(o, 8)), rel=1e-9)
    # between two measured points the value lies between them
    low, high = table.isolated_ms("conv", 8, 48), table.isolated_ms("conv", 16, 48)
    assert low < table.isolated_ms("conv", 12, 48) < high


def test_depthwise_entry_follows_one_axis():
    entry = LayerEntry("dw", "sig", 32, 64, groups=32, multiplier=2, in_fine=(8, 16, 24, 32))
    table = LatencyTable({"dw": entry}, {"sig": {(c, 2 * c): c / 8.0 for c in (8, 16, 24, 32)}}, {"target": "x"})
    assert table.isolated_ms("dw", 20, 40) == pytest.approx(2.5)
    with pytest.raises(ProfileError, match="depthwise"):
        table.layer_ms("dw", 20, 20)


# --- profiling on the real target ------------------------------------------------------------


def test_identical_signatures_timed_once(twin, profiled):
    table, target, _ = profiled
    assert table.layers["a1"].signature == table.layers["b1"].signature
    assert table.layers["a2"].signature == table.layers["b2"].signature
    assert len(target.layer_calls) == len(set(target.layer_calls))  # no point timed twice...
    needed = {(e.signature, *p) for e in table.layers.values() for p in e.points()}
    assert set(target.layer_calls) == needed  # ...and exactly the points the table reads
    assert len(needed) < sum(len(e.points()) for e in table.layers.values())


def test_layers_found_with_shapes_and_pinned_dims(twin, profiled):
    table, _, _ = profiled
    assert list(table.layers) == list(find_layers(*twin))
    stem, head, dw = table.layers["stem"], table.layers["head"], table.layers["dw"]
    assert (stem.in_channels, stem.out_channels, stem.in_varies) == (3, 16, False)
    assert (head.in_channels, head.out_channels, head.out_varies) == (16, 10, False)
    assert dw.depthwise and dw.multiplier == 1
    assert stem.in_elements == 16 * 16 and head.in_elements == 1


def test_cache_hit_times_nothing(twin, profiled):
    table, _, cache = profiled
    again = CountingORT()
    second = profile(*twin, again, step=8, cache_dir=cache, **FAST)
    assert again.layer_calls == [] and again.model_calls == 0
    assert second.points == table.points
    assert second.dense_ms() == pytest.approx(table.dense_ms())


def test_other_fingerprint_never_uses_cache(twin, profiled, tmp_path):
    table, _, cache = profiled
    other = CountingORT(threads=2)
    assert other.fingerprint() != table.fingerprint
    # plant the first target's cache files where the second target would look: still not used
    own_folder = next(p for p in cache.iterdir() if p.is_dir())
    planted = tmp_path / "cache"
    planted.mkdir()
    for sub in (planted / own_folder.name, planted / _folder_for(other)):
        sub.mkdir()
        for file in own_folder.iterdir():
            (sub / file.name).write_text(file.read_text())
    profile(*twin, other, step=8, cache_dir=planted, **FAST)
    needed = {(e.signature, *p) for e in table.layers.values() for p in e.points()}
    assert set(other.layer_calls) == needed
    path = table.save(tmp_path / "table.json")
    with pytest.raises(ProfileError, match="threads"):
        LatencyTable.load(path, expected_fingerprint=other.fingerprint())


def _folder_for(target) -> str:
    from spruce.runtime.profile import _digest

    return _digest(dict(target.fingerprint()))


def test_save_load_round_trip_and_predict_model(twin, profiled, tmp_path):
    table, _, _ = profiled
    path = table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(path, expected_fingerprint=table.fingerprint)
    model, inputs = twin
    analysis = analyze_model(model, inputs)
    widths = random_group_widths(analysis.groups, np.random.default_rng(3), step=8)
    compact = compact_at_widths(analysis, model, widths)
    config = table.widths_of(compact)
    assert config != {n: (e.in_channels, e.out_channels) for n, e in table.layers.items()}
    assert loaded.predict_model(compact) == pytest.approx(table.predict(config))
    assert loaded.dense_ms() == pytest.approx(table.dense_ms())
    # the invariant the knapsack relies on
    shares = [e.calls * table.layer_ms(n, *config[n]) for n, e in table.layers.items()]
    total = table.calibration.overhead_ms + sum(shares)
    assert table.predict(config) == pytest.approx(total)
    assert all(set(e.points()) <= set(table.points[e.signature]) for e in loaded.layers.values())


class Wide(nn.Module):
    """Enough work per layer (a few ms) that ONNX Runtime's per-run cost does not dominate."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 48, 3, padding=1)
        self.c2 = nn.Conv2d(48, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 64, 3, padding=1, stride=2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def test_predict_tracks_measured_latency_of_real_compact_models(tmp_path):
    """Smoke check of the prediction on real sessions (the accuracy goal is measured by bench/latency.py)."""
    torch.manual_seed(0)
    model, inputs = Wide().eval(), (torch.randn(1, 3, 48, 48),)
    target = OnnxRuntimeCPU(threads=1)
    table = profile(model, inputs, target, step=8, cache_dir=tmp_path, progress=False, warmup=2, repeats=7,
                    coarse=4, calibration_random=2)
    analysis = analyze_model(model, inputs)
    rng = np.random.default_rng(7)
    errors = []
    for _ in range(4):
        compact = compact_at_widths(analysis, model, random_group_widths(analysis.groups, rng, step=8))
        measured = min(float(np.median(target.time_model(compact, inputs, 3, 15))) for _ in range(2)) * 1e3
        errors.append(abs(table.predict_model(compact) / measured - 1))
    assert np.median(errors) < 0.25, errors


# --- the layer timing primitive -----------------------------------------------------------------


def test_resized_layer_keeps_hyperparameters_and_groups():
    conv = nn.Conv2d(32, 64, 3, stride=2, padding=1, dilation=1, groups=4, bias=False)
    small = resized_layer(conv, 16, 24)
    assert (small.in_channels, small.out_channels, small.groups, small.stride, small.bias) == (16, 24, 4, (2, 2), None)
    dw = resized_layer(nn.Conv1d(16, 32, 5, groups=16), 8, 16)
    assert (dw.groups, dw.in_channels, dw.out_channels) == (8, 8, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        resized_layer(conv, 18, 24)
    with pytest.raises(ValueError, match="depthwise"):
        resized_layer(nn.Conv2d(16, 16, 3, groups=16), 8, 16)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        resized_layer(nn.BatchNorm2d(4), 2, 2)


def test_time_layer_runs_a_real_session():
    seconds = OnnxRuntimeCPU(threads=1).time_layer(nn.Linear(32, 16), (4, 32), 8, 8, batch_size=2,
                                                   warmup=1, repeats=3)
    assert seconds.shape == (3,) and (seconds > 0).all()


# --- bad input ------------------------------------------------------------------------------------


def test_unknown_target(twin):
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        profile(*twin, "tpu", progress=False)


@pytest.mark.parametrize("step", [0, -8, 2.5, True])
def test_bad_step(twin, step):
    with pytest.raises(ProfileError, match="step"):
        profile(*twin, "onnxruntime", step=step, progress=False)


def test_bad_widths(profiled):
    table, _, _ = profiled
    with pytest.raises(ProfileError, match=r"unknown layer 'a1x'.*did you mean a1"):
        table.predict({"a1x": (16, 24)})
    with pytest.raises(ProfileError, match=r"'a1'.*\[1, 24\]"):
        table.predict({"a1": (16, 25)})
    with pytest.raises(ProfileError, match="unknown layer"):
        table.layer_ms("nope", 1, 1)


def test_model_without_layers():
    with pytest.raises(ProfileError, match="no Conv1d/2d/3d or Linear"):
        profile(nn.ReLU(), (torch.randn(2, 3),), "onnxruntime", progress=False)


def test_bad_table_files(tmp_path, profiled):
    table, _, _ = profiled
    with pytest.raises(ProfileError, match="cannot read"):
        LatencyTable.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        LatencyTable.load(tmp_path / "bad.json")
    document = table.to_dict()
    document["points"] = {sig: rows[1:] for sig, rows in document["points"].items()}
    (tmp_path / "cut.json").write_text(json.dumps(document))
    with pytest.raises(ProfileError, match="lacks measured points"):
        LatencyTable.load(tmp_path / "cut.json")
    with pytest.raises(ProfileError, match="does not exist"):
        table.save(tmp_path / "no" / "where.json")


# --- command line ----------------------------------------------------------------------------------


@pytest.fixture
def spruce_main(monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "profile", cli_profile.SUBCOMMAND)
    return cli.main


def _model_file(tmp_path: Path) -> str:
    source = tmp_path / "tiny.py"
    source.write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1))\n"
        "    return model, (torch.randn(1, 3, 12, 12),)\n"
    )
    return f"{source}:build"


def test_cli_writes_a_table(spruce_main, tmp_path, capsys):
    out = tmp_path / "table.json"
    code = spruce_main(["profile", _model_file(tmp_path), "--target", "onnxruntime", "--option", "threads=1",
                        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--warmup", "1", "--repeats", "3",
                        "--no-progress"])
    assert code == 0, capsys.readouterr().err
    table = LatencyTable.load(out, expected_fingerprint=OnnxRuntimeCPU(threads=1).fingerprint())
    assert set(table.layers) == {"0", "2"} and table.dense_ms() > 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--step", "0"], "profile: step must be >= 1"),
    (["--option", "cores=3"], "does not take these options"),
    (["--option", "threads"], "expected KEY=VALUE"),
])
def test_cli_bad_input(spruce_main, tmp_path, capsys, extra, message):
    out = tmp_path / "table.json"
    code = spruce_main(["profile", _model_file(tmp_path), "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "spruce: error: " in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_flattened_linear_steps_by_whole_channels_and_training_flag_kept(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    model.train()
    table = profile(model, (torch.randn(1, 3, 4, 4),), OnnxRuntimeCPU(threads=1), step=8, cache_dir=tmp_path, **FAST)
    assert model.training
    assert table.layers["3"].in_fine == (8 * 16, 16 * 16)  # 8 channels of 16 entries each
    assert table.layers["0"].out_fine == (8, 16)


def test_profile_on_the_torch_target(twin, tmp_path):
    from spruce.targets.pytorch import TorchTarget

    table = profile(*twin, TorchTarget(), step=8, cache_dir=tmp_path, **FAST)
    assert table.fingerprint["target"] == "torch" and table.dense_ms() > 0
    assert all(ms > 0 for points in table.points.values() for ms in points.values())
