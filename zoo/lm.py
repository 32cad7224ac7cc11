"""A tiny *trained* causal language model for tests: a byte-level BPE tokenizer and a
Llama-style decoder (GQA, RMSNorm, SwiGLU, rotary, tied embeddings) trained for a few hundred
steps on Python standard-library source, saved as a transformers folder (model, tokenizer,
generation config, and ``training.json`` recording the tokens it was trained on).

It is small enough to train in seconds on two cores; the examples/ language model is the
acceptance model. transformers and tokenizers are imported only when :func:`train_tiny_lm` runs.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ..targets.files import atomic_write_text

__all__ = ["TinyLM", "stdlib_text", "token_batches", "train_tiny_lm"]

STDLIB_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py",
                "colorsys.py", "keyword.py", "reprlib.py", "graphlib.py", "numbers.py")
HELD_OUT_FILES = ("netrc.py", "sched.py")


def stdlib_text(names: tuple[str, ...] = STDLIB_FILES) -> str:
    """The concatenated source of standard-library modules ``names`` (files of the running Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((root / name).read_text(encoding="utf-8") for name in names if (root / name).is_file())


@dataclass(frozen=True)
class TinyLM:
    """A trained tiny LM saved at ``folder``; ``train`` and ``held_out`` are token batches
    (lists of (N, L) int64 tensors, disjoint files); ``seq_len`` is L; ``pad_id`` the tokenizer's pad."""

    folder: Path
    train: list[torch.Tensor]
    held_out: list[torch.Tensor]
    seq_len: int
    pad_id: int


def token_batches(ids: list[int], seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """``ids`` cut into sequences of ``seq_len`` (the remainder dropped), batched (N, L) int64."""
    count = len(ids) // seq_len
    rows = torch.tensor(ids[:count * seq_len], dtype=torch.long).reshape(count, seq_len)
    return [rows[i:i + batch_size] for i in range(0, count, batch_size)]


def train_tiny_lm(folder: Path, *, vocab: int = 384, hidden: int = 64, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, intermediate: int = 192, seq_len: int = 64, batch_size: int = 16,
                  steps: int = 300, lr: float = 3e-3, seed: int = 0) -> TinyLM:
    """Train the tokenizer and the model (AdamW, cosine decay, ``steps`` steps, ``seed``) and
    ``save_pretrained`` both into ``folder``; returns the :class:`TinyLM`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    torch.manual_seed(seed)
    text, held_text = stdlib_text(), stdlib_text(HELD_OUT_FILES)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>")
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4 * seq_len, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    train = token_batches(tokenizer(text)["input_ids"], seq_len, batch_size)
    held_out = token_batches(tokenizer(held_text)["input_ids"], seq_len, batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + torch.cos(
        torch.tensor(torch.pi * min(s, steps) / steps)).item()))
    model.train()
    for step in range(steps):
        batch = train[step % len(train)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    trained_tokens = steps * batch_size * seq_len
    atomic_write_text(folder / "training.json", json.dumps({"tokens_trained": trained_tokens, "seq_len": seq_len,
                                                            "steps": steps, "seed": seed}) + "\n")
    return TinyLM(folder, train, held_out, seq_len, int(tokenizer.pad_token_id))
