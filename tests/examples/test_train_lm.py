"""The example language model's script (a few steps on a tiny corpus: the saved folder reloads in
stock transformers and generates) and the committed model folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODEL = EXAMPLES / "lm" / "model"
sys.path.insert(0, str(EXAMPLES / "lm"))

train_lm = pytest.importorskip("train_lm")
transformers = pytest.importorskip("transformers")


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    for i in range(12):
        (folder / f"mod{i}.py").write_text(
            f'"""Module {i}."""\n\n' + "".join(f"def f{i}_{k}(x):\n    return x * {k} + {i}\n\n" for k in range(12)))
    (folder / "copy.py").write_text((folder / "mod0.py").read_text())  # deduplicated
    (folder / "latin.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: skipped
    return folder


def test_the_script_trains_saves_and_the_folder_reloads_and_generates(tmp_path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    out, splits = tmp_path / "model", tmp_path / "splits"
    record = train_lm.main(["--corpus", str(corpus), "--out", str(out), "--splits", str(splits), "--vocab", "300",
                            "--seq", "32", "--batch", "4", "--tokens", "600", "--warmup", "2", "--held-out", "0.25",
                            "--no-compile",
                            "--arch", "hidden=32,layers=1,heads=2,kv_heads=1,intermediate=64,head_dim=16"])
    assert record["corpus"]["documents"] == 12 and record["corpus"]["skipped"] == 2
    assert (record["corpus"]["train_documents"], record["corpus"]["held_out_documents"]) == (9, 3)
    assert len(list((splits / "recover").iterdir())) == 9 and len(list((splits / "heldout").iterdir())) == 3
    assert record["tokens_trained"] >= 600 and record["steps"] >= 1 and record["held_out_perplexity"] > 1
    saved = json.loads((out / "training.json").read_text())
    assert saved["seed"] == 0 and saved["sequence_length"] == 32 and len(saved["corpus"]["file_list_sha256"]) == 64
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 1
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    prompt = tokenizer("def f(x):", return_tensors="pt")
    assert prompt["input_ids"][0, 0] == tokenizer.bos_token_id
    text = "def f0_3(x):\n    return x * 3 + 0\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text  # lossless
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    with pytest.raises(SystemExit, match="another corpus or seed"):  # splits of a different seed are not mixed in
        train_lm.main(["--corpus", str(corpus), "--splits", str(splits), "--splits-only", "--seed", "1",
                       "--held-out", "0.25"])

    # --reuse-splits (a GPU machine with another Python): the same splits, no corpus read, same tokens
    (corpus / "mod1.py").unlink()  # the corpus changed: only the splits written above may be used
    again = train_lm.main(["--reuse-splits", "--out", str(tmp_path / "again"), "--splits", str(splits),
                           "--tokenizer", str(out), "--seq", "32", "--batch", "4", "--tokens", "600",
                           "--warmup", "2", "--no-compile",
                           "--arch", "hidden=32,layers=1,heads=2,kv_heads=1,intermediate=64,head_dim=16"])
    assert again["corpus"] == record["corpus"] and again["device"] == "cpu"
    assert (again["tokens_trained"], again["steps"]) == (record["tokens_trained"], record["steps"])
    assert again["held_out_perplexity"] == pytest.approx(record["held_out_perplexity"])  # same data, seed and model
    with pytest.raises(SystemExit, match="corpus.json is missing"):
        train_lm.main(["--reuse-splits", "--out", str(tmp_path / "x"), "--splits", str(tmp_path / "none"),
                       "--tokenizer", str(out)])


def test_training_without_the_mask_gives_the_masked_losses_on_right_padded_windows() -> None:
    arch = train_lm.parse_arch("hidden=32,layers=2,heads=2,kv_heads=1,intermediate=64,head_dim=16")
    model = train_lm.build_model(arch, 50, 16, seed=0)
    ids = torch.randint(3, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 9:], mask[2, 4:] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)  # right padding with the pad id
    labels = ids.masked_fill(mask == 0, -100)
    masked, count = train_lm.token_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    unmasked, count_unmasked = train_lm.window_loss(model, ids, labels)
    assert int(count) == int(count_unmasked) == int(mask[:, 1:].sum())
    torch.testing.assert_close(unmasked, masked)
    mask[1, 0] = 0  # a left pad would be seen: the equality holds for right padding only
    labels = ids.masked_fill(mask == 0, -100)
    masked, _ = train_lm.token_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert not torch.allclose(train_lm.window_loss(model, ids, labels)[0], masked)


@pytest.mark.skipif(not (MODEL / "training.json").is_file(), reason="the example model is not committed")
def test_the_committed_model_matches_its_record() -> None:
    record = json.loads((MODEL / "training.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    config = model.config
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert config.num_attention_heads > config.num_key_value_heads  # grouped-query attention
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert len(tokenizer) == record["vocab"] == model.get_input_embeddings().num_embeddings
    assert sum(f.stat().st_size for f in MODEL.iterdir()) <= 20 * 2**20
    with torch.no_grad():
        ids = tokenizer("import os\nimport sys\n", return_tensors="pt")["input_ids"]
        assert torch.isfinite(model(ids).logits).all()
