"""End-to-end tests of the ``spruce`` command line on real torchvision models.

Most runs call ``main([...])`` in-process; one runs the installed console
script. Every failing run must exit 2 (user error) or 1 (artifact check),
print ``spruce: error:`` without a traceback and leave no files behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from spruce.cli import prune as cli_prune
from spruce.cli.main import main
from spruce.targets.onnxruntime import run_onnx

RESNET = ["torchvision:resnet18", "--input-shape", "1,3,64,64"]
MOBILENET = ["torchvision:mobilenet_v3_small", "--input-shape", "1,3,64,64"]
SPRUCE_SCRIPT = Path(sys.executable).parent / "spruce"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``spruce argv`` in-process; return (exit code, stdout, stderr)."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    assert any(line.startswith("spruce: error:") for line in err.splitlines())
    assert expected in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def pruned_resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real prune of resnet18 at 64x64, shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("resnet") / "missing" / "parents" / "out"
    code = main(["prune", *RESNET, "--ratio", "0.5", "--out", str(out)])
    assert code == 0
    return out


# --- prune -------------------------------------------------------------------------


def test_prune_writes_exactly_its_files(pruned_resnet: Path) -> None:
    out = pruned_resnet
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.spruce.json", "model.pt", "report.json"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temp folders left


def test_report_records_a_smaller_model(pruned_resnet: Path) -> None:
    out = pruned_resnet
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "torchvision:resnet18"
    assert report["input_shapes"] == [[1, 3, 64, 64]]
    assert report["ratio"] == 0.5
    assert report["importance"] == "l1"
    assert report["params"]["after"] < report["params"]["before"]
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["params"]["ratio"] == pytest.approx(
        report["params"]["after"] / report["params"]["before"]
    )
    assert 0 <= report["onnx"]["max_rel_diff"] <= 1e-3
    assert report["normalised_widths"] is False
    assert report["errors"]["masked"] <= 1e-4 < report["errors"]["dense"]  # pruning changed the function
    pruned_groups = [g for g in report["groups"] if g["kept"] < g["size"]]
    assert pruned_groups and all(g["prunable"] for g in pruned_groups)


def test_saved_model_loads_runs_and_matches_onnx(pruned_resnet: Path) -> None:
    out = pruned_resnet
    model = torch.load(out / "model.pt", weights_only=False)
    report = json.loads((out / "report.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]
    for batch in (1, 3):  # the example's batch and another: the ONNX batch is dynamic
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            logits = model(x)
        assert logits.shape == (batch, 1000)
        (onnx_logits,) = run_onnx(out / "model.onnx", [x])
        assert np.abs(onnx_logits - logits.numpy()).max() <= 1e-3 * max(1.0, logits.abs().max())


def test_saved_model_is_a_valid_spec_for_analyze(
    capsys: pytest.CaptureFixture[str], pruned_resnet: Path
) -> None:
    out = pruned_resnet
    code, stdout, _ = run(capsys, "analyze", str(out / "model.pt"), "--input-shape", "1,3,64,64")
    assert code == 0
    assert "prunable groups" in stdout


def test_existing_output_needs_force_then_is_replaced(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["prune", *MOBILENET, "--ratio", "0.3", "--round-to", "8", "--out", str(out)]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    code, stdout, _ = run(capsys, *argv, "--force")
    assert code == 0
    assert "params" in stdout and "MACs" in stdout and "->" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.spruce.json", "model.pt", "report.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    report = json.loads((out / "report.json").read_text())
    assert report["round_to"] == 8
    assert report["params"]["after"] < report["params"]["before"]
    for group in report["groups"]:
        if group["kept"] < group["size"]:
            assert group["kept"] % 8 == 0


# --- user errors leave nothing behind ----------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["torchvision:resnet19", "--ratio", "0.5"], "did you mean"),
        (["no_such_scheme:net", "--ratio", "0.5"], "cannot resolve model spec"),
        ([*RESNET, "--ratio", "1.5"], "ratio"),
        ([*RESNET, "--ratio", "-0.1"], "ratio"),
        ([*RESNET, "--ratio", "0.5", "--importance", "no_such_criterion"], "no_such_criterion"),
        (["torchvision:resnet18", "--input-shape", "1,3,x", "--ratio", "0.5"], "input shape"),
        (["torchvision:resnet18", "--input-shape", "1,0,8,8", "--ratio", "0.5"], "input shape"),
    ],
)
def test_user_errors_exit_2_and_write_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], expected: str
) -> None:
    out = tmp_path / "parent" / "out"
    code, _, err = run(capsys, "prune", *argv, "--out", str(out))
    assert_user_error(code, err, expected)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_a_user_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run(capsys, "prune", *RESNET, "--ratio", "0.5",
                       "--out", str(blocker / "sub" / "out"))
    assert_user_error(code, err, "not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_untraceable_model_is_a_user_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    source = tmp_path / "dynamic.py"
    source.write_text(textwrap.dedent(
        """
        import torch
        from torch import nn

        class DataDependent(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3)

            def forward(self, x):
                y = self.conv(x)
                if y.sum() > 0:
                    return y
                return -y

        def make():
            return DataDependent(), torch.randn(1, 3, 16, 16)
        """
    ))
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", f"{source}:make", "--ratio", "0.5", "--out", str(out))
    assert_user_error(code, err, "cannot trace")
    assert not out.exists()


def test_failed_onnx_check_exits_1_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_prune, "ONNX_TOLERANCE", -1.0)  # no real difference can pass this
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", *MOBILENET, "--ratio", "0.2", "--out", str(out))
    assert code == 1
    assert "ONNX Runtime output differs" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert_user_error(code, err, "required")
    code, _, err = run(capsys, "prune", "torchvision:resnet18")
    assert_user_error(code, err, "--ratio")
    code, stdout, _ = run(capsys, "--help")
    assert code == 0
    assert "analyze" in stdout and "prune" in stdout


# --- analyze -----------------------------------------------------------------------


def test_analyze_table_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run(capsys, "analyze", *RESNET)
    assert code == 0, err
    header = stdout.splitlines()[0].split()
    assert header[:4] == ["id", "size", "prunable", "members"]
    for label in ("groups:", "prunable groups:", "prunable channels:"):
        assert label in stdout


def test_analyze_json_is_one_consistent_document(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run(capsys, "analyze", *RESNET, "--json")
    assert code == 0
    document = json.loads(stdout)
    groups, summary = document["groups"], document["summary"]
    assert summary["groups"] == len(groups) > 0
    prunable = [g for g in groups if g["prunable"]]
    assert summary["prunable_groups"] == len(prunable) > 0
    assert summary["prunable_channels"] == sum(g["size"] for g in prunable)
    assert sum(summary["unprunable_reasons"].values()) == len(groups) - len(prunable)
    assert all(g["members"] and "name" in g["members"][0] for g in groups)


def test_analyze_bad_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run(capsys, "analyze", "torchvision:not_a_model")
    assert_user_error(code, err, "not_a_model")
    assert stdout == ""


# --- the installed console script --------------------------------------------------


@pytest.mark.skipif(not SPRUCE_SCRIPT.exists(), reason="spruce console script not installed")
def test_console_script_prunes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        [str(SPRUCE_SCRIPT), "prune", *MOBILENET, "--ratio", "0.3", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "MACs" in completed.stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.spruce.json", "model.pt", "report.json"]
