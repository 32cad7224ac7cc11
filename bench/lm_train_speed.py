"""Training throughput of the example LM's script (examples/lm/train_lm.py) at wider shapes, to
size a larger example (#29: how long would training a hidden-256..512 example take on this machine?).

Each shape is the script's own model (``build_model``: Llama, 4 layers, heads of 32, half as many
key-value heads, MLP 3 x hidden, vocabulary 2048, tied embeddings) trained by the script's own
step (``window_loss``, AdamW as the script sets it, gradient clipping), eager (``--compile`` off:
compiling every shape would cost about a minute each; the script's compiled step was 1.65x the
eager one at hidden 128, interleaved, bench/results/lm.md), batch 16 x 128 random tokens. The
shapes are timed interleaved: ``--rounds`` rounds of one step each, after one warm-up step each;
median seconds per step, tokens/s = 2,048 / that.

Usage: ``python bench/lm_train_speed.py [--hidden 128,256,384,512] [--rounds 4]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", default="128,256,384,512")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "examples" / "lm"))
    from train_lm import build_model, parse_arch, window_loss

    torch.set_num_threads(2)
    load_start = Path("/proc/loadavg").read_text().strip()
    runs = []
    for hidden in map(int, args.hidden.split(",")):
        heads = hidden // 32
        arch = parse_arch(f"hidden={hidden},heads={heads},kv_heads={max(1, heads // 2)},intermediate={3 * hidden}")
        model = build_model(arch, 2048, 128, 0).train()
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        runs.append((hidden, model, optimizer, []))
    ids = torch.randint(3, 2048, (args.batch, 128), generator=torch.Generator().manual_seed(0))

    def step(model, optimizer) -> float:
        started = time.perf_counter()
        loss, count = window_loss(model, ids, ids)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for _, model, optimizer, _ in runs:  # warm-up
        step(model, optimizer)
    for r in range(args.rounds):
        for k in range(len(runs)):
            _, model, optimizer, times = runs[(k + r) % len(runs)]
            times.append(step(model, optimizer))
    print(f"load {load_start} -> {Path('/proc/loadavg').read_text().strip()}")
    print("| hidden | parameters | non-embedding | s per step (median) | tokens/s |")
    print("|---|---|---|---|---|")
    for hidden, model, _, times in runs:
        params = sum(p.numel() for p in model.parameters())
        embedding = model.get_input_embeddings().weight.numel()
        seconds = statistics.median(times)
        print(f"| {hidden} | {params:,} | {params - embedding:,} | {seconds:.2f} | {args.batch * 128 / seconds:,.0f} |")


if __name__ == "__main__":
    main()
