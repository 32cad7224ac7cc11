"""``spruce compile [MODEL] --target T --method M --structure S --budget latency=0.5 --out DIR``.

MODEL is a trained model (``FILE.py:FACTORY``, ``FILE.pt``, ...): the dense reference,
never re-trained. With no MODEL and no recipe it runs the embedded default: a small CNN
trained on scikit-learn's real digits (fixed seed), then compiled for ONNX Runtime on
this CPU under a latency budget met as measured, ending with a table of accuracy,
latency and FPS (dense vs compiled), the budget hit and the fidelity to dense. A recipe
file (``--recipe FILE.yaml|.json``, schema in ``spruce.compiler.recipes``) can stand for
the options; flags override it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..compiler.floors import floor_line
from ..compiler.recipes import Recipe, RecipeError, load_recipe, parse_budget
from ..targets.files import checked_out_dir
from .common import EXIT_FAILED, EXIT_OK, Subcommand, parse_input_shapes, parse_target_option, usable_target

_DEFAULTS = Recipe()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="torchvision:NAME, FILE.py:FACTORY or FILE.pt (default: the embedded digits CNN)")
    parser.add_argument("--recipe", type=Path, default=None, help="YAML or JSON recipe (flags override it)")
    parser.add_argument("--input-shape", type=parse_input_shapes, default=None, metavar="SHAPE",
                        help="example input shape (default: the data's)")
    parser.add_argument("--data", default=None, help=f"digits, mnist5k, images:DIR or FILE.py:make_loaders "
                        f"(default {_DEFAULTS.data})")
    parser.add_argument("--recover", default=None, choices=("none", "distill", "loss"),
                        help="none: one-shot + BatchNorm re-estimation; distill: learn the dense outputs; "
                        "loss: --loss (default: loss when one exists, else distill)")
    parser.add_argument("--loss", default=None, metavar="FILE.py:loss_fn", help="loss_fn(outputs, batch)")
    parser.add_argument("--evaluate", default=None, metavar="FILE.py:evaluate",
                        help="evaluate(model, loader) -> {name: value}, reported for dense and compiled")
    parser.add_argument("--prepare", default=None, metavar="FILE.py:prepare",
                        help="prepare(image, (H, W)) -> tensor for images:DIR (default: resize to cover, crop)")
    parser.add_argument("--distill-loss", type=parse_target_option, action="append", default=None,
                        metavar="OUTPUT=LOSS", dest="distill_losses",
                        help="distillation loss of an output (kl, mse, l1, weighted_mse), e.g. 'output[0]=l1' "
                        "(repeatable)")
    parser.add_argument("--output", type=_parse_output, action="append", default=None, metavar="OUTPUT=KIND[,K=V]",
                        dest="outputs", help="declare an output's kind (scores, pixel_scores, ctc, map, regression), "
                        "e.g. 'output=ctc,class_dim=-1,blank=0' (repeatable; undeclared kinds are guessed)")
    parser.add_argument("--floor", action="append", default=None, metavar="MEASURE>=VALUE",
                        help="fidelity floor replacing the output kinds' defaults, e.g. 'sequence_agreement>=0.95' or "
                        "an --evaluate metric 'word_acc>=0.95'; 'none': no floor (repeatable). Missing it fails "
                        "the compile (exit 1), the artifacts kept")
    parser.add_argument("--recover-lr", type=float, default=None,
                        help=f"recovery learning rate (default {_DEFAULTS.recover_lr})")
    parser.add_argument("--target", default=None, help=f"onnxruntime, torch, tensorrt (default {_DEFAULTS.target})")
    parser.add_argument("--option", type=parse_target_option, action="append", default=None, metavar="KEY=VALUE",
                        dest="target_options", help="target option, e.g. threads=2 (repeatable)")
    parser.add_argument("--method", default=None, help=f"sparse-training method (default {_DEFAULTS.method.name})")
    parser.add_argument("--method-option", type=parse_target_option, action="append", default=None,
                        metavar="KEY=VALUE", dest="method_options",
                        help="method option, e.g. h=20 (repeatable; unset options scale to the run)")
    parser.add_argument("--structure", default=None, help=f"channel, unstructured or N:M "
                        f"(default {_DEFAULTS.structure})")
    parser.add_argument("--sparsity", type=float, default=None, help="fraction removed (instead of a budget)")
    parser.add_argument("--budget", default=None, help="latency=F, flops=F or params=F (default "
                        + ",".join(f"{k}={v}" for k, v in (_DEFAULTS.budget or {}).items()) + ")")
    parser.add_argument("--distribution", default=None, help=f"uniform, erk or global "
                        f"(default {_DEFAULTS.distribution})")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {_DEFAULTS.epochs})")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--bench-iters", type=int, default=None, help="timed runs per batch size")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced only on success)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--json", action="store_true", help="print report.json instead of the table")


def _parse_output(text: str) -> tuple[str, dict[str, Any]]:
    """``OUTPUT=KIND[,KEY=VALUE...]`` -> (output path, declaration mapping)."""
    head, *rest = text.split(",")
    name, sep, kind = head.rpartition("=")
    if not sep or not name or not kind:
        raise argparse.ArgumentTypeError(f"bad --output {text!r}: expected OUTPUT=KIND[,KEY=VALUE...], "
                                         "e.g. output=ctc,class_dim=-1,blank=0")
    return name.strip(), {"kind": kind.strip(), **dict(parse_target_option(item.strip()) for item in rest)}


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe file (or the defaults) with the command line's options on top."""
    base = load_recipe(args.recipe) if args.recipe is not None else Recipe()
    shape = None
    if args.input_shape is not None:
        if len(args.input_shape) != 1:
            raise RecipeError("--input-shape: compile takes one input")
        shape = args.input_shape[0]
    method = args.method
    if args.method_options:
        name = args.method or base.method.name
        kept = base.method.model_dump(exclude_unset=True) if name == base.method.name else {}
        method = {**kept, **dict(args.method_options), "name": name}
    try:
        return base.with_overrides(
            model=args.model, input_shape=shape, data=args.data, target=args.target,
            target_options=dict(args.target_options) if args.target_options else None, method=method,
            structure=args.structure, sparsity=args.sparsity,
            budget=parse_budget(args.budget) if args.budget is not None else None,
            distribution=args.distribution, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, bench_iters=args.bench_iters, recover=args.recover, loss=args.loss,
            evaluate=args.evaluate, prepare=args.prepare, recover_lr=args.recover_lr,
            distill_losses={str(k): str(v) for k, v in args.distill_losses} if args.distill_losses else None,
            outputs={**{k: v.model_dump(exclude_unset=True) for k, v in base.outputs.items()}, **dict(args.outputs)}
            if args.outputs else None,
            floor=(() if [f.strip().lower() for f in args.floor] == ["none"] else tuple(args.floor))
            if args.floor else None)
    except RecipeError as exc:
        raise RecipeError(f"{exc} (from the command line{' and ' + str(args.recipe) if args.recipe else ''})") \
            from None


def run(args: argparse.Namespace) -> int:
    """Compile, write DIR/report.json + report.md + plots + artifacts, print the comparison table."""
    from ..compiler.pipeline import FidelityFloorError, compile

    recipe = recipe_from_args(args)
    out_dir = checked_out_dir(args.out, args.force, name="--out", force_hint="--force")
    usable_target(recipe.target, recipe.target_options)  # before any training
    missed = None
    try:
        report = compile(recipe=recipe, out=out_dir, force=args.force, quiet=args.quiet)
    except FidelityFloorError as exc:  # out is written, the artifacts kept and marked
        report, missed = exc.report, floor_line(exc.report.document.get("floor"))
    if args.json:
        print(json.dumps(report.document, indent=2))
    else:
        print(report.format_table())
        files = ["report.md", "report.json", report.document["compiled"]["artifact"],
                 report.document["dense"]["artifact"]]
        if report.document["compiled"].get("module_file") == "model.pt":
            files.append("model.pt")
        print(f"\nwrote {out_dir}/ ({', '.join(files)})")
    if missed is not None:
        print(f"spruce: error: {missed} (artifacts kept in {out_dir}, marked in report.json)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


SUBCOMMAND = Subcommand(
    help="compile a trained model to a deployable artifact under a measured budget (select, recover, export, "
         "build, time and evaluate vs dense)",
    add_arguments=add_arguments,
    run=run,
)
