"""GPU measurements (run on a CUDA machine): torch 2:4 semi-structured speed-up of MLP blocks.

``python bench/gpu.py mlp --json FILE``: for an MLP block ``Linear(d, 4d) -> GELU ->
Linear(4d, d)`` at fp16 and widths ``d`` in {2048, 4096, 8192}, with a batch of
``--tokens`` rows, compares the dense block with the same block whose two weights
carry spruce's 2:4 magnitude mask (``nm_mask``) and are converted with
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, and CUTLASS where torch
offers it). Timing: CUDA events, ``--warmup`` untimed then ``--iters`` timed
forward passes, median. Also checks the sparse block's output against the
masked dense block's.

``python bench/gpu.py craft --artifact DIR --json FILE``: the trained CRAFT compiled to 2:4 for
torch (``spruce compile examples/craft.py:make --recipe examples/craft.yaml --data images:D
--structure 2:4 --sparsity 0.5 --target torch --recover none --out DIR``; ``model.pt`` in DIR)
on CUDA at fp16, batch ``--batch``, 256 x 384. torch's semi-structured kernels take a 2-D
sparse operand of ``F.linear`` only, so every 2:4 convolution runs as im2col + ``F.linear``
(:class:`UnfoldConv`: the weight laid out (out, kh, kw, in) so the 2:4 groups of input channels
are consecutive in each row) with the weight converted by ``to_sparse_semi_structured``;
layers whose shape the kernels refuse stay dense and are counted. Three models are timed
interleaved: dense cuDNN (the masked model as is), the same im2col model with dense weights
(what im2col costs), and the im2col model with 2:4 weights; the output is checked against
the masked model's. Without CUDA it prints why and exits 0 without writing anything.
``python bench/gpu.py render-craft --craft D.json`` replaces the CRAFT section of
``bench/results/gpu.md`` (keeping the others) with the table from D.json.

``python bench/gpu.py lm --dense DIR --compiled DIR``: a causal LM's ``generate`` tokens/s on CUDA
in bf16, dense (its transformers folder, e.g. ``examples/lm/model``) against compiled (the ``hf/``
folder of its ``spruce compile`` output), loaded with stock ``transformers`` and no spruce import.
Greedy, ``--new-tokens`` new tokens after held-out-like prompts (random token ids of
``--prompt-tokens``, left-padded at batch 8; ``pad_token_id`` set), batch 1 and 8; the two models
interleaved over ``--rounds`` rounds (CUDA-synchronised wall time, median). Decode tokens/s
excludes the prefill: (time of ``new_tokens`` tokens - time of 1 token) per generated token. The
greedy tokens of dense and compiled are compared (the fraction that agree). At most ~10 minutes
for models of the example's size; without CUDA it prints why and exits 0 without writing anything. Writes its section of
``bench/results/gpu.md`` (``--into``, other sections kept) and ``--json``.

``python bench/gpu.py lm-gate --splits DIR --out DIR --gate-json FILE``: issue 29's capacity gate on a
GPU, where training to ~20 tokens per parameter takes minutes (hours on 2 CPU cores). Trains the dense
example (``--arch``, default the hidden-256 shape of ``bench/results/lm.md``) and then the gate's shape
(``--gate-arch``, the shape ``spruce compile --budget latency=0.5`` selected on the hidden-256 model)
from scratch by ``examples/lm/train_lm.py`` on the same ``--tokens`` tokens, order and seed
(``--reuse-splits``: the splits written here, copied there, so the corpus is this machine's), and
writes the dense folder to ``--out`` and both records with the ratio to ``--gate-json``. Without CUDA it
prints why and exits 0 (``--device cpu`` runs it on the CPU, for a dry run with few tokens).

``python bench/gpu.py render --mlp A.json [--craft D.json] [--default B.json] [--tables C.json]
--out bench/results/gpu.md`` writes the results file (atomically) from the JSON the GPU runs produced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import benchlib

WIDTHS = (2048, 4096, 8192)


def _time_cuda(module, x, warmup: int, iters: int) -> float:
    """Median milliseconds of ``module(x)`` measured with CUDA events."""
    import torch

    for _ in range(warmup):
        module(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        module(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_mlp(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from spruce.passes.sparsity.masking import nm_mask
    from torch import nn
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    torch.manual_seed(0)
    rows = []
    for width in WIDTHS:
        block = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        block = block.half().cuda().eval()
        with torch.no_grad():
            for layer in (block[0], block[2]):
                layer.weight.mul_(nm_mask(layer.weight.abs().float(), 2, 4).to(layer.weight.dtype))
        x = torch.randn(args.tokens, width, dtype=torch.float16, device="cuda")
        with torch.inference_mode():
            expected = block(x)
            dense_ms = _time_cuda(block, x, args.warmup, args.iters)
            record: dict[str, Any] = {"width": width, "tokens": args.tokens, "dense_ms": dense_ms}
            dense_weights = [block[0].weight.detach().clone(), block[2].weight.detach().clone()]
            for backend in ("cusparselt", "cutlass"):
                SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
                try:
                    for layer, weight in zip((block[0], block[2]), dense_weights):
                        layer.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
                    got = block(x)
                    error = float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
                    sparse_ms = _time_cuda(block, x, args.warmup, args.iters)
                    record[backend] = {"ms": sparse_ms, "speedup": dense_ms / sparse_ms, "rel_error": error}
                except Exception as exc:  # a backend torch lacks on this GPU is reported, not fatal
                    record[backend] = {"error": benchlib.short_error(exc)}
                finally:
                    for layer, weight in zip((block[0], block[2]), dense_weights):
                        layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
        rows.append(record)
        print(json.dumps(record), flush=True)
    info = benchlib.machine_info()
    info["gpu"] = torch.cuda.get_device_name()
    info["cuda"] = str(torch.version.cuda)
    return {"info": info, "warmup": args.warmup, "iters": args.iters, "rows": rows}


class UnfoldConv:
    """A 2-D convolution (groups 1) as im2col + ``F.linear``, so its weight can be a 2-D
    semi-structured sparse tensor. ``weight`` (out, in, kh, kw) is stored as (out, kh * kw * in):
    the input channels are innermost, so a 2:4 group of 4 consecutive input channels (spruce's
    layout) stays 4 consecutive entries of a row. Input (N, in, H, W) -> (N, out, H', W')."""

    def __init__(self, conv: Any) -> None:
        import torch

        self.conv = conv
        out_channels, in_channels, kh, kw = conv.weight.shape
        self.shape = (out_channels, in_channels, kh, kw)
        self.weight = conv.weight.detach().permute(0, 2, 3, 1).reshape(out_channels, -1).contiguous()
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.torch = torch

    def __call__(self, x: Any) -> Any:
        functional = self.torch.nn.functional
        conv, (out_channels, in_channels, kh, kw) = self.conv, self.shape
        batch, _, height, width = x.shape
        cols = functional.unfold(x, (kh, kw), dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        out_h = (height + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
        out_w = (width + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
        # (N, in * kh * kw, L), in-major -> (N * L, kh * kw * in), channels innermost
        cols = cols.view(batch, in_channels, kh * kw, -1).permute(0, 3, 2, 1).reshape(-1, kh * kw * in_channels)
        out = functional.linear(cols, self.weight, self.bias)
        return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)


def unfold_model(model: Any, sparse: bool) -> tuple[Any, int, list[str]]:
    """A deep copy of ``model`` whose 2:4 convolutions (groups 1, input channels a multiple of
    4) run as :class:`UnfoldConv`, with semi-structured weights if ``sparse``; returns it, the
    number converted and, per layer the kernels refused, ``name: error``."""
    import copy

    import torch
    from torch.sparse import to_sparse_semi_structured

    model = copy.deepcopy(model)
    converted, refused = 0, []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Conv2d) or module.groups != 1 or module.weight.shape[1] % 4:
            continue
        layer = UnfoldConv(module)
        if sparse:
            try:
                layer.weight = to_sparse_semi_structured(layer.weight)
                layer(torch.zeros(1, module.in_channels, 16, 16, dtype=module.weight.dtype,
                                  device=module.weight.device))
            except Exception as exc:  # a shape the kernels refuse: the layer stays a dense cuDNN conv
                refused.append(f"{name}: {benchlib.short_error(exc, 120)}")
                continue
        module.forward = layer
        converted += 1
    return model, converted, refused


def run_craft(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py craft: skipped, no CUDA device (torch.cuda.is_available() is False); "
              "nothing written", flush=True)
        return None
    masked = torch.load(Path(args.artifact) / "model.pt", weights_only=False).half().cuda().eval()
    x = torch.randn(args.batch, 3, 256, 384, dtype=torch.float16, device="cuda")
    dense_unfold, n_dense, _ = unfold_model(masked, sparse=False)
    sparse_unfold, n_sparse, refused = unfold_model(masked, sparse=True)

    def first(out: Any) -> Any:
        return out[0] if isinstance(out, (tuple, list)) else out

    with torch.inference_mode():
        expected = first(masked(x)).float()
        errors = {name: float((first(m(x)).float() - expected).abs().max() / expected.abs().max())
                  for name, m in (("im2col_dense", dense_unfold), ("im2col_2to4", sparse_unfold))}
        times: dict[str, list[float]] = {"cudnn_dense": [], "im2col_dense": [], "im2col_2to4": []}
        for _ in range(args.rounds):  # interleaved rounds, the median of each round's medians
            for name, model in (("cudnn_dense", masked), ("im2col_dense", dense_unfold),
                                ("im2col_2to4", sparse_unfold)):
                times[name].append(_time_cuda(model, x, args.warmup, args.iters))
    info = benchlib.machine_info()
    info["gpu"] = torch.cuda.get_device_name()
    info["cuda"] = str(torch.version.cuda)
    result = {"info": info, "artifact": str(args.artifact), "batch": args.batch, "warmup": args.warmup,
              "iters": args.iters, "rounds": args.rounds, "ms": {k: statistics.median(v) for k, v in times.items()},
              "rel_error": errors, "converted": n_sparse, "eligible": n_dense, "refused": refused}
    print(json.dumps(result["ms"]), flush=True)
    return result


def render_craft(craft: dict[str, Any]) -> list[str]:
    ms = craft["ms"]
    return [f"{CRAFT_SECTION} (`bench/gpu.py craft`)", "",
            f"`{craft['artifact']}` (the trained CRAFT, `--structure 2:4 --target torch`), fp16, batch "
            f"{craft['batch']}, 256 x 384; CUDA events, {craft['rounds']} interleaved rounds of {craft['warmup']} "
            f"warm-up + {craft['iters']} timed forwards, median. {craft['converted']} of {craft['eligible']} 2:4 "
            f"convolutions ran on the semi-structured kernels (im2col + F.linear); refused: "
            f"{'; '.join(craft['refused']) or 'none'}.", "", *benchlib.header_lines(craft["info"]), "",
            *benchlib.markdown_table(
                ["model", "ms", "vs cuDNN dense", "rel error vs masked model"],
                [[name, benchlib.fmt(value, 3), f"{ms['cudnn_dense'] / value:.2f}x",
                  f"{craft['rel_error'][name]:.1e}" if name in craft["rel_error"] else "-"]
                 for name, value in ms.items()]), ""]


CRAFT_SECTION = "## CRAFT 2:4 artifact on CUDA"
LM_SECTION = "## Language model generate on CUDA (bf16)"


def _generate_seconds(model: Any, ids: Any, mask: Any, new_tokens: int, pad: int) -> float:
    """Wall seconds of one greedy ``generate`` of exactly ``new_tokens`` tokens (CUDA-synchronised)."""
    import time

    import torch

    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, pad_token_id=pad)
    sync()
    return time.perf_counter() - start


def run_lm(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py lm: skipped, no CUDA device (torch.cuda.is_available() is False); nothing written",
              flush=True)
        return None
    from transformers import AutoModelForCausalLM

    models = {which: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(args.device).eval()
              for which, folder in (("dense", args.dense), ("compiled", args.compiled))}
    config = models["dense"].config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    generator = torch.Generator().manual_seed(0)
    rows, agreement = [], {}
    for batch in (1, 8):
        lengths = [max(2, args.prompt_tokens - 3 * k) for k in range(batch)]  # different lengths: left padding
        ids = torch.full((batch, args.prompt_tokens), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, length in enumerate(lengths):
            ids[k, -length:] = torch.randint(3, config.vocab_size, (length,), generator=generator)
            mask[k, -length:] = 1
        ids, mask = ids.to(args.device), mask.to(args.device)
        with torch.inference_mode():
            tokens = {which: m.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        pad_token_id=pad)[:, ids.shape[1]:] for which, m in models.items()}
            agreement[str(batch)] = float((tokens["dense"] == tokens["compiled"]).float().mean())
            for m in models.values():  # warm-up
                for _ in range(args.warmup):
                    _generate_seconds(m, ids, mask, args.new_tokens, pad)
            full = {which: [] for which in models}
            one = {which: [] for which in models}
            for r in range(args.rounds):  # interleaved, the order alternating
                for which in (list(models) if r % 2 == 0 else list(models)[::-1]):
                    full[which].append(_generate_seconds(models[which], ids, mask, args.new_tokens, pad))
                    one[which].append(_generate_seconds(models[which], ids, mask, 1, pad))
        for which in models:
            total, first = statistics.median(full[which]), statistics.median(one[which])
            decode_s = max(total - first, 1e-9) / (args.new_tokens - 1)
            rows.append({"which": which, "batch": batch, "generate_s": total, "prefill_and_first_s": first,
                         "generate_tokens_per_s": batch * args.new_tokens / total,
                         "decode_ms_per_step": 1e3 * decode_s, "decode_tokens_per_s": batch / decode_s})
    info = benchlib.machine_info(("transformers",))
    info["gpu"] = torch.cuda.get_device_name() if args.device == "cuda" else "none (--device cpu: a dry run)"
    info["cuda"] = str(torch.version.cuda)
    params = {which: sum(p.numel() for p in m.parameters()) for which, m in models.items()}
    result = {"info": info, "dense": str(args.dense), "compiled": str(args.compiled), "rows": rows,
              "agreement": agreement, "params": params, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup}
    print(json.dumps(rows), flush=True)
    return result


def render_lm(lm: dict[str, Any]) -> list[str]:
    by = {(r["which"], r["batch"]): r for r in lm["rows"]}
    table = []
    for batch in sorted({r["batch"] for r in lm["rows"]}):
        d, c = by["dense", batch], by["compiled", batch]
        table.append([batch, benchlib.fmt(d["decode_tokens_per_s"], 1), benchlib.fmt(c["decode_tokens_per_s"], 1),
                      f"{c['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}x",
                      benchlib.fmt(d["generate_tokens_per_s"], 1), benchlib.fmt(c["generate_tokens_per_s"], 1),
                      f"{lm['agreement'][str(batch)]:.3f}"])
    return [f"{LM_SECTION} (`bench/gpu.py lm`)", "",
            f"Dense `{lm['dense']}` ({lm['params']['dense']:,} parameters) against compiled `{lm['compiled']}` "
            f"({lm['params']['compiled']:,}), both loaded by stock transformers in bf16; greedy `generate` of "
            f"{lm['new_tokens']} tokens after random prompts of up to {lm['prompt_tokens']} tokens (left-padded at "
            f"batch 8), {lm['rounds']} interleaved rounds after {lm['warmup']} warm-ups, medians. Decode tokens/s "
            "leaves the prefill out: (time of all tokens - time of the first) per step.", "",
            *benchlib.header_lines(lm["info"]), "",
            *benchlib.markdown_table(["batch", "dense decode tok/s", "compiled decode tok/s", "speed-up",
                                      "dense generate tok/s", "compiled generate tok/s", "greedy token agreement"],
                                     table), ""]


def replace_section(text: str, heading: str, lines: list[str]) -> str:
    """``text`` (Markdown) with the section that starts with ``heading`` (up to the next
    ``## `` heading or the end) replaced by ``lines``, or ``lines`` appended when it has none."""
    kept = text.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(kept) if line.startswith(heading)), None)
    if start is None:
        return "\n".join([*kept, "", *lines]).rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(kept)) if kept[i].startswith("## ")), len(kept))
    return "\n".join([*kept[:start], *lines, *kept[end:]]).rstrip("\n") + "\n"


def render(args: argparse.Namespace) -> None:
    mlp = json.loads(Path(args.mlp).read_text())
    lines = ["# GPU measurements", ""]
    lines += benchlib.header_lines(mlp["info"])
    lines += ["", "## torch 2:4 semi-structured MLP block (fp16)", "",
              f"Block Linear(d, 4d) -> GELU -> Linear(4d, d), both weights with spruce's 2:4 magnitude mask, "
              f"{mlp['rows'][0]['tokens']} rows per batch; CUDA-event timing, {mlp['warmup']} warm-up + "
              f"{mlp['iters']} timed forwards, median. rel error = max|sparse - masked dense| / max|masked dense|.",
              ""]
    table = []
    for row in mlp["rows"]:
        cells = [row["width"], benchlib.fmt(row["dense_ms"], 3)]
        for backend in ("cusparselt", "cutlass"):
            result = row[backend]
            if "error" in result:
                cells += ["-", "-", result["error"]]
            else:
                cells += [benchlib.fmt(result["ms"], 3), f"{result['speedup']:.2f}x", f"{result['rel_error']:.1e}"]
        table.append(cells)
    lines += benchlib.markdown_table(
        ["d", "dense ms", "cuSPARSELt ms", "cuSPARSELt speed-up", "rel error", "CUTLASS ms", "CUTLASS speed-up",
         "rel error"], table)
    speedups = {row["width"]: row["cusparselt"].get("speedup") for row in mlp["rows"]}
    lines += ["", "Reading: " + ", ".join(f"d = {w}: {v:.2f}x" if v else f"d = {w}: -" for w, v in speedups.items())
              + " with cuSPARSELt. The 2:4 path pays only once the GEMMs are large enough; at small widths the "
              "dense fp16 GEMM already runs near peak and the sparse kernel's overheads dominate. torch's CUTLASS "
              "2:4 kernels run on compute capability 8.x only, so on this H100 (9.0) cuSPARSELt is the backend."]
    if args.craft:
        lines += ["", *render_craft(json.loads(Path(args.craft).read_text()))]
    for extra in (args.default, args.tables):
        if extra:
            lines += ["", *json.loads(Path(extra).read_text())["markdown"]]
    benchlib.write_atomic(Path(args.out), "\n".join(lines) + "\n")


# The hidden-256 example of bench/results/lm.md, and the shapes compile selected on it at latency=0.5
LM_GATE_ARCH = "hidden=256,layers=4,heads=8,kv_heads=2,intermediate=768,head_dim=32"
LM_GATE_SHAPE = "hidden=144,layers=4,heads=2,kv_heads=2,intermediate=767,head_dim=32"


def run_lm_gate(args: argparse.Namespace) -> dict[str, Any] | None:
    import tempfile

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("lm-gate: no CUDA device here; nothing written")
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "lm"))
    import train_lm

    common = ["--splits", args.splits, "--reuse-splits", "--tokenizer", args.tokenizer, "--seed", str(args.seed),
              "--tokens", str(args.tokens), "--batch", str(args.batch), "--device", args.device]
    dense = train_lm.main([*common, "--out", args.out, "--arch", args.arch])
    with tempfile.TemporaryDirectory() as gate_dir:  # only the gate's record is kept
        gate = train_lm.main([*common, "--out", gate_dir, "--arch", args.gate_arch])
    ratio = gate["held_out_perplexity"] / dense["held_out_perplexity"]
    result = {"dense": dense, "gate": gate, "ratio": ratio, "passes": ratio >= 1.2,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    Path(args.gate_json).write_text(json.dumps(result, indent=1))
    print(json.dumps({"ratio": ratio, "dense_ppl": dense["held_out_perplexity"],
                      "gate_ppl": gate["held_out_perplexity"]}))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mlp = sub.add_parser("mlp")
    mlp.add_argument("--tokens", type=int, default=8192)
    mlp.add_argument("--warmup", type=int, default=20)
    mlp.add_argument("--iters", type=int, default=100)
    mlp.add_argument("--json", required=True)
    craft = sub.add_parser("craft")
    craft.add_argument("--artifact", required=True, help="a spruce compile output folder (its model.pt)")
    craft.add_argument("--batch", type=int, default=1)
    craft.add_argument("--warmup", type=int, default=10)
    craft.add_argument("--iters", type=int, default=50)
    craft.add_argument("--rounds", type=int, default=3)
    craft.add_argument("--json", required=True)
    lm = sub.add_parser("lm")
    lm.add_argument("--dense", required=True, help="the dense model's transformers folder")
    lm.add_argument("--compiled", required=True, help="the compiled model's transformers folder (OUT/hf)")
    lm.add_argument("--prompt-tokens", type=int, default=64)
    lm.add_argument("--new-tokens", type=int, default=64)
    lm.add_argument("--warmup", type=int, default=2)
    lm.add_argument("--rounds", type=int, default=5)
    lm.add_argument("--json", default=None)
    lm.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of the script on the CPU (its figures mean nothing for the GPU)")
    lm.add_argument("--into", default=str(benchlib.RESULTS_DIR / "gpu.md"))
    gate = sub.add_parser("lm-gate")
    gate.add_argument("--splits", required=True, help="the text splits (train_lm.py --splits-only wrote them)")
    gate.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "examples" / "lm" / "model"))
    gate.add_argument("--out", required=True, help="the dense model's folder")
    gate.add_argument("--gate-json", required=True)
    gate.add_argument("--arch", default=LM_GATE_ARCH)
    gate.add_argument("--gate-arch", default=LM_GATE_SHAPE)
    gate.add_argument("--tokens", type=float, default=7e7, help="about 20 tokens per parameter of the dense model")
    gate.add_argument("--batch", type=int, default=16)
    gate.add_argument("--seed", type=int, default=0)
    gate.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    into = sub.add_parser("render-craft")
    into.add_argument("--craft", required=True, help="the JSON `gpu.py craft` wrote")
    into.add_argument("--into", default=str(benchlib.RESULTS_DIR / "gpu.md"))
    out = sub.add_parser("render")
    out.add_argument("--mlp", required=True)
    out.add_argument("--default")
    out.add_argument("--tables")
    out.add_argument("--craft")
    out.add_argument("--out", default=str(benchlib.RESULTS_DIR / "gpu.md"))
    args = parser.parse_args(argv)
    if args.command == "render-craft":
        path = Path(args.into)
        section = render_craft(json.loads(Path(args.craft).read_text()))
        benchlib.write_atomic(path, replace_section(path.read_text(), CRAFT_SECTION, section))
    elif args.command == "lm":
        result = run_lm(args)
        if result is not None:
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
            path = Path(args.into)
            text = path.read_text() if path.exists() else "# GPU measurements\n"
            benchlib.write_atomic(path, replace_section(text, LM_SECTION, render_lm(result)))
    elif args.command == "lm-gate":
        run_lm_gate(args)
    elif args.command == "mlp":
        result = run_mlp(args)
        Path(args.json).write_text(json.dumps(result, indent=2))
    elif args.command == "craft":
        result = run_craft(args)
        if result is not None:
            Path(args.json).write_text(json.dumps(result, indent=2))
    else:
        render(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
