"""Turn a model spec string into ``(model, example_inputs)``.

A spec names where a model comes from; one resolver per scheme lives in
``RESOLVERS`` so adding a source is adding one entry:

- ``torchvision:NAME`` — a torchvision classification model, random weights.
- ``timm:NAME`` — a timm model, random weights (needs timm installed).
- ``FILE.py:FACTORY`` — call ``FACTORY()`` from a Python file.
- ``FILE.pt`` / ``FILE.pth`` — a whole module saved with ``torch.save(model)``.
- ``FOLDER`` — a transformers model saved with ``save_pretrained`` (its own class, from
  ``config.architectures``), with ``input_ids`` of one sequence of 8 tokens as the example.

Every spec that cannot be resolved raises :class:`ModelSpecError`, a
``ValueError`` whose message says what was wrong and, where possible, what
would have been right.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..passes.config import short_repr
from .specs import (
    DEFAULT_INPUT_SHAPE,
    FACTORY_RESULT,
    MAX_INPUT_ELEMENTS,
    ModelSpecError,
    Shape,
    check_function_spec,
    check_input_sizes,
    check_model_spec,
    model_spec_kind,
)

__all__ = ["DEFAULT_INPUT_SHAPE", "MAX_INPUT_ELEMENTS", "RESOLVERS", "ExampleInputs", "ModelSpecError", "Shape",
           "check_input_sizes", "check_model_runs", "check_model_spec", "import_file", "load_function",
           "input_shapes", "random_inputs", "resolve_model"]

# torchvision classifiers whose builder or stem needs an input other than 224x224.
TORCHVISION_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "inception_v3": (1, 3, 299, 299),
}

# positional inputs, or keyword inputs (a transformers model's input_ids, attention_mask, ...)
ExampleInputs = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def resolve_model(
    spec: str, input_shapes: Sequence[Shape] | None = None
) -> tuple[nn.Module, ExampleInputs]:
    """Load the model a spec names, in eval mode, with example inputs for it.

    ``input_shapes`` (one shape per model input) overrides the example inputs
    the source would give; without it each scheme picks its own default.
    Example inputs are seeded random float32 tensors, so two calls give equal
    inputs. Raises :class:`ModelSpecError` if the spec does not resolve.
    """
    resolver = _resolver_for(spec)
    model, example_inputs = resolver(spec)
    if input_shapes is not None:
        example_inputs = random_inputs(input_shapes)
    return model.eval(), example_inputs


def input_shapes(example_inputs: ExampleInputs) -> list[list[int]] | dict[str, list[int]]:
    """The shapes of example inputs, for reports: a list (positional inputs) or a dict by name."""
    if isinstance(example_inputs, dict):
        return {name: list(t.shape) for name, t in example_inputs.items()}
    return [list(t.shape) for t in example_inputs]


def random_inputs(shapes: Sequence[Shape]) -> ExampleInputs:
    """Seeded standard-normal float32 tensors, one per shape (sizes checked before allocating,
    see :func:`check_input_sizes`)."""
    check_input_sizes(shapes)
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


def check_model_runs(model: nn.Module, example_inputs: Sequence[torch.Tensor], spec: str,
                     shape_option: str | None = None) -> None:
    """Run ``model`` once on ``example_inputs`` (no gradients, the global RNG untouched) and raise
    :class:`ModelSpecError` naming the spec, the input shapes (and ``shape_option``, the option
    that set them) and the error when it fails. A model whose tensors are on the ``meta`` device
    (no data) is not run: the analysis works on it, and what needs data refuses it by name."""
    tensors = list(example_inputs.values()) if isinstance(example_inputs, dict) else list(example_inputs)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers(), *tensors)):
        return
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            else:
                model(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model on these inputs
        shapes = "; ".join(",".join(map(str, t.shape)) for t in tensors)
        given = f" (from {shape_option})" if shape_option else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelSpecError(f"model {spec} does not run on example inputs of shape {shapes}{given}: "
                             f"{type(exc).__name__}: {reason[:300]}") from None


# --- scheme dispatch ---------------------------------------------------------------

Resolver = Callable[[str], tuple[nn.Module, ExampleInputs]]


def _resolver_for(spec: str) -> Resolver:
    """The resolver of the source ``spec`` names (its form checked by :func:`check_model_spec`)."""
    check_model_spec(spec)
    return RESOLVERS[model_spec_kind(spec)]


def _resolve_torchvision(spec: str) -> tuple[nn.Module, ExampleInputs]:
    """Build a torchvision classifier with random weights."""
    name = spec.partition(":")[2]
    try:
        import torchvision
    except ImportError as exc:
        raise ModelSpecError(f"{short_repr(spec)} needs torchvision, which is not installed") from exc
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ModelSpecError(_unknown_name_message("torchvision", name, available))
    with warnings.catch_warnings():
        # e.g. inception_v3 warns that its default init will change; not the user's concern.
        warnings.simplefilter("ignore", FutureWarning)
        model = torchvision.models.get_model(name, weights=None)
    shape = TORCHVISION_INPUT_SHAPES.get(name, DEFAULT_INPUT_SHAPE)
    return model, random_inputs([shape])


def _resolve_timm(spec: str) -> tuple[nn.Module, ExampleInputs]:
    """Build a timm model with random weights; input size from its config."""
    name = spec.partition(":")[2]
    try:
        import timm
    except ImportError as exc:
        raise ModelSpecError(
            f"{short_repr(spec)} needs timm, which is not installed (pip install timm)"
        ) from exc
    available = timm.list_models()
    if name not in available:
        raise ModelSpecError(_unknown_name_message("timm", name, available))
    model = timm.create_model(name, pretrained=False)
    return model, random_inputs([_timm_input_shape(model)])


def _timm_input_shape(model: nn.Module) -> Shape:
    """Batch-1 input shape from a timm model's pretrained/default config."""
    for attribute in ("pretrained_cfg", "default_cfg"):
        config = getattr(model, attribute, None) or {}
        input_size = config.get("input_size")
        if input_size:
            return (1, *input_size)
    return DEFAULT_INPUT_SHAPE


def _resolve_python_file(spec: str) -> tuple[nn.Module, ExampleInputs]:
    """Call ``FACTORY()`` from ``FILE.py``; see :func:`_example_inputs_from` for inputs."""
    file_part, sep, factory_name = spec.rpartition(":")
    if not sep or not factory_name:
        raise ModelSpecError(f"model spec {short_repr(spec)} names a Python file but no factory: "
                             "write FILE.py:FACTORY")
    source = import_file(Path(file_part))
    factory = getattr(source, factory_name, None)
    if not callable(factory):
        raise ModelSpecError(_missing_factory_message(source, file_part, factory_name))
    try:
        produced = factory()
    except Exception as exc:
        raise ModelSpecError(
            f"factory {factory_name}() in {file_part} raised {type(exc).__name__}: {exc}"
        ) from exc
    return _module_and_inputs(produced, source, f"{file_part}:{factory_name}")


def _resolve_saved_module(spec: str) -> tuple[nn.Module, ExampleInputs]:
    """Load a module pickled whole with ``torch.save(model)``.

    The file holds no example inputs, so the default shape is used unless the
    caller passes ``input_shapes``.
    """
    path = Path(spec)
    if not path.is_file():
        raise ModelSpecError(f"model file {spec} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelSpecError(
            f"cannot load {spec} with torch.load: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(loaded, nn.Module):
        hint = " (a state dict: save the module itself)" if isinstance(loaded, dict) else ""
        raise ModelSpecError(
            f"{spec} holds a {type(loaded).__name__}, not a torch.nn.Module{hint}"
        )
    return loaded, random_inputs([DEFAULT_INPUT_SHAPE])


LM_DEFAULT_SEQ_LEN = 8  # a folder's example length (the sequence dim stays dynamic); compile takes the data's


def _resolve_folder(spec: str) -> tuple[nn.Module, ExampleInputs]:
    """A transformers model saved with ``save_pretrained``: the class its config names
    (``architectures``), in eval mode, with ``input_ids`` (1, L) of seeded random tokens above the special ids: L the
    ``sequence_length`` of the folder's ``training.json`` if it has one, else
    :data:`LM_DEFAULT_SEQ_LEN`. Compile replaces them by the data's first
    sequence (or cuts them to ``seq_len``); its tokenizer is read by the text data.

    Raises:
        ModelSpecError: transformers is missing, the config names no transformers class, or
            the folder does not load (the loader's first line)."""
    try:
        import transformers
    except ImportError:
        raise ModelSpecError(f"model folder {spec}: loading it needs the transformers package") from None
    try:
        config = transformers.AutoConfig.from_pretrained(spec)
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else None
        if cls is None:
            raise ModelSpecError(f"model folder {spec}: its config names no transformers class "
                                 f"(architectures: {names})")
        model = cls.from_pretrained(spec)
    except ModelSpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load the folder is the user's to fix
        raise ModelSpecError(f"cannot load model folder {spec}: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from None
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    length = _trained_length(Path(spec)) or LM_DEFAULT_SEQ_LEN
    ids = torch.randint(min(3, vocab - 1), vocab, (1, length), generator=torch.Generator().manual_seed(0))
    return model.eval(), {"input_ids": ids}


def _trained_length(folder: Path) -> int | None:
    """The sequence length the model was trained at, from the folder's ``training.json``
    (``sequence_length``, as the example LM's training script writes it), else None."""
    try:
        length = json.loads((folder / "training.json").read_text(encoding="utf-8")).get("sequence_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(length) if isinstance(length, int) and length >= 2 else None


# One resolver per kind of :func:`~spruce.compiler.specs.model_spec_kind` (the schemes of
# ``MODEL_SCHEMES``, then Python files and saved modules).
RESOLVERS: dict[str, Resolver] = {
    "torchvision": _resolve_torchvision,
    "timm": _resolve_timm,
    "python": _resolve_python_file,
    "saved": _resolve_saved_module,
    "folder": _resolve_folder,
}


# --- helpers -----------------------------------------------------------------------


def import_file(path: Path) -> ModuleType:
    """Import a Python file by path under a private module name."""
    if not path.is_file():
        raise ModelSpecError(f"model file {path} does not exist")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    module_name = f"_spruce_model_{resolved.stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelSpecError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    # Registered before exec so dataclasses/pickling inside the file can find it.
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ModelSpecError(
            f"importing {path} raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _module_and_inputs(
    produced: Any, source: ModuleType, where: str
) -> tuple[nn.Module, ExampleInputs]:
    """Split a factory's result into a module and example inputs (``FACTORY_CONTRACT`` in specs);
    :class:`ModelSpecError` saying what was returned and what is expected otherwise."""
    inputs: Any = None
    module = produced
    if isinstance(produced, tuple) and len(produced) == 2 and isinstance(produced[0], nn.Module):
        module, inputs = produced
    if not isinstance(module, nn.Module):
        raise ModelSpecError(_contract_message(where, produced))
    if inputs is None:
        inputs = _example_inputs_from(source)
    elif isinstance(inputs, dict) and inputs and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in inputs.items()):
        return module, dict(inputs)  # keyword inputs
    elif not _is_tensors(inputs):
        raise ModelSpecError(_contract_message(where, produced))
    return module, _as_input_tuple(inputs, where)


def _contract_message(where: str, produced: Any) -> str:
    """A factory returned something else than its contract: say what, and what is expected."""
    rest = list(produced[1:]) if isinstance(produced, tuple) else []
    none_inside = any(item is None or (isinstance(item, (tuple, list)) and any(x is None for x in item))
                      for item in rest)
    hint = ("; an optional input given as None is not an example input: leave it out, or give a tensor"
            if none_inside else "")
    return f"{where} returned {describe_value(produced)}; expected {FACTORY_RESULT}{hint}"


def describe_value(value: Any, depth: int = 0) -> str:
    """A short description of ``value`` for messages: a tensor with its shape and dtype, tuples and
    lists element by element (at most 6 elements, 3 levels deep), anything else by type name."""
    if isinstance(value, torch.Tensor):
        return f"Tensor[{','.join(map(str, value.shape))}] {str(value.dtype).removeprefix('torch.')}"
    if value is None:
        return "None"
    if isinstance(value, nn.Module):
        return f"{type(value).__name__} (a Module)"
    if isinstance(value, (tuple, list)) and depth < 3:
        items = [describe_value(item, depth + 1) for item in value[:6]] + (["..."] if len(value) > 6 else [])
        inner = ", ".join(items) + ("," if isinstance(value, tuple) and len(value) == 1 else "")
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return type(value).__name__


def _is_tensors(inputs: Any) -> bool:
    return isinstance(inputs, torch.Tensor) or (
        isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs))


def _example_inputs_from(source: ModuleType) -> Any:
    """``EXAMPLE_INPUTS`` or ``example_inputs()`` from the file, else the default shape."""
    if hasattr(source, "EXAMPLE_INPUTS"):
        return source.EXAMPLE_INPUTS
    maker = getattr(source, "example_inputs", None)
    if callable(maker):
        return maker()
    return random_inputs([DEFAULT_INPUT_SHAPE])


def _as_input_tuple(inputs: Any, where: str) -> ExampleInputs:
    """Normalise a tensor or a sequence of tensors to a tuple of tensors."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if _is_tensors(inputs):
        return tuple(inputs)
    raise ModelSpecError(f"example inputs for {where} are {describe_value(inputs)}; expected a tensor or a tuple of "
                         "tensors, one per positional input of forward")


def _unknown_name_message(source: str, name: str, available: Sequence[str]) -> str:
    """Say a name is unknown, with the closest known names."""
    close = difflib.get_close_matches(name, available, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown {source} model {short_repr(name)}{hint}"


def _missing_factory_message(source: ModuleType, file_part: str, factory_name: str) -> str:
    """Say a factory is missing, naming the callables the file does define."""
    callables = [
        name for name, value in vars(source).items()
        if callable(value) and not name.startswith("_")
        and getattr(value, "__module__", None) == source.__name__
    ]
    close = difflib.get_close_matches(factory_name, callables, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{file_part} has no callable {short_repr(factory_name)}{hint}"


def load_function(spec: str, role: str, error: type[ValueError] = ValueError) -> Callable[..., Any]:
    """The function ``FILE.py:NAME`` names (``role`` and ``spec`` in every message); raises
    ``error`` for a malformed spec, a missing file, a file that fails to import, or no such
    function."""
    path = check_function_spec(spec, role, error)
    name = spec.rpartition(":")[2]
    try:
        source = import_file(path)
    except ModelSpecError as exc:
        raise error(f"{role} {short_repr(spec)}: {exc}") from None
    function = getattr(source, name, None)
    if not callable(function):
        raise error(f"{role} {short_repr(spec)}: {path} has no function {short_repr(name)}")
    return function
