"""Exporter output stays off the console: captured_output holds what the Python streams, the file
descriptors (C/C++ writes) and warnings receive; an exporter that fails before the fallback is one
line, in a real process whose whole output is counted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

from spruce.targets.console import captured_output


def test_captured_output_holds_python_c_level_and_warnings(capfd):
    with captured_output() as printed:
        print("from python")
        os.write(1, b"from fd 1\n")
        os.write(2, b"from fd 2\n")
        warnings.warn("a warning", UserWarning, stacklevel=1)
    assert capfd.readouterr() == ("", "")
    assert "from python" in printed.text and "from fd 1" in printed.text and "from fd 2" in printed.text
    assert printed.warnings == ["UserWarning: a warning"] and printed.lines == 4
    print("after")
    assert capfd.readouterr().out == "after\n"  # the streams are back


# An LSTM with projections: the TorchScript exporter refuses it, dumping its IR graph; the
# torch.export-based exporter then writes it.
LSTM_EXPORT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from spruce.targets.onnxruntime import export_onnx

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True, proj_size=4)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    torch.manual_seed(0)
    print("wrote", export_onnx(Tagger().eval(), (torch.randn(1, 6, 8),), sys.argv[1]).name)
""")


def test_a_fallback_export_is_one_line(tmp_path):
    done = subprocess.run(f"{sys.executable} -c '{LSTM_EXPORT}' {tmp_path / 'tagger.onnx'} 2>&1", shell=True,
                          capture_output=True, text=True, timeout=600, check=False)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout
    assert len(lines) == 2, done.stdout  # one summary line, and the script's own
    assert lines[0].startswith("spruce: ONNX export: the torchscript exporter failed (")
    assert "lines of its output hidden; trying the dynamo exporter" in lines[0]
    assert lines[1] == "wrote tagger.onnx" and (tmp_path / "tagger.onnx").is_file()
