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
