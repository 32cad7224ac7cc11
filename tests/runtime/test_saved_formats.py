"""Latency tables and cache files written by an earlier spruce still load (tests/data/latency_v2: a table
of format version 2 and the cache, version 4, that the same profile wrote, both from spruce 0.1.0)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from spruce.runtime.profile import profile
from spruce.runtime.table import LatencyTable
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from torch import nn

SAVED = Path(__file__).parent.parent / "data" / "latency_v2"
# what tests/data/latency_v2 was profiled with (the cache keys depend on the model's repr and options)
OPTIONS = {"step": 4, "progress": False, "warmup": 1, "repeats": 3, "coarse": 3, "calibration_random": 0,
           "retries": 0}


def _saved_model() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=2),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16 * 2 * 2, 4))
    return model.eval(), torch.randn(1, 3, 8, 8)


class CacheOnly(OnnxRuntimeCPU):
    """The ONNX Runtime target under the fingerprint the saved cache was written with; it refuses to time
    anything, so a profile on it must come entirely from the cache."""

    def fingerprint(self) -> dict[str, str]:
        return {"target": "onnxruntime", "fixture": "latency cache written by spruce 0.1.0 (cache version 4)"}

    def measure_models(self, cases, warmup=3, rounds=20):
        raise AssertionError(f"asked to time {len(cases)} models: the saved cache was not used")


def test_a_table_saved_in_format_version_2_loads_and_predicts_as_when_saved():
    table = LatencyTable.load(SAVED / "table.json")
    assert list(table.layers) == ["0", "2", "4", "7"] and sum(map(len, table.points.values())) == 29
    assert table.predict({"2": (4, 8)}) == pytest.approx(0.02206179140640193, rel=1e-12)
    assert table.predict({"7": (32, 4)}) == pytest.approx(0.02414967884855954, rel=1e-12)


def test_a_profile_on_a_saved_cache_times_nothing_and_rebuilds_the_saved_table(tmp_path):
    """The cache's folder and file names (digests of the fingerprint and of each signature, reference
    and model key) and its version are what the saved files carry: every point, the reference level and
    the dense model's timing come from them, and the table equals the one saved with them."""
    cache = tmp_path / "cache"
    shutil.copytree(SAVED / "cache", cache)
    table = profile(*_saved_model(), CacheOnly(threads=1), cache_dir=cache, **OPTIONS)
    saved = LatencyTable.load(SAVED / "table.json")
    rebuilt, expected = table.to_dict(), saved.to_dict()
    for document in (rebuilt, expected):
        document["info"].pop("host")
    assert rebuilt == expected
