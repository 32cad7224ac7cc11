"""The forms of what a user names: a model spec, a data spec, a budget, example-input shapes and
``FILE.py:NAME`` functions, checked without importing torch (so the console refuses a typo before
paying for the import). The loaders (:mod:`~spruce.compiler.models`, :mod:`~spruce.compiler.datasets`,
:mod:`~spruce.compiler.recipes`) call these same checks; the rules live here only.

Every check raises a ``ValueError`` subclass whose message names the value and what would be right:
:class:`ModelSpecError`, :class:`DataError`, :class:`~spruce.compiler.recipes.RecipeError` (defined
here as :class:`RecipeError`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from ..passes.config import ConfigError, short_repr

__all__ = ["BUDGET_KINDS", "DATASET_NAMES", "DEFAULT_INPUT_SHAPE", "DEFAULT_TARGET", "FACTORY_CONTRACT",
           "FACTORY_RESULT", "MAX_INPUT_ELEMENTS", "MODEL_SCHEMES", "PRECISIONS", "TARGET_PRECISIONS", "TEXT_SCHEME",
           "DataError", "ModelSpecError", "RecipeError", "Shape", "check_budget", "check_data_source",
           "check_data_spec", "check_function_spec", "check_input_sizes", "check_model_source", "check_model_spec",
           "check_precision_spec", "check_readable_file", "cost_budget", "model_spec_kind", "parse_budget",
           "parse_dynamic_dims"]

Shape = tuple[int, ...]

DEFAULT_INPUT_SHAPE: Shape = (1, 3, 224, 224)

# The largest example input spruce allocates: 2**28 elements (1 GiB as float32). An example
# input only has to trace and time the model; a larger one is a typo, refused before allocating.
MAX_INPUT_ELEMENTS = 1 << 28

# Model sources named by a scheme prefix (``torchvision:NAME``); each has a resolver in
# :data:`spruce.compiler.models.RESOLVERS`, keyed by the kind :func:`model_spec_kind` returns.
MODEL_SCHEMES = ("torchvision", "timm")
ModelKind = Literal["torchvision", "timm", "python", "saved", "folder"]

# What ``FILE.py:FACTORY`` must return (quoted by --help and by the error for anything else).
FACTORY_RESULT = ("(model, example_inputs): a torch.nn.Module and a tensor or a tuple of tensors, one per "
                  "positional input of forward, or a dict of tensors, one per keyword input (a bare module takes "
                  "the file's EXAMPLE_INPUTS / example_inputs(), "
                  "else a 1,3,224,224 input)")
FACTORY_CONTRACT = f"FACTORY() returns {FACTORY_RESULT}"

# The built-in data sets; each has a loader in :data:`spruce.compiler.datasets.DATASETS`.
DATASET_NAMES = ("digits", "mnist5k")

# ``text:PATH``: a text file or a folder of text files, tokenized by :mod:`spruce.compiler.text`.
TEXT_SCHEME = "text"

# ``decode``: the per-token decode latency of a causal language model at batch 1 with a key/value
# cache, measured (:func:`spruce.api.budget.decode_timer`) as ``latency`` is measured on the target.
BUDGET_KINDS = ("latency", "decode", "flops", "params")

DEFAULT_TARGET = "onnxruntime"  # the recipe's default target

# What ``--precision`` (the recipe's ``precision``) takes: the precision of the artifact that ships.
PRECISIONS = ("fp32", "int8")

# The precisions each built-in target builds (each class's ``precisions``; a test keeps the two
# equal), here so that the console refuses a precision a target cannot run before torch is
# imported. A target from another package is checked by its class once it loads.
TARGET_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "torch": ("fp32", "fp16", "bf16"), "tensorrt": ("fp32", "fp16")}


class ModelSpecError(ValueError):
    """A model spec that does not name a loadable model."""


class DataError(ValueError):
    """The data option names no usable data (missing package, file or factory, bad loaders)."""


class RecipeError(ConfigError):
    """A recipe (file or options) is malformed; the message names the field and the file."""


# --- model specs -----------------------------------------------------------------------------


def model_spec_kind(spec: str) -> ModelKind:
    """Which source ``spec`` names: a scheme of :data:`MODEL_SCHEMES`, ``python``
    (``FILE.py:FACTORY``), ``saved`` (``FILE.pt`` / ``FILE.pth``) or ``folder`` (a directory:
    a transformers model saved with ``save_pretrained``); :class:`ModelSpecError` for anything
    else (only whether a directory exists is looked at)."""
    if not spec:
        raise ModelSpecError("empty model spec")
    if os.path.isdir(spec):
        return "folder"
    scheme, sep, _ = spec.partition(":")
    if sep and scheme in MODEL_SCHEMES:
        return scheme  # type: ignore[return-value]
    path_part = spec.rsplit(":", 1)[0] if ":" in spec else spec
    if path_part.endswith(".py"):
        return "python"
    if spec.endswith((".pt", ".pth")):
        return "saved"
    known = ", ".join(f"{name}:NAME" for name in MODEL_SCHEMES)
    raise ModelSpecError(f"cannot resolve model spec {short_repr(spec)}: expected one of {known}, "
                         "FILE.py:FACTORY, FILE.pt, or a transformers model folder")


def check_model_spec(spec: str) -> None:
    """Raise :class:`ModelSpecError` unless ``spec`` has the form of a model spec (a known scheme,
    ``FILE.py:FACTORY`` or a ``.pt`` file); nothing is read, so recipes check it when they load."""
    kind = model_spec_kind(spec)
    if kind == "python":
        file_part, sep, factory_name = spec.rpartition(":")
        if not sep or not factory_name or not file_part.endswith(".py"):
            raise ModelSpecError(f"model spec {short_repr(spec)} names a Python file but no factory: "
                                 f"write FILE.py:FACTORY, where {FACTORY_CONTRACT}")


def check_model_source(spec: str) -> None:
    """:func:`check_model_spec`, then the file a ``FILE.py:FACTORY`` or ``FILE.pt`` spec names
    exists and is readable (:class:`ModelSpecError`); nothing is imported or loaded."""
    check_model_spec(spec)
    kind = model_spec_kind(spec)
    if kind in ("python", "saved"):
        path = Path(spec.rpartition(":")[0] if kind == "python" else spec)
        check_readable_file(path, "model file", ModelSpecError)
    if kind == "folder":
        config = Path(spec) / "config.json"
        if not config.exists():
            raise ModelSpecError(f"model folder {spec} has no config.json: give a folder a transformers model was "
                                 "saved to (save_pretrained)")
        check_readable_file(config, "model config", ModelSpecError)


def check_readable_file(path: Path, role: str, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` (its message naming ``role`` and ``path``) unless ``path`` is a file this
    process may read."""
    if not path.exists():
        raise error(f"{role} {path} does not exist")
    if not path.is_file():
        raise error(f"{role} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise error(f"{role} {path} is not readable (permission denied)")


def check_function_spec(spec: str, role: str, error: type[ValueError] = ValueError) -> Path:
    """The file of a ``FILE.py:NAME`` spec, checked to have that form and to be a readable file
    (``error`` naming ``role`` and ``spec`` otherwise); nothing is imported."""
    file_part, sep, name = spec.rpartition(":")
    if not sep or not file_part.endswith(".py") or not name:
        raise error(f"{role} {short_repr(spec)}: write FILE.py:FUNCTION")
    path = Path(file_part)
    if not path.is_file():
        raise error(f"{role} {short_repr(spec)}: no such file {path}")
    if not os.access(path, os.R_OK):
        raise error(f"{role} {short_repr(spec)}: {path} is not readable (permission denied)")
    return path


# --- dynamic dims --------------------------------------------------------------------------


def parse_dynamic_dims(texts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["input_ids:1", "pixel_values:2,3"]`` (the command line's ``--dynamic NAME:DIMS``, one
    per input) -> ``{"input_ids": (1,), "pixel_values": (2, 3)}``: the dims of each named input
    that stay dynamic besides the batch (dim 0, always dynamic). :class:`ModelSpecError` naming
    the value for anything else."""
    dims: dict[str, tuple[int, ...]] = {}
    for text in texts:
        name, sep, listed = text.partition(":")
        try:
            values = tuple(int(v) for v in listed.split(",")) if sep and listed else ()
        except ValueError:
            values = ()
        if not name.isidentifier() or not values or any(v < 1 for v in values):
            raise ModelSpecError(f"--dynamic {short_repr(text)}: write INPUT:DIM[,DIM...] with the name of an input "
                                 "of forward and dims from 1 (dim 0, the batch, is always dynamic), "
                                 "e.g. input_ids:1")
        if name in dims:
            raise ModelSpecError(f"--dynamic: input {name!r} is named twice; list its dims once: {name}:1,2")
        dims[name] = tuple(sorted(set(values)))
    return dims


# --- example-input shapes --------------------------------------------------------------------


def check_input_sizes(shapes: Sequence[Shape]) -> None:
    """Refuse example-input shapes whose float32 tensors together exceed :data:`MAX_INPUT_ELEMENTS`
    elements or half the memory available now, before anything is allocated
    (:class:`ModelSpecError` naming the shape and its size)."""
    elements = sum(math.prod(int(size) for size in shape) for shape in shapes)
    label = ";".join(",".join(str(size) for size in shape) for shape in shapes)
    label = label if len(label) <= 80 else label[:77] + "..."
    size = f"{elements:,} elements, {_gib(4 * elements)} as float32"
    if elements > MAX_INPUT_ELEMENTS:
        raise ModelSpecError(f"input shape {label} is too large ({size}): spruce takes example inputs of up to "
                             f"{MAX_INPUT_ELEMENTS:,} elements ({_gib(4 * MAX_INPUT_ELEMENTS)}); one sample at the "
                             "size the model is deployed at is enough")
    available = _available_memory()
    if available is not None and 4 * elements > available // 2:
        raise ModelSpecError(f"input shape {label} is too large for this machine ({size}; "
                             f"{_gib(available)} of memory available)")


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.3g} GiB"


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --- data specs ------------------------------------------------------------------------------


def check_data_spec(spec: str) -> None:
    """Raise :class:`DataError` unless ``spec`` has the form of a data spec: a built-in data set,
    ``images:DIR``, ``text:PATH`` or ``FILE.py:make_loaders`` (the form only: nothing is read, so
    recipes check it when they load)."""
    if spec in DATASET_NAMES:
        return
    if spec.startswith(f"{TEXT_SCHEME}:"):
        if not spec.partition(":")[2]:
            raise DataError(f"data {short_repr(spec)}: write text:PATH (a text file or a folder of text files)")
        return
    if spec.startswith("images:"):
        if not spec.partition(":")[2]:
            raise DataError(f"data {short_repr(spec)}: write images:DIR")
        return
    file_part, sep, factory_name = spec.rpartition(":")
    if not sep or not file_part.endswith(".py") or not factory_name:
        raise DataError(f"unknown data {short_repr(spec)}; valid: {', '.join(DATASET_NAMES)}, images:DIR, "
                        "text:PATH or FILE.py:make_loaders")


def check_data_source(spec: str) -> None:
    """:func:`check_data_spec`, then the folder of ``images:DIR``, the file or folder of
    ``text:PATH`` or the file of ``FILE.py:make_loaders`` exists and is readable
    (:class:`DataError`); nothing is read."""
    check_data_spec(spec)
    if spec in DATASET_NAMES:
        return
    if spec.startswith(f"{TEXT_SCHEME}:"):
        path = Path(spec.partition(":")[2])
        if not path.exists():
            raise DataError(f"data {short_repr(spec)}: no such file or folder {path}")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise DataError(f"data {short_repr(spec)}: {path} is not readable (permission denied)")
        return
    if spec.startswith("images:"):
        folder = Path(spec.partition(":")[2])
        if not folder.is_dir():
            raise DataError(f"data {short_repr(spec)}: no such folder {folder}")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise DataError(f"data {short_repr(spec)}: folder {folder} is not readable (permission denied)")
        return
    check_function_spec(spec, "data", DataError)


# --- precisions ------------------------------------------------------------------------------


def check_precision_spec(target: str, precision: str, option: str = "--precision") -> None:
    """Raise :class:`RecipeError` unless ``precision`` is one of :data:`PRECISIONS` and the
    built-in ``target`` builds it (:data:`TARGET_PRECISIONS`), e.g. ``--precision int8: target
    torch does not build int8 artifacts (it takes fp32, fp16, bf16; int8: onnxruntime)``; the
    message names ``option`` (``--selection-precision`` for the latency table's). A target that
    is not built in passes (its class checks it when it loads)."""
    if precision not in PRECISIONS:
        raise RecipeError(f"{option} must be one of {', '.join(PRECISIONS)}, got {short_repr(precision)}")
    supported = TARGET_PRECISIONS.get(target)
    if supported is not None and precision not in supported:
        others = [name for name, kinds in TARGET_PRECISIONS.items() if precision in kinds]
        raise RecipeError(f"{option} {precision}: target {target} does not build {precision} artifacts (it takes "
                          f"{', '.join(supported)}; {precision}: {', '.join(others)})")


# --- budgets ---------------------------------------------------------------------------------


def parse_budget(text: str) -> dict[str, float]:
    """``latency=0.5`` -> ``{"latency": 0.5}`` (the command line's --budget), checked by
    :func:`check_budget`; :class:`RecipeError` otherwise."""
    kind, sep, value = text.partition("=")
    if not sep:
        raise RecipeError(f"--budget must look like latency=0.5 (or decode=..., flops=..., params=...), got "
                          f"{short_repr(text)}")
    try:
        fraction = float(value)
    except ValueError:
        raise RecipeError(f"--budget {short_repr(kind)[1:-1]}: {short_repr(value)} is not a number") from None
    budget = {kind.strip(): fraction}
    try:
        check_budget(budget)
    except ValueError as exc:
        raise RecipeError(f"--budget: {exc}") from None
    return budget


def check_budget(budget: Mapping[str, float]) -> None:
    """Raise ``ValueError`` unless ``budget`` is one ``{kind: fraction}`` with a kind of
    :data:`BUDGET_KINDS` and a fraction of dense in (0, 1]."""
    if len(budget) != 1:
        raise ValueError(f"must be one of {{latency: f}}, {{decode: f}}, {{flops: f}}, {{params: f}}, got "
                         f"{short_repr(budget)}")
    ((kind, fraction),) = budget.items()
    if kind not in BUDGET_KINDS:
        raise ValueError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, got {short_repr(kind)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"budget {kind} must be a fraction of dense in (0, 1], got {fraction!r}")


def cost_budget(budget: Mapping[str, float] | None) -> dict[str, float] | None:
    """``budget`` as a method's knapsack counts it: a ``decode`` budget is a latency (measured per
    decoded token instead of per prefill), so ``{"decode": f}`` -> ``{"latency": f}``; any other
    budget (or None) as it is."""
    if budget is None or "decode" not in budget:
        return None if budget is None else dict(budget)
    return {"latency": budget["decode"]}
