"""`spruce profile`: a table written from a model file; bad input exits 2 with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from spruce.cli import main as cli
from spruce.runtime.profile import LatencyTable
from spruce.targets.onnxruntime import OnnxRuntimeCPU


@pytest.fixture
def spruce_main():
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
    (["--option", "cores=3"], "unknown option cores"),
    (["--option", "threads"], "expected KEY=VALUE"),
])
def test_cli_bad_input(spruce_main, tmp_path, capsys, extra, message):
    out = tmp_path / "table.json"
    code = spruce_main(["profile", _model_file(tmp_path), "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "spruce: error: " in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_cache_path_that_is_a_file_is_refused_before_anything_is_measured(tmp_path, monkeypatch, spruce_main,
                                                                              capsys):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPRUCE_CACHE", str(blocker))
    out = tmp_path / "table.json"
    assert spruce_main(["profile", _model_file(tmp_path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spruce: error:") and str(blocker) in err and "Traceback" not in err
    assert not out.exists()
