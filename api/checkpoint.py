"""Checkpoints of sparse training: ``save`` a SparseModel (and its optimizer), ``load`` it back.

A checkpoint is one file, written atomically (a temporary file in the same folder, then a
rename: a crash leaves the previous checkpoint or the new one, never half of one): a
header line ``SPRUCE-CHECKPOINT sha256=<hex>`` and then the ``torch.save`` bytes it
hashes, so a file changed at any byte (a flipped bit, truncation) is refused before it is
unpickled. Files without the header (written before it existed) load unchecked. The
payload holds a format marker and version, the ``sparsify`` recipe (the method's config as
``{"name": ..., option: value, ...}``, structure, sparsity, distribution, total steps,
excluded layers, budget, example input shapes), the sparse layers' names and weight
shapes, the step count, the SparseModel's ``state_dict`` (weights, bit-packed masks,
method state, metrics) and optionally the optimizer's state and user data.

Format versions: 2 stores the method as its config record; format-1 files (method name
and ``options`` apart, no budget) are migrated when read.

``load`` reads with ``torch.load(weights_only=True)`` (no arbitrary code from a file),
validates the whole checkpoint against the model and optimizer it is given, and only
then rebuilds the SparseModel with ``sparsify`` and copies the state in. Any problem is a
:class:`CheckpointError` naming the file and what is wrong, and the model and optimizer
are left as they were (if the copy itself fails, their previous state is restored).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..capture.trace import trace
from ..passes.sparsity.masking import SPARSE_LAYER_TYPES
from ..passes.sparsity.model import SparseModel
from ..passes.sparsity.registry import method_names, resolve_method
from ..targets.files import atomic_path
from .verbs import sparsify

__all__ = ["save", "load", "read", "restore", "CheckpointError", "FORMAT", "FORMAT_VERSION"]

FORMAT = "spruce.checkpoint"
FORMAT_VERSION = 2
_HEADER = re.compile(rb"SPRUCE-CHECKPOINT sha256=([0-9a-f]{64})\n")
_HEADER_START = b"SPRUCE-"
_REQUIRED = {"recipe": dict, "layers": list, "step_count": int, "model": dict}
_RECIPE = {"method": dict, "structure": str, "sparsity": float, "distribution": str, "exclude": list}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model/optimizer it is loaded into."""


def save(sparse_model: SparseModel, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
         extra: Any = None) -> Path:
    """Write ``sparse_model`` (and ``optimizer``'s state, and ``extra``: plain data such as
    ints, floats, strings, lists, dicts and tensors) to ``path`` atomically; returns the path.

    Under torch.distributed every rank holds the same state (see
    ``spruce.passes.sparsity.distributed``): save from rank 0 only."""
    if isinstance(getattr(sparse_model, "module", None), SparseModel):  # DistributedDataParallel(sm)
        sparse_model = sparse_model.module
    if not isinstance(sparse_model, SparseModel):
        raise TypeError(f"save() needs the SparseModel that sparsify returned, got {type(sparse_model).__name__}")
    spec = sparse_model.spec
    path = Path(path)
    checkpoint = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "recipe": {"method": spec.method.to_record(), "structure": spec.structure, "sparsity": spec.sparsity,
                   "distribution": spec.distribution, "total_steps": spec.total_steps,
                   "exclude": list(spec.exclude), "budget": spec.budget,
                   "normalised_widths": spec.normalised_widths},
        "inputs": [[list(shape), dtype] for shape, dtype in spec.input_spec or []] or None,
        "layers": [[layer.name, list(layer.masked.mask_shape)] for layer in sparse_model.layers],
        "step_count": sparse_model.step_count,
        "model": sparse_model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra,
    }
    payload = io.BytesIO()
    torch.save(checkpoint, payload)
    payload = payload.getvalue()
    header = b"SPRUCE-CHECKPOINT sha256=" + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    with atomic_path(path) as temp, open(temp, "wb") as stream:
        stream.write(header)
        stream.write(payload)
    return path


def _payload(path: Path) -> bytes:
    """The ``torch.save`` bytes of the checkpoint file at ``path``, checked against its header's
    sha256 (a file without a header is from before checksums, and returned whole)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from exc
    if not data.startswith(_HEADER_START):
        return data
    header = _HEADER.match(data)
    if header is None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its header line is damaged")
    payload = data[header.end():]
    if hashlib.sha256(payload).hexdigest().encode() != header.group(1):
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match its sha256 "
                              f"(changed on disk or truncated)")
    return payload


def read(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` as a dict, after checking it is a complete spruce
    checkpoint of a format this version reads (``CheckpointError`` otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    payload = _payload(path)
    try:
        checkpoint = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle garbage, foreign objects: all unreadable
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated, corrupt or not a torch file): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a spruce checkpoint (no {FORMAT!r} marker); "
                              f"write checkpoints with spruce.save")
    version = checkpoint.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint {path}: invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this spruce reads "
                              f"({FORMAT_VERSION}): upgrade spruce")
    _check_fields(path, checkpoint, _REQUIRED, "")
    if version == 1:
        checkpoint = _migrate_from_1(path, checkpoint)
    _check_fields(path, checkpoint["recipe"], _RECIPE, "recipe.")
    return checkpoint


def _migrate_from_1(path: Path, checkpoint: dict) -> dict:
    """A format-1 checkpoint in format 2: the method name and its ``options`` become one
    config record ``{"name": ..., option: value, ...}``; format 1 had no budget."""
    recipe = checkpoint["recipe"]
    _check_fields(path, recipe, {"method": str, "options": dict}, "recipe.")
    migrated = {key: value for key, value in recipe.items() if key not in ("method", "options")}
    migrated["method"] = {**recipe["options"], "name": recipe["method"]}
    migrated.setdefault("budget", None)
    return {**checkpoint, "version": FORMAT_VERSION, "recipe": migrated}


def _check_fields(path: Path, mapping: dict, required: dict[str, type], prefix: str) -> None:
    for key, kind in required.items():
        value = mapping.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, kind) and not isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"checkpoint {path}: field {prefix}{key} is missing or not a {kind.__name__}")


def load(path: str | os.PathLike, model: nn.Module, example_inputs: object = None,
         optimizer: torch.optim.Optimizer | None = None, latency_table: object = None) -> SparseModel:
    """Rebuild the SparseModel saved at ``path`` around ``model`` (same architecture as the
    saved one) and load its weights, masks and method state; load ``optimizer``'s state
    too when given (build it on ``model``'s parameters, as for training) and attach it.

    ``example_inputs`` defaults to zeros of the shapes recorded at save time;
    ``latency_table`` is needed for a model trained under a latency budget. The saved
    user data is on the result as ``checkpoint_extra``. Raises :class:`CheckpointError`
    (a ValueError) naming the file and the mismatch; nothing is modified then."""
    path = Path(path)
    checkpoint = read(path)
    recipe = checkpoint["recipe"]
    name = recipe["method"].get("name")
    if name not in method_names():
        raise CheckpointError(f"checkpoint {path}: unknown method {name!r}; this spruce has "
                              f"{', '.join(method_names())}")
    try:
        config = resolve_method(recipe["method"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid options for method {name!r}: {exc}") from exc
    if example_inputs is None:
        example_inputs = _example_from_spec(path, checkpoint.get("inputs"))
    _check_layers(path, checkpoint["layers"], model)
    _check_graph_state(path, checkpoint["model"], model, example_inputs)
    if optimizer is not None:
        _check_optimizer(path, checkpoint.get("optimizer"), optimizer)

    backup = {name: value.detach().clone() for name, value in model.state_dict().items()}
    optimizer_backup = optimizer.state_dict() if optimizer is not None else None
    if optimizer_backup is not None:
        optimizer_backup = {"state": {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                                      for k, s in optimizer_backup["state"].items()},
                            "param_groups": [dict(g) for g in optimizer_backup["param_groups"]]}
    try:
        sm = sparsify(model, example_inputs, method=config, structure=recipe["structure"],
                      sparsity=recipe["sparsity"], distribution=recipe["distribution"],
                      total_steps=recipe.get("total_steps"), exclude=recipe["exclude"], budget=recipe.get("budget"),
                      latency_table=latency_table, normalised_widths=recipe.get("normalised_widths", False))
        sm.load_state_dict(_state_on_device(checkpoint["model"], model))
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
            sm.attach(optimizer)
    except Exception as exc:
        with torch.no_grad():
            for name, value in model.state_dict().items():
                value.copy_(backup[name])
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_backup)
        raise CheckpointError(f"checkpoint {path} could not be loaded into the model (left unchanged): "
                              f"{type(exc).__name__}: {exc}") from exc
    sm.checkpoint_extra = checkpoint.get("extra")
    return sm


def restore(path: str | os.PathLike, sparse_model: SparseModel) -> SparseModel:
    """Load the checkpoint at ``path`` (written by :func:`save` from a SparseModel of the same
    recipe) into ``sparse_model``: its weights, masks, method state, step count and metrics;
    returns it. For a SparseModel already rebuilt around the model (a trainer callback's, on
    resume); :func:`load` rebuilds one. Raises :class:`CheckpointError` naming the file when it
    cannot be read or its method or layers differ (found before anything is loaded)."""
    path = Path(path)
    checkpoint = read(path)
    saved = checkpoint["recipe"]["method"].get("name")
    if saved != sparse_model.method.name:
        raise CheckpointError(f"checkpoint {path} holds method {saved!r}, the model trains "
                              f"{sparse_model.method.name!r}")
    layers = [[layer.name, list(layer.masked.mask_shape)] for layer in sparse_model.layers]
    if checkpoint["layers"] != layers:
        raise CheckpointError(f"checkpoint {path} was saved from other sparse layers than the model's")
    try:
        sparse_model.load_state_dict(_state_on_device(checkpoint["model"], sparse_model))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {type(exc).__name__}: {exc}") from exc
    return sparse_model


def _state_on_device(state: dict, model: nn.Module) -> dict:
    """``state`` (read onto the CPU) with the SparseModel's own state (method state such as
    IEE's stores, per-layer records) on the model's device, where the method computes with
    it; generator states stay on the CPU, where torch.Generator needs them."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cpu" or "_extra_state" not in state:
        return state

    def move(value: Any, key: str = "") -> Any:
        if isinstance(value, torch.Tensor):
            return value if key == "generator" else value.to(device)
        if isinstance(value, dict):
            return {k: move(v, k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(v, key) for v in value)
        return value

    return {**state, "_extra_state": move(state["_extra_state"])}


def _example_from_spec(path: Path, spec: object) -> tuple[torch.Tensor, ...]:
    if not isinstance(spec, list) or not spec:
        raise CheckpointError(f"checkpoint {path} records no example-input shapes: pass example_inputs to load()")
    try:
        return tuple(torch.zeros(tuple(shape), dtype=getattr(torch, dtype)) for shape, dtype in spec)
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: malformed example-input record {spec!r}") from exc


def _check_layers(path: Path, layers: list, model: nn.Module) -> None:
    modules = dict(model.named_modules())
    for entry in layers:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise CheckpointError(f"checkpoint {path}: malformed layer record {entry!r}")
        name, shape = entry
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"checkpoint {path} is for a different architecture: the model has no layer "
                                  f"{name!r}")
        if not isinstance(module, SPARSE_LAYER_TYPES):
            raise CheckpointError(f"checkpoint {path} is for a different architecture: layer {name!r} is a "
                                  f"{type(module).__name__}, not a Conv/Linear layer")
        if list(module.weight.shape) != list(shape):
            raise CheckpointError(f"checkpoint {path} is for a different architecture: layer {name!r} has weight "
                                  f"shape {list(module.weight.shape)}, the checkpoint {list(shape)}")


def _check_graph_state(path: Path, saved: dict, model: nn.Module, example_inputs: object) -> None:
    """Every parameter/buffer of the traced model has a saved tensor of the same shape and
    dtype, and nothing else is saved besides the masks and spruce's own state."""
    try:
        expected = trace(model, example_inputs).state_dict()
    except Exception as exc:  # noqa: BLE001 - the model does not fit its own example inputs
        raise CheckpointError(f"checkpoint {path}: cannot trace the model with the example inputs: {exc}") from exc
    own = {f"graph.{name}": value for name, value in expected.items()}
    spruce_keys = {key for key in saved if key.startswith("graph.spruce_masks.") or key == "_extra_state"}
    if "_extra_state" not in saved:
        raise CheckpointError(f"checkpoint {path}: the SparseModel state (method state, step count) is missing")
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own) - spruce_keys)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} is for a different architecture: "
                              + "; ".join(part for part in (
                                  f"missing in the checkpoint: {', '.join(k[6:] for k in missing[:5])}"
                                  if missing else "",
                                  f"not in the model: {', '.join(k[6:] for k in unexpected[:5])}"
                                  if unexpected else "") if part))
    for key, value in own.items():
        stored = saved[key]
        if not isinstance(stored, torch.Tensor) or stored.shape != value.shape or stored.dtype != value.dtype:
            got = f"{list(stored.shape)} {stored.dtype}" if isinstance(stored, torch.Tensor) else type(stored).__name__
            raise CheckpointError(f"checkpoint {path} is for a different architecture: {key[6:]} is "
                                  f"{list(value.shape)} {value.dtype} in the model, {got} in the checkpoint")


def _check_optimizer(path: Path, saved: object, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or not isinstance(
            saved.get("state"), dict):
        raise CheckpointError(f"checkpoint {path} holds no optimizer state (saved without optimizer=)")
    groups = optimizer.param_groups
    saved_sizes = [len(group.get("params", [])) for group in saved["param_groups"]]
    sizes = [len(group["params"]) for group in groups]
    if saved_sizes != sizes:
        raise CheckpointError(f"checkpoint {path}: the optimizer has parameter groups of sizes {sizes}, "
                              f"the checkpoint {saved_sizes}")
    params = [p for group in groups for p in group["params"]]
    for index, state in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {path}: malformed optimizer state entry {index!r}")
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise CheckpointError(f"checkpoint {path}: optimizer state {name!r} of parameter {index} has shape "
                                      f"{list(value.shape)}, the parameter {list(params[index].shape)}")
