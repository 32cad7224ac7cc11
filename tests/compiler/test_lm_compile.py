"""Compile a tiny *trained* causal LM end to end (#29): a Llama-style decoder trained here for
a few hundred steps on standard-library source (spruce.zoo.lm), compiled from its saved folder
under a params budget with distillation.

- the compiled model's held-out perplexity is below the one-shot model's on the same selection
  (the report's fidelity before recovery): with recovery disabled or broken the two are equal
  and the test fails;
- heads and MLP width are pruned with the same counts in every layer (uniform), so the
  ``hf/`` folder is written; in a fresh process that never imports spruce, stock transformers
  loads it with its tokenizer, runs ``generate``, and its logits equal the compiled ONNX's at a
  sequence length other than the example's (the sequence dim is dynamic)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import spruce
import torch
from spruce.compiler.outputs import flatten_outputs
from spruce.zoo.lm import train_tiny_lm

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return train_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny", steps=200)


def test_compile_a_trained_lm_with_distillation_and_reload_it_with_transformers(tiny_lm, tmp_path):
    out = tmp_path / "out"
    report = spruce.compile(str(tiny_lm.folder), data=(tiny_lm.train, tiny_lm.held_out), out=out,
                            budget={"params": 0.7}, recover="distill", recover_tokens=24_000, recover_lr=2e-3,
                            bench_batch_sizes=(1,), bench_iters=10, bench_warmup=2, quiet=True)
    doc = report.document
    (output,) = doc["evaluation"]["outputs"]
    assert output["kind"] == "lm" and output["kind_from"].startswith("recognised")
    after = doc["evaluation"]["fidelity"]["per_output"][output["output"]]["perplexity_ratio"]
    before = doc["recovery"]["fidelity_before_recovery"]["per_output"][output["output"]]["perplexity_ratio"]
    assert after < before, (after, before)  # distillation recovered perplexity on the same selection
    assert doc["floor"]["met"]
    assert doc["recovery"]["steps"] == math.ceil(24_000 / tiny_lm.train[0].numel())  # bounded by tokens
    lm = doc["language_model"]
    assert lm["hf"] == "hf" and lm["tokenizer"] == "hf" and lm["pt2"] == "model.pt2" and lm["uniform"]
    assert lm["hf_config"]["intermediate_size"] < 192 or lm["hf_config"]["num_attention_heads"] < 4

    tokens = tiny_lm.held_out[0][:2, :40]  # another length than the example's 64
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch, transformers
        folder = {str(out / "hf")!r}
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        prompt = tokenizer("def main(", return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        tokens = torch.from_numpy(np.load({str(tmp_path / "tokens.npy")!r}))
        with torch.no_grad():
            np.save({str(tmp_path / "hf_logits.npy")!r}, model(tokens).logits.numpy())
        print(json.dumps({{"new": int(generated.shape[1] - prompt["input_ids"].shape[1]),
                          "text": tokenizer.decode(generated[0]), "spruce": "spruce" in sys.modules}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["new"] == 8 and not result["spruce"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})
    hf_logits = np.load(tmp_path / "hf_logits.npy")
    assert onnx_logits.shape == hf_logits.shape and onnx_logits.shape[:2] == (2, 40)
    assert np.abs(onnx_logits - hf_logits).max() <= 1e-4 * max(1.0, float(np.abs(hf_logits).max()))
    program_logits = flatten_outputs(torch.export.load(str(out / "model.pt2")).module()(tokens))[0][1]
    assert np.abs(program_logits.detach().numpy() - hf_logits).max() <= 1e-4 * max(1.0, float(np.abs(hf_logits).max()))
