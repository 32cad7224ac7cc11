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
from typing import TYPE_CHECKING, Any

from ..compiler.specs import (
    DEFAULT_TARGET,
    FACTORY_CONTRACT,
    RecipeError,
    check_data_source,
    check_function_spec,
    check_model_source,
    check_precision_spec,
    check_readable_file,
    parse_budget,
)
from ..targets.files import checked_out_dir
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    Subcommand,
    parse_input_shapes,
    parse_target_option,
    show_library_default,
    usable_target,
)

if TYPE_CHECKING:
    from ..compiler.recipes import Recipe


def _recipe_default(name: str) -> object:
    """The recipe's default of field ``name`` as --help shows it (the method by name, a budget as
    KIND=F), read without importing torch."""
    from ..compiler.defaults import RECIPE_DEFAULTS

    value = RECIPE_DEFAULTS[name]
    if name == "budget":
        return ",".join(f"{kind}={fraction}" for kind, fraction in (value or {}).items())
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def with_default(field: str, flag: str, text: str, **options: object) -> None:
        """An option whose default is the recipe's ``field`` (shown in --help, read only then)."""
        action = parser.add_argument(flag, default=None, help=f"{text} (default %(library_default)s)", **options)
        show_library_default(action, lambda: _recipe_default(field))

    parser.add_argument("model", nargs="?", default=None,
                        help="torchvision:NAME, FILE.py:FACTORY or FILE.pt (default: the embedded digits CNN); "
                        + FACTORY_CONTRACT)
    parser.add_argument("--recipe", type=Path, default=None, help="YAML or JSON recipe (flags override it)")
    parser.add_argument("--input-shape", type=parse_input_shapes, default=None, metavar="SHAPE",
                        help="example input shape (default: the data's)")
    with_default("data", "--data", "digits, mnist5k, images:DIR, text:PATH or FILE.py:make_loaders")
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
                        help="distillation loss of an output (kl, mse, l1, weighted_mse, hard_weighted_mse), "
                        "e.g. 'output[0]=l1' (repeatable)")
    parser.add_argument("--output", type=_parse_output, action="append", default=None, metavar="OUTPUT=KIND[,K=V]",
                        dest="outputs", help="declare an output's kind (scores, pixel_scores, ctc, map, regression), "
                        "e.g. 'output=ctc,class_dim=-1,blank=0' (repeatable; undeclared kinds are guessed)")
    parser.add_argument("--floor", action="append", default=None, metavar="MEASURE>=VALUE",
                        help="fidelity floor replacing the output kinds' defaults, e.g. 'sequence_agreement>=0.95' or "
                        "an --evaluate metric 'word_acc>=0.95'; 'none': no floor (repeatable). Missing it fails "
                        "the compile (exit 1), the artifacts kept")
    with_default("recover_lr", "--recover-lr", "recovery learning rate", type=float)
    with_default("target", "--target", "onnxruntime, torch, tensorrt")
    parser.add_argument("--precision", default=None, choices=("fp32", "int8"),
                        help="precision of the artifact: int8 (onnxruntime) quantizes after channel removal, with "
                        "latency table and budget timed in INT8 against dense fp32 (default: the target's)")
    parser.add_argument("--selection-precision", default=None, choices=("fp32", "int8"),
                        help="precision of the latency table the channels are chosen on (default: --precision); "
                        "--precision int8 --selection-precision fp32 chooses on fp32 costs, then quantizes, the "
                        "budget still met as the INT8 artifact measures")
    parser.add_argument("--fake-quant", action="store_true", default=None,
                        help="with --precision int8: recover with the student fake-quantized as ONNX Runtime will "
                        "quantize it")
    parser.add_argument("--option", type=parse_target_option, action="append", default=None, metavar="KEY=VALUE",
                        dest="target_options", help="target option, e.g. threads=2 (repeatable)")
    with_default("method", "--method", "sparse-training method")
    parser.add_argument("--method-option", type=parse_target_option, action="append", default=None,
                        metavar="KEY=VALUE", dest="method_options",
                        help="method option, e.g. h=20 (repeatable; unset options scale to the run)")
    with_default("structure", "--structure", "channel, unstructured or N:M")
    parser.add_argument("--sparsity", type=float, default=None, help="fraction removed (instead of a budget)")
    with_default("budget", "--budget", "latency=F, decode=F (a causal LM), flops=F or params=F")
    with_default("distribution", "--distribution", "uniform, erk or global")
    with_default("selection_cost", "--selection-cost",
                 "what steers the knapsack under a latency budget: latency (the profiled table), flops or params",
                 choices=("latency", "flops", "params"))
    with_default("epochs", "--epochs", "training epochs", type=int)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--bench-iters", type=int, default=None, help="timed runs per batch size")
    parser.add_argument("--recover-tokens", type=int, default=None, metavar="N",
                        help="a language model's recovery stops after N tokens (default: 10%% of its training "
                             "tokens when its folder has training.json, else --epochs)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="L",
                        help="a language model's example sequence length (default: the data's)")
    parser.add_argument("--depth", type=int, default=None, metavar="N",
                        help="a causal language model's decoder layers removed besides channels, least "
                             "influential first (default: none unless a latency budget needs them)")
    parser.add_argument("--uniform", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the same channel counts in every layer for groups of one role (heads, MLP "
                             "width), so the result writes back to transformers (default: on for transformers "
                             "models)")
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


def check(args: argparse.Namespace) -> None:
    """What the command line names, checked before torch is imported: the model spec and its
    file, the recipe file, the data spec and its folder or file, the budget, the user functions'
    files, one input shape, and --out."""
    if args.model is not None:
        check_model_source(args.model)
    if args.recipe is not None:
        check_readable_file(args.recipe, "recipe", RecipeError)
    if args.data is not None:
        check_data_source(args.data)
    if args.budget is not None:
        parse_budget(args.budget)
    if args.precision is not None and (args.target is not None or args.recipe is None):
        check_precision_spec(args.target or DEFAULT_TARGET, args.precision)  # a recipe's target: when it loads
    if args.selection_precision is not None and (args.target is not None or args.recipe is None):
        check_precision_spec(args.target or DEFAULT_TARGET, args.selection_precision, "--selection-precision")
    for role, spec in (("loss", args.loss), ("evaluate", args.evaluate), ("prepare", args.prepare)):
        if spec is not None:
            check_function_spec(spec, role, RecipeError)
    if args.input_shape is not None and len(args.input_shape) != 1:
        raise RecipeError("--input-shape: compile takes one input")
    checked_out_dir(args.out, args.force, name="--out", force_hint="--force")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe file (or the defaults) with the command line's options on top."""
    from ..compiler.recipes import Recipe, load_recipe

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
            precision=args.precision, selection_precision=args.selection_precision, fake_quant=args.fake_quant,
            structure=args.structure, sparsity=args.sparsity,
            budget=parse_budget(args.budget) if args.budget is not None else None,
            distribution=args.distribution, selection_cost=args.selection_cost, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, bench_iters=args.bench_iters, recover=args.recover, loss=args.loss,
            recover_tokens=args.recover_tokens, seq_len=args.seq_len, depth=args.depth, uniform=args.uniform,
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
    from ..compiler.floors import floor_line
    from ..compiler.pipeline import FidelityFloorError, compile

    recipe = recipe_from_args(args)
    out_dir = checked_out_dir(args.out, args.force, name="--out", force_hint="--force")
    usable_target(recipe.target, recipe.target_settings())  # before any training
    missed = None
    try:
        report = compile(recipe=recipe, out=out_dir, force=args.force, quiet=args.quiet)
    except FidelityFloorError as exc:  # out is written, the artifacts kept and marked
        report, missed = exc.report, floor_line(exc.report.document.get("floor"))
    if args.json:
        print(json.dumps(report.document, indent=2))
    else:
        print(report.format_table(warn_guessed=args.quiet))  # not quiet: said when the model loaded
        files = ["report.md", "report.json", report.document["compiled"]["artifact"],
                 report.document["dense"]["artifact"]]
        if report.document.get("precision"):
            files.append(report.document["precision"]["rows"][1]["artifact"])
        if report.document["compiled"].get("module_file") == "model.pt":
            files.append("model.pt")
        lm = report.document.get("language_model") or {}
        files += [f"{lm[k]}/" if k == "hf" else lm[k] for k in ("pt2", "hf")
                  if k in lm and not str(lm[k]).startswith("not written")]
        print(f"\nwrote {out_dir}/ ({', '.join(files)})")
    if missed is not None:
        print(f"spruce: error: {missed} (artifacts kept in {out_dir}, marked in report.json)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


SUBCOMMAND = Subcommand(
    help="compile a trained model to a deployable artifact under a measured budget (select, recover, export, "
         "build, time and evaluate vs dense)",
    add_arguments=add_arguments,
    check=check,
    run=run,
)
