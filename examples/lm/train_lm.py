"""Train the example language model: a byte-level BPE tokenizer and a small Llama-style decoder
(GQA, RMSNorm, SwiGLU, rotary position embeddings, tied input/output embeddings) on the Python
standard library's source, which exists offline wherever Python does.

Corpus: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded)
that reads as UTF-8 text, deduplicated by content; the Python version and the sha256 of the sorted
relative file list are recorded. Split by file with a fixed seed (``--held-out`` of the files held
out). The splits are written as text files to ``SPLITS/recover/`` (the training split) and
``SPLITS/heldout/``, so ``spruce compile MODEL --data text:SPLITS`` recovers on the training text
and evaluates on text the model never saw (``--data text:SPLITS/recover`` splits the training text
itself).

Windows: the scheme of ``spruce.compiler.text`` (one file per window, ``[BOS] text [EOS]`` cut
into windows of ``--seq`` tokens, the last one padded; losses skip pads), so the held-out
perplexity here is the one ``spruce compile`` measures on ``text:SPLITS``.

Saves to ``OUT`` with ``save_pretrained``: the model (safetensors), the tokenizer (fast), the
generation config, and ``training.json`` (seed, tokens trained on, steps, sequence length,
held-out perplexity, Python version, corpus hash, wall time, the command).

The committed model (``examples/lm/model``) was made with the defaults (its ``training.json``
holds the command as run; CPU, 2 threads; another thread count may differ in the last bits)::

    python examples/lm/train_lm.py --out examples/lm/model --splits /tmp/stdlib_text --seed 0

``--arch hidden=128,layers=4,heads=2,kv_heads=1,intermediate=192,head_dim=32`` overrides shapes
(the capacity gate trains a compressed architecture from scratch on the same tokens, with
``--tokenizer examples/lm/model``);
``--splits-only`` writes the text splits and stops (seconds; what compile needs).

``--device cuda`` trains on a GPU (the same script, seed and batches; not bitwise equal to a CPU
run). ``--reuse-splits`` takes the splits already in ``SPLITS`` as they are (their ``corpus.json``
is recorded) instead of reading this Python's standard library: on a machine with another Python the
corpus would differ, so a GPU run trains on the splits written here (copied there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

# The committed model's shapes (examples/lm/model); --arch overrides any of them.
DEFAULT_ARCH = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 384, "head_dim": 32}
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad, BOS, EOS (LlamaConfig's defaults for BOS/EOS)


def stdlib_corpus(root: Path) -> tuple[list[tuple[str, str]], dict]:
    """``(relative path, text)`` of every ``*.py`` under ``root`` that is UTF-8 text without NUL
    bytes (``site-packages`` excluded), deduplicated by content, sorted by path; and a record of
    the corpus (Python version, file counts, sha256 of the sorted relative file list)."""
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and not {"site-packages", "dist-packages", "__pycache__"} & set(p.parts))
    documents, seen, skipped = [], set(), 0
    for path in files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        digest = hashlib.sha256(raw).digest()
        if b"\x00" in raw or not text.strip() or digest in seen:
            skipped += 1
            continue
        seen.add(digest)
        documents.append((path.relative_to(root).as_posix(), text))
    listing = "\n".join(path.relative_to(root).as_posix() for path in files)
    record = {"python": sys.version.split()[0], "root": "stdlib" if root == _stdlib() else str(root),
              "files": len(files), "documents": len(documents), "skipped": skipped,
              "file_list_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    return documents, record


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_documents(documents: list, held_out: float, seed: int) -> tuple[list, list]:
    """Training and held-out documents: a seeded permutation holds out ``held_out`` of them."""
    order = np.random.default_rng(seed).permutation(len(documents))
    held = set(order[:max(1, round(held_out * len(documents)))].tolist())
    return ([d for i, d in enumerate(documents) if i not in held], [d for i, d in enumerate(documents) if i in held])


def write_splits(folder: Path, train: list, held: list) -> None:
    """The two splits as text files under ``folder/recover`` and ``folder/heldout``."""
    for sub, documents in (("recover", train), ("heldout", held)):
        for name, text in documents:
            path = folder / sub / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer (every byte has a token, so nothing is unknown: the byte
    fallback) with ``<pad>``, ``<s>`` (BOS, added before a text) and ``</s>`` (EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def parse_arch(text: str | None) -> dict:
    """``hidden=256,layers=4`` over :data:`DEFAULT_ARCH`."""
    arch = dict(DEFAULT_ARCH)
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in arch:
            raise SystemExit(f"--arch: unknown key {key!r}; keys: {', '.join(arch)}")
        arch[key] = int(value)
    return arch


def build_model(arch: dict, vocab: int, seq: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=arch["hidden"], num_hidden_layers=arch["layers"],
                         num_attention_heads=arch["heads"], num_key_value_heads=arch["kv_heads"],
                         intermediate_size=arch["intermediate"], head_dim=arch["head_dim"], hidden_act="silu",
                         max_position_embeddings=max(512, seq), rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def token_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (nats) over positions whose target is not -100, and their
    count (a 0-d tensor, so a compiled step does not leave the graph to read it)."""
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


def window_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_sum` of a training batch, run without its attention mask: windows are
    right-padded, so under causal attention no real token sees a pad and the losses on real tokens
    equal the masked ones, while attention keeps its fused causal kernel (no mask tensor built)."""
    return token_sum(model(input_ids=input_ids).logits, labels)


@torch.no_grad()
def perplexity(model, loader, device: torch.device | str = "cpu") -> float:
    """exp(mean next-token cross-entropy) over every real target token of ``loader``."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        loss, n = token_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
        total, count = total + float(loss), count + int(n)
    model.train()
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the model folder to write")
    parser.add_argument("--splits", type=Path, required=True, help="folder for the text splits (recover/, heldout/)")
    parser.add_argument("--corpus", type=Path, default=None, help="a folder of *.py (default: the stdlib)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=float, default=3e5, help="real tokens to train on")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--held-out", type=float, default=0.03, help="fraction of files held out")
    parser.add_argument("--eval-windows", type=int, default=400, help="held-out windows evaluated (0: all)")
    parser.add_argument("--arch", default=None, help="shape overrides, e.g. heads=4,kv_heads=2,intermediate=384")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="reuse the tokenizer of this model folder (the capacity gate: the same tokens)")
    parser.add_argument("--tokenizer-chars", type=float, default=8e6,
                        help="characters of training text (seeded order) the tokenizer is trained on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the training step's forward and backward (about 2x the tokens/s on CPU)")
    parser.add_argument("--splits-only", action="store_true", help="write the text splits and stop")
    parser.add_argument("--reuse-splits", action="store_true",
                        help="train on the splits already in SPLITS (their corpus.json) without reading the stdlib")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    args = parser.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)

    marker = args.splits / "corpus.json"
    if args.reuse_splits:
        if not marker.is_file():
            raise SystemExit(f"--reuse-splits: {marker} is missing; write the splits first (--splits-only)")
        if args.tokenizer is None:
            raise SystemExit("--reuse-splits needs --tokenizer (training one reads the documents)")
        corpus, train_docs = json.loads(marker.read_text()), []
    else:
        root = args.corpus or _stdlib()
        documents, corpus = stdlib_corpus(root)
        train_docs, held_docs = split_documents(documents, args.held_out, args.seed)
        corpus.update(train_documents=len(train_docs), held_out_documents=len(held_docs), split_seed=args.seed,
                      held_out_fraction=args.held_out)
    if marker.is_file():
        if json.loads(marker.read_text()) != corpus:
            raise SystemExit(f"{args.splits} holds splits of another corpus or seed ({marker}); give an empty folder")
    else:
        write_splits(args.splits, train_docs, held_docs)
        marker.write_text(json.dumps(corpus, indent=1) + "\n")
    if args.splits_only:
        print(json.dumps(corpus))
        return corpus
    if args.out is None:
        raise SystemExit("--out is required unless --splits-only")

    from spruce.compiler.text import load_text, load_tokenizer
    from torch.utils.data import DataLoader, Subset

    torch.manual_seed(args.seed)
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        sample, chars = [], 0
        for i in np.random.default_rng(args.seed).permutation(len(train_docs)):
            if chars >= args.tokenizer_chars:
                break
            sample.append(train_docs[i][1])
            chars += len(train_docs[i][1])
        tokenizer = train_tokenizer(sample, args.vocab)
    data = load_text(f"text:{args.splits}", tokenizer, args.seq, args.seed, args.batch, len(tokenizer))
    held = data.test.dataset
    if args.eval_windows and len(held) > args.eval_windows:
        held = Subset(held, np.random.default_rng(args.seed).permutation(len(held))[:args.eval_windows].tolist())
    held_loader = DataLoader(held, batch_size=64)
    arch = parse_arch(args.arch)
    device = torch.device(args.device)
    model = build_model(arch, len(tokenizer), args.seq, args.seed).to(device)
    params = sum(p.numel() for p in model.parameters())
    budget = int(args.tokens)
    steps = math.ceil(budget / (args.batch * args.seq * 0.9))  # an estimate for the schedule (pads ~10 %)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    print(f"{params:,} parameters, arch {arch}, {data.text.recovery_tokens:,} training tokens available, "
          f"budget {budget:,}, ~{steps} steps", flush=True)
    model.train()
    model.config.use_cache = False
    training_loss = torch.compile(window_loss, dynamic=False) if args.compile else window_loss
    seen = step = 0
    tick = time.time()
    while seen < budget:
        for batch in data.train:
            loss, count = training_loss(model, batch["input_ids"].to(device), batch["labels"].to(device))
            (loss / count).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            seen += int(batch["attention_mask"].sum())
            step += 1
            if step % 50 == 0:
                rate = seen / (time.time() - tick)
                print(f"step {step} tokens {seen:,} loss {float(loss / count):.3f} {rate:,.0f} tok/s "
                      f"{time.strftime('%H:%M:%S')}", flush=True)
            if seen >= budget:
                break
    train_seconds = time.time() - tick
    held_ppl = perplexity(model, held_loader, device)
    record = {"seed": args.seed, "tokens_trained": seen, "steps": step, "batch": args.batch,
              "sequence_length": args.seq, "held_out_perplexity": round(held_ppl, 4),
              "held_out_windows": len(held), "held_out_tokens": int(sum(int(held[i]["attention_mask"].sum())
                                                                        for i in range(len(held)))),
              "vocab": len(tokenizer), "tokenizer": str(args.tokenizer) if args.tokenizer else "trained",
              "arch": arch, "parameters": params, "lr": args.lr,
              "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
              "corpus": corpus, "torch": torch.__version__, "device": str(device),
              "command": "python examples/lm/train_lm.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    args.out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    model.generation_config.save_pretrained(args.out)
    tmp = args.out / "training.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, args.out / "training.json")
    print(json.dumps({k: v for k, v in record.items() if k != "corpus"}), flush=True)
    return record


if __name__ == "__main__":
    main()
