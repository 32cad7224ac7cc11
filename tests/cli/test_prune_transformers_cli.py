"""``spruce prune`` of transformers models: a saved model folder and a ``FILE.py:make`` returning
keyword inputs. The sequence length stays dynamic by default (model.onnx, model.pt and the
.pt2 run at another length), ``--dynamic`` declares other dims, and an ONNX input whose dims
are fixed is named in the report; a malformed ``--dynamic`` is refused before torch loads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from spruce.cli.main import main

T = pytest.importorskip("transformers")


def _llama_folder(path):
    config = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           bos_token_id=0, eos_token_id=None, pad_token_id=None, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def test_prune_of_a_saved_llama_folder_keeps_the_sequence_length_dynamic(tmp_path, capsys):
    import onnx
    from spruce.targets.onnxruntime import run_onnx

    folder = _llama_folder(tmp_path / "llama")
    out = tmp_path / "out"
    assert main(["prune", str(folder), "--ratio", "0.5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input_shapes"] == {"input_ids": [1, 8]}
    assert report["dynamic_dims"] == {"input_ids": [1]}
    assert report["onnx"]["frozen_dims"] == {}
    assert sorted(report["files"]) == ["model.onnx", "model.pt", "model.pt2", "report.json"]
    axes = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(out / "model.onnx").graph.input]
    assert axes == [["batch", "seq"]]
    ids = torch.randint(0, 64, (3, 13), generator=torch.Generator().manual_seed(5))
    compact = torch.load(out / "model.pt", weights_only=False).eval()
    with torch.no_grad():
        want = compact(input_ids=ids)["logits"]
    assert want.shape == (3, 13, 64)
    got = torch.as_tensor(run_onnx(out / "model.onnx", [ids])[0])
    assert (got - want).abs().max() <= 1e-4
    check = textwrap.dedent("""
        import sys, torch
        program = torch.export.load(sys.argv[1])
        torch.save(program.module()(input_ids=torch.load(sys.argv[2])), sys.argv[3])
        print(any(m.split(".")[0] == "spruce" for m in sys.modules))
    """)
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run([sys.executable, "-c", check, str(out / "model.pt2"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "False"
    logits = torch.load(tmp_path / "logits.pt", weights_only=False)
    logits = logits["logits"] if isinstance(logits, dict) else logits[0]
    assert (logits - want).abs().max() <= 1e-5


MAKE = textwrap.dedent("""
    import torch
    from torch import nn

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv1d(4, 16, 1)
            self.head = nn.Conv1d(16, 3, 1)

        def forward(self, signal, scale=None):
            return self.head(torch.relu(self.proj(signal)))

    def make():
        return Mixer().eval(), {"signal": torch.randn(2, 4, 10)}
""")


def test_keyword_inputs_from_a_factory_and_declared_dims(tmp_path, capsys):
    source = tmp_path / "mixer.py"
    source.write_text(MAKE)
    frozen = tmp_path / "frozen"
    assert main(["prune", f"{source}:make", "--ratio", "0.5", "--out", str(frozen)]) == 0
    assert "fixed sizes in model.onnx (past the batch): signal dim 1,2" in capsys.readouterr().out
    assert json.loads((frozen / "report.json").read_text())["onnx"]["frozen_dims"] == {"signal": [1, 2]}
    dynamic = tmp_path / "dynamic"
    assert main(["prune", f"{source}:make", "--ratio", "0.5", "--dynamic", "signal:2", "--out", str(dynamic)]) == 0
    report = json.loads((dynamic / "report.json").read_text())
    assert report["onnx"]["frozen_dims"] == {"signal": [1]}
    assert report["dynamic_dims"] == {"signal": [2]}
    capsys.readouterr()
    assert main(["analyze", f"{source}:make", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shapes"] == {"signal": [2, 4, 10]}


@pytest.mark.parametrize("value, expected", [("signal", "write INPUT:DIM"), ("signal:0", "write INPUT:DIM"),
                                             ("signal:x", "write INPUT:DIM")])
def test_a_malformed_dynamic_flag_is_refused_before_torch_loads(tmp_path, value, expected):
    source = tmp_path / "mixer.py"
    source.write_text(MAKE)
    script = ("import sys; from spruce.cli.main import main; code = main(sys.argv[1:]); "
              "print('torch' in sys.modules); sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", script, "prune", f"{source}:make", "--ratio", "0.5",
                          "--dynamic", value, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert expected in run.stderr and "Traceback" not in run.stderr
    assert run.stdout.strip() == "False"
    assert not (tmp_path / "out").exists()
