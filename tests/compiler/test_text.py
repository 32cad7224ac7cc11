"""``text:PATH`` data: windows, batches, the split, and the refusals of bad input (a real
byte-level BPE tokenizer trained here in a fraction of a second, a real tiny Llama)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spruce.compiler.datasets import check_disjoint, inputs_of, load_data, loaders_from
from spruce.compiler.specs import DataError, check_data_source, check_data_spec
from spruce.compiler.text import load_text, windows_of

SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "with open('f.txt') as handle:\n    text = handle.read()\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(SNIPPETS * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def corpus(folder: Path, count: int = 20) -> Path:
    """``count`` distinct Python-like documents of a few windows each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        body = "".join(SNIPPETS[(i + k) % len(SNIPPETS)].replace("a", f"a{i}") for k in range(3))
        (folder / f"doc{i:02d}.py").write_text(f"# document {i}\n{body}")
    return folder


def test_batches_are_padded_windows_of_the_example_length(tmp_path, tokenizer) -> None:
    loaders = load_text(f"text:{corpus(tmp_path / 'c')}", tokenizer, 16, seed=0, batch_size=4)
    batch = next(iter(loaders.train))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (4, 16) and v.dtype == torch.int64 for v in batch.values())
    assert loaders.example.shape == (1, 16) and loaders.example.dtype == torch.int64
    for held in loaders.test:
        pads = held["attention_mask"] == 0
        assert (held["input_ids"][pads] == tokenizer.pad_token_id).all()
        assert (held["labels"][pads] == -100).all() and (held["labels"][~pads] == held["input_ids"][~pads]).all()
        # right padding: real tokens first
        assert (held["attention_mask"].diff(dim=1) <= 0).all()
    info = loaders.text
    assert info.sequence_length == 16 and info.recovery_documents == 18 and info.held_out_documents == 2
    real = sum(int(b["attention_mask"].sum()) for b in loaders.test)
    assert info.held_out_tokens == real and inputs_of(batch) is batch["input_ids"]


def test_windows_frame_each_document_with_bos_and_eos(tokenizer) -> None:
    ids = tokenizer(SNIPPETS[1], add_special_tokens=False)["input_ids"]
    windows = windows_of(ids, 8, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert [t for w in windows for t in w] == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    assert all(len(w) == 8 for w in windows[:-1]) and 2 <= len(windows[-1]) <= 8
    assert windows_of([5, 6, 7], 4, 1, 2)[-1] == [1, 5, 6, 7]  # a lone EOS window is dropped (nothing to predict)


def test_the_split_is_by_document_seeded_and_disjoint_by_content(tmp_path, tokenizer) -> None:
    folder = corpus(tmp_path / "c")
    (folder / "copy.py").write_text((folder / "doc03.py").read_text())  # a duplicate document
    first = load_text(f"text:{folder}", tokenizer, 16, seed=0)
    again = load_text(f"text:{folder}", tokenizer, 16, seed=0)
    other = load_text(f"text:{folder}", tokenizer, 16, seed=1)
    assert first.text.recovery_documents + first.text.held_out_documents == 20  # the copy was dropped
    assert first.text.held_out_texts == again.text.held_out_texts != other.text.held_out_texts
    assert check_disjoint(first, "text") > 0
    recovered = {t for b in first.train.dataset for t in [tuple(b["input_ids"].tolist())]}
    assert not any(tuple(b["input_ids"].tolist()) in recovered for b in first.test.dataset)


def test_recover_and_heldout_sub_folders_are_the_two_sets(tmp_path, tokenizer) -> None:
    corpus(tmp_path / "c" / "recover", 6)
    held = tmp_path / "c" / "heldout"
    held.mkdir()
    (held / "new.py").write_text("def sub(a, b):\n    return a - b\n" * 3)
    (held / "same.py").write_text((tmp_path / "c" / "recover" / "doc01.py").read_text())  # also recovery: dropped
    loaders = load_text(f"text:{tmp_path / 'c'}", tokenizer, 16)
    assert (loaders.text.recovery_documents, loaders.text.held_out_documents) == (6, 1)


def test_a_single_file_is_split_by_window(tmp_path, tokenizer) -> None:
    path = tmp_path / "one.py"
    path.write_text("".join(s.replace("a", f"a{i}") for i in range(6) for s in SNIPPETS))
    loaders = load_text(f"text:{path}", tokenizer, 16, batch_size=8)
    assert len(loaders.test.dataset) == len(loaders.train.dataset + loaders.test.dataset) // 10 > 0


def test_load_data_and_make_loaders_take_token_batches(tmp_path, tokenizer) -> None:
    spec = f"text:{corpus(tmp_path / 'c')}"
    check_data_spec(spec)
    check_data_source(spec)
    loaders = load_data(spec, 0, 4, torch.zeros(1, 16, dtype=torch.long), tokenizer=tokenizer,
                        embedding_rows=len(tokenizer))
    again = loaders_from(loaders.train, loaders.test, "make_loaders.py:make_loaders", "user")
    assert again.example.shape == (1, 16) and not again.labeled
    with pytest.raises(DataError, match="needs the model's tokenizer"):
        load_data(spec, 0, 4, torch.zeros(1, 16, dtype=torch.long))


def test_a_real_llama_trains_on_the_batches(tmp_path, tokenizer) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    loaders = load_text(f"text:{corpus(tmp_path / 'c')}", tokenizer, 16, batch_size=8,
                        embedding_rows=model.get_input_embeddings().num_embeddings)
    batch = next(iter(loaders.train))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --- bad input: one line naming the file or option, nothing read past the fault ---------------


def test_a_missing_path_is_refused_before_reading(tmp_path, tokenizer) -> None:
    spec = f"text:{tmp_path / 'nope'}"
    with pytest.raises(DataError, match="no such file or folder .*nope"):
        check_data_source(spec)
    with pytest.raises(DataError, match="no such file or folder .*nope"):
        load_text(spec, tokenizer, 16)
    with pytest.raises(DataError, match="write text:PATH"):
        check_data_spec("text:")


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"  \n\n", "empty"),
    (b"def f():\x00\x01 pass\n", "binary"),
    (b"caf\xe9 = 1\n", "not UTF-8"),
])
def test_an_empty_or_binary_file_is_refused_by_name(tmp_path, tokenizer, content, message) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as raised:
        load_text(f"text:{path}", tokenizer, 16)
    assert "bad.txt" in str(raised.value) and "\n" not in str(raised.value)


def test_a_binary_file_in_a_folder_is_named_and_empty_files_are_skipped(tmp_path, tokenizer) -> None:
    folder = corpus(tmp_path / "c", 4)
    (folder / "__init__.py").write_text("")
    assert load_text(f"text:{folder}", tokenizer, 16).text.recovery_documents == 3
    (folder / "sub").mkdir()
    (folder / "sub" / "cache.pyc").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"sub/cache.pyc is binary"):
        load_text(f"text:{folder}", tokenizer, 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_text("\n")
    with pytest.raises(DataError, match="holds no non-empty text file"):
        load_text(f"text:{empty}", tokenizer, 16)


def test_text_shorter_than_one_window_is_refused(tmp_path, tokenizer) -> None:
    path = tmp_path / "short.py"
    path.write_text("x = 1\n")
    with pytest.raises(DataError, match="fewer than one window of 64"):
        load_text(f"text:{path}", tokenizer, 64)


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_reading(tmp_path, tokenizer) -> None:
    with pytest.raises(DataError, match=f"tokenizer has {len(tokenizer)} tokens but .* 100 rows"):
        load_text(f"text:{tmp_path / 'not read'}", tokenizer, 16, embedding_rows=100)
    load_text(f"text:{corpus(tmp_path / 'c')}", tokenizer, 16, embedding_rows=len(tokenizer) + 64)  # padded: fine
