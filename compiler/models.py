"""Turn a model spec string into ``(model, example_inputs)``.

A spec names where a model comes from; one resolver per scheme lives in
``RESOLVERS`` so adding a source is adding one entry:

- ``torchvision:NAME`` — a torchvision classification model, random weights.
- ``timm:NAME`` — a timm model, random weights (needs timm installed).
- ``FILE.py:FACTORY`` — call ``FACTORY()`` from a Python file.
- ``FILE.pt`` / ``FILE.pth`` — a whole module saved with ``torch.save(model)``.

Every spec that cannot be resolved raises :class:`ModelSpecError`, a
``ValueError`` whose message says what was wrong and, where possible, what
would have been right.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

DEFAULT_INPUT_SHAPE: tuple[int, ...] = (1, 3, 224, 224)

# torchvision classifiers whose builder or stem needs an input other than 224x224.
TORCHVISION_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "inception_v3": (1, 3, 299, 299),
}

Shape = tuple[int, ...]
ExampleInputs = tuple[torch.Tensor, ...]


class ModelSpecError(ValueError):
    """A model spec that does not name a loadable model."""


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


def random_inputs(shapes: Sequence[Shape]) -> ExampleInputs:
    """Seeded standard-normal float32 tensors, one per shape."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


# --- scheme dispatch ---------------------------------------------------------------

Resolver = Callable[[str], tuple[nn.Module, ExampleInputs]]


def _resolver_for(spec: str) -> Resolver:
    """Pick the resolver for a spec by its prefix or file suffix."""
    if not spec:
        raise ModelSpecError("empty model spec")
    scheme, sep, _ = spec.partition(":")
    if sep and scheme in RESOLVERS:
        return RESOLVERS[scheme]
    path_part = spec.rsplit(":", 1)[0] if ":" in spec else spec
    if path_part.endswith(".py"):
        return _resolve_python_file
    if spec.endswith((".pt", ".pth")):
        return _resolve_saved_module
    known = ", ".join(f"{name}:NAME" for name in RESOLVERS)
    raise ModelSpecError(
        f"cannot resolve model spec {spec!r}: expected one of {known}, "
        "FILE.py:FACTORY, or FILE.pt"
    )


def _resolve_torchvision(spec: str) -> tuple[nn.Module, ExampleInputs]:
    """Build a torchvision classifier with random weights."""
    name = spec.partition(":")[2]
    try:
        import torchvision
    except ImportError as exc:
        raise ModelSpecError(f"{spec!r} needs torchvision, which is not installed") from exc
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
            f"{spec!r} needs timm, which is not installed (pip install timm)"
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
        raise ModelSpecError(f"model spec {spec!r} names a Python file but no factory: "
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


RESOLVERS: dict[str, Resolver] = {
    "torchvision": _resolve_torchvision,
    "timm": _resolve_timm,
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
    """Split a factory's result into a module and example inputs."""
    inputs: Any = None
    if isinstance(produced, tuple) and len(produced) == 2 and isinstance(produced[0], nn.Module):
        produced, inputs = produced
    if not isinstance(produced, nn.Module):
        raise ModelSpecError(
            f"{where} returned {type(produced).__name__}; expected a torch.nn.Module "
            "or a (module, example_inputs) tuple"
        )
    if inputs is None:
        inputs = _example_inputs_from(source)
    return produced, _as_input_tuple(inputs, where)


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
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise ModelSpecError(
        f"example inputs for {where} must be a tensor or a tuple of tensors, "
        f"got {type(inputs).__name__}"
    )


def _unknown_name_message(source: str, name: str, available: Sequence[str]) -> str:
    """Say a name is unknown, with the closest known names."""
    close = difflib.get_close_matches(name, available, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown {source} model {name!r}{hint}"


def _missing_factory_message(source: ModuleType, file_part: str, factory_name: str) -> str:
    """Say a factory is missing, naming the callables the file does define."""
    callables = [
        name for name, value in vars(source).items()
        if callable(value) and not name.startswith("_")
        and getattr(value, "__module__", None) == source.__name__
    ]
    close = difflib.get_close_matches(factory_name, callables, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{file_part} has no callable {factory_name!r}{hint}"
