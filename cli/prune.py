"""``spruce prune MODEL --ratio R --out DIR``: prune channels one-shot and write model.pt, model.onnx
(dynamic batch; a transformers model's sequence length, and the dims ``--dynamic`` declares, too),
report.json, and for a transformers model model.pt2."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..compiler.specs import parse_dynamic_dims
from ..targets.files import atomic_path, atomic_write_text, checked_out_dir, staged_dir
from .common import (
    EXIT_OK,
    ArtifactCheckError,
    Subcommand,
    add_model_arguments,
    check_model_arguments,
    given,
    load_model,
    show_library_default,
)

if TYPE_CHECKING:
    import torch

    from ..api.prune import PruneResult

ONNX_TOLERANCE = 1e-3


def _importance_help() -> str:
    from ..api.options import PruneConfig  # imports no torch: the registry is named, not listed

    return f"a name in spruce.passes.importance.IMPORTANCE; default: {PruneConfig().importance}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--ratio", type=float, required=True,
                        help="fraction of each prunable group's channels to remove")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder for model.pt, model.onnx and report.json")
    show_library_default(parser.add_argument("--importance", default=None, metavar="CRITERION",
                                             help="channel importance criterion (%(library_default)s)"),
                         _importance_help)
    parser.add_argument("--round-to", type=int, default=None, metavar="N",
                        help="keep a multiple of N channels in every group")
    parser.add_argument("--ignore", action="append", default=[], metavar="NAME",
                        help="passed to spruce.prune(ignore=...); repeatable")
    parser.add_argument("--normalised-widths", action="store_true",
                        help="prune the widths LayerNorm/RMSNorm normalise over (masked norm; changes the "
                             "function: report.json's errors.dense says by how much)")
    parser.add_argument("--dynamic", action="append", default=[], metavar="INPUT:DIMS",
                        help="dims of an input of forward that stay dynamic in the outputs besides the batch, e.g. "
                             "pixel_values:2,3; repeatable (a transformers model's sequence length is by default)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it exists and is not empty")


def _write_onnx(result: PruneResult, example_inputs: Sequence[torch.Tensor], path: Path) -> float:
    """Write the compact model to ``path`` as ONNX with a dynamic batch (and the dims a capture
    declared dynamic); return ONNX Runtime's largest relative difference from torch. A model
    captured whole goes through :func:`spruce.api.deploy.save_onnx` (its graph rewritten so
    TorchScript tracing keeps the batch symbolic); any other through ``export_onnx``."""
    from ..api import deploy
    from ..targets.onnxruntime import check_onnx, export_onnx

    captured = result.analysis.captured
    if captured is not None and captured.whole:
        (part,) = deploy.parts(result.model, captured)
        return deploy.save_onnx(part, path)[1]
    export_onnx(result.model, example_inputs, path, dynamic_batch=True)
    return check_onnx(path, result.model, example_inputs)


def _dynamic_shapes(model: torch.nn.Module, example_inputs: object, declared: dict[str, tuple[int, ...]]) -> object:
    """torch.export ``dynamic_shapes`` keyed by input name: a transformers model's sequence
    length (:func:`spruce.capture.transformers.sequence_dims`), plus the ``--dynamic`` dims.
    Raises ModelSpecError naming an input or dim the example does not have."""
    import inspect

    import torch

    from ..capture.transformers import SEQUENCE_INPUTS, sequence_dims
    from ..compiler.specs import ModelSpecError

    dims = {name: dict(spec) for name, spec in (sequence_dims(model, example_inputs) or {}).items()}
    if not declared:
        return dims or None
    if isinstance(example_inputs, dict):
        named = dict(example_inputs)
    else:
        try:
            named = dict(inspect.signature(model.forward).bind(*example_inputs).arguments)
        except TypeError:
            named = {}
    shared = {seq: spec[1] for name, spec in dims.items() for seq in [SEQUENCE_INPUTS.get(name)] if 1 in spec}
    for name, listed in declared.items():
        tensor = named.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise ModelSpecError(f"--dynamic {name}: the model's example inputs have no tensor {name!r} "
                                 f"(inputs: {', '.join(named) or 'none named'})")
        for d in listed:
            if d >= tensor.dim() or tensor.shape[d] < 2:
                raise ModelSpecError(f"--dynamic {name}:{d}: the example's {name!r} is {tuple(tensor.shape)}: "
                                     "name a dim it has, of size 2 or more")
            seq = SEQUENCE_INPUTS.get(name) if d == 1 else None
            if seq is not None and seq not in shared:
                shared[seq] = torch.export.Dim(seq, min=2)
            dims.setdefault(name, {})[d] = shared[seq] if seq is not None else torch.export.Dim(f"{name}_{d}", min=2)
    return dims


def _input_names(model: torch.nn.Module, example_inputs: object) -> list[str]:
    """The names of the example's tensors, in the order an ONNX file takes them."""
    import inspect

    if isinstance(example_inputs, dict):
        return list(example_inputs)
    try:
        return list(inspect.signature(model.forward).bind(*example_inputs).arguments)
    except TypeError:
        return []


def _frozen_dims(path: Path, names: list[str]) -> dict[str, list[int]]:
    """The ONNX file's inputs with fixed sizes past dim 0 (the model's input name, where the
    file's inputs are one per name, else the file's -> those dims)."""
    import onnx

    inputs = onnx.load(str(path), load_external_data=False).graph.input
    names = names if len(names) == len(inputs) else [value.name for value in inputs]
    frozen = {}
    for name, value in zip(names, inputs):
        fixed = [i for i, d in enumerate(value.type.tensor_type.shape.dim) if i > 0 and not d.dim_param]
        if fixed:
            frozen[name] = fixed
    return frozen


def run(args: argparse.Namespace) -> int:
    """Prune the model, write model.pt, model.onnx (dynamic batch) and report.json to ``--out``.

    The folder appears only when every file is written and ONNX Runtime
    reproduces the compact model within ``ONNX_TOLERANCE``.
    """
    import torch

    from ..api.prune import PruneConfig, prune
    from ..api.stats import count_macs, count_params
    from ..capture.transformers import is_transformers_model
    from ..compiler.models import input_shapes

    options = PruneConfig(ratio=args.ratio, round_to=args.round_to, normalised_widths=args.normalised_widths,
                          **given(args, "importance"))  # before any work; the library's defaults filled in
    declared = parse_dynamic_dims(args.dynamic)
    out_dir = checked_out_dir(args.out, args.force, name="--out", force_hint="--force")
    model, example_inputs = load_model(args.model, args.input_shape)
    dynamic = _dynamic_shapes(model, example_inputs, declared)
    params_before = count_params(model)
    macs_before = count_macs(model, example_inputs)
    result = prune(
        model, example_inputs,
        ratio=args.ratio, importance=options.importance,
        round_to=args.round_to, ignore=tuple(args.ignore), normalised_widths=args.normalised_widths,
        dynamic_shapes=dynamic,
    )
    compact = result.model
    params_after = count_params(compact)
    macs_after = count_macs(compact, example_inputs)
    with staged_dir(out_dir) as stage:
        with atomic_path(stage / "model.pt") as temp, open(temp, "wb") as stream:
            torch.save(compact, stream)  # to a stream: a full disk is an OSError, not torch's RuntimeError
        onnx_diff = _write_onnx(result, example_inputs, stage / "model.onnx")
        if not onnx_diff <= ONNX_TOLERANCE:
            raise ArtifactCheckError(
                f"ONNX Runtime output differs from torch by {onnx_diff:.3g} "
                f"(relative; tolerance {ONNX_TOLERANCE:g})"
            )
        files = ["model.pt", "model.onnx", "report.json"]
        if is_transformers_model(model) and result.analysis.captured.whole:
            from ..api import deploy

            (part,) = deploy.parts(compact, result.analysis.captured)
            deploy.save_pt2(part, stage / "model.pt2")  # an ExportedProgram: loads without transformers
            files.insert(2, "model.pt2")
        frozen = _frozen_dims(stage / "model.onnx", _input_names(model, example_inputs))
        report = {
            "spruce_version": __version__,
            "torch_version": torch.__version__,
            "model": args.model,
            "input_shapes": input_shapes(example_inputs),
            "dynamic_dims": {name: sorted(spec) for name, spec in (dynamic or {}).items()},
            "ratio": args.ratio,
            "importance": options.importance,
            "round_to": args.round_to,
            "ignore": list(args.ignore),
            "normalised_widths": args.normalised_widths,
            "errors": result.errors(),
            "params": _before_after(params_before, params_after),
            "macs": _before_after(macs_before, macs_after),
            "groups": _kept_records(result),
            "onnx": {"file": "model.onnx", "max_rel_diff": onnx_diff,
                     "tolerance": ONNX_TOLERANCE, "frozen_dims": frozen},
            "files": files,
        }
        atomic_write_text(stage / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"params  {params_before:>15,} -> {params_after:>15,}  "
          f"({report['params']['ratio']:.3f}x)")
    print(f"MACs    {macs_before:>15,} -> {macs_after:>15,}  ({report['macs']['ratio']:.3f}x)")
    print(f"ONNX Runtime max relative diff {onnx_diff:.2e} (tolerance {ONNX_TOLERANCE:g})")
    if frozen:
        listed = ", ".join(f"{name} dim {','.join(map(str, dims))}" for name, dims in frozen.items())
        print(f"fixed sizes in model.onnx (past the batch): {listed}; keep others dynamic with --dynamic INPUT:DIMS")
    print(f"compact vs masked model {report['errors']['masked']:.2e}, vs unpruned model "
          f"{report['errors']['dense']:.2e} (relative)")
    print(f"wrote {out_dir}")
    return EXIT_OK


def _before_after(before: int, after: int) -> dict[str, float]:
    return {"before": before, "after": after, "ratio": after / before if before else 1.0}


def _kept_records(result: PruneResult) -> list[dict[str, Any]]:
    """For each group: its size and how many channels survived."""
    return [
        {
            "id": group.id,
            "size": group.size,
            "prunable": group.prunable,
            "kept": len(result.kept[group.id]) if group.id in result.kept else group.size,
        }
        for group in result.groups
    ]


def check(args: argparse.Namespace) -> None:
    """The model spec and its file, --dynamic and --out (before torch is imported)."""
    check_model_arguments(args)
    parse_dynamic_dims(args.dynamic)
    checked_out_dir(args.out, args.force, name="--out", force_hint="--force")


SUBCOMMAND = Subcommand(
    help="prune channels one-shot and write model.pt, model.onnx and report.json",
    add_arguments=add_arguments,
    check=check,
    run=run,
)
