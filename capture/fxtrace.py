"""Plain fx symbolic tracing with spruce's leaf-module policy (a module with a channel rule
is one call), reporting the module and user line where tracing failed."""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from torch import fx, nn
from torch.nn.utils import parametrize

from ..passes.rules.registry import MODULE_RULES
from .errors import Failure, FxFailure, user_frame

__all__ = ["SpruceTracer", "fx_trace", "none_arguments"]


class SpruceTracer(fx.Tracer):
    """fx tracer with a user leaf-module policy that remembers where tracing failed."""

    def __init__(self, leaf_modules: Iterable[object] = ()):
        super().__init__()
        leaf_modules = list(leaf_modules)
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.fault_path: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        if parametrize.is_parametrized(m):
            # its weight is computed in forward (weight_norm, spectral_norm, ...): trace through it, so
            # the graph computes the weight from the parameters instead of holding a snapshot of it
            return False
        if type(m) in MODULE_RULES:  # a rule says how channels flow through it: one call
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.fault_path is None:
                self.fault_path = self.path_of_module(m) or "<root>"
            raise


def none_arguments(module: nn.Module, args: tuple, kwargs: dict) -> tuple[str, ...]:
    """The arguments of ``module.forward`` that are ``None`` in the call ``(args, kwargs)``
    (given so, or left at a ``None`` default)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return ()
    bound.apply_defaults()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return tuple(name for name, value in bound.arguments.items()
                 if value is None and bound.signature.parameters[name].kind not in variadic)


def _specialise_to_none(graph: fx.Graph, none_args: tuple[str, ...]) -> None:
    """After tracing with ``None`` concrete arguments: give the placeholders their argument's
    name back (the forward keeps its signature: the argument may be left out or passed as
    ``None``; fx's ``_assert_is_none`` check refuses anything else)."""
    names = {n.target for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        base, _, count = node.target.rpartition("_") if node.op == "placeholder" else ("", "", "")
        if base in none_args and count == "1" and base not in names:
            node.target = base


def fx_trace(module: nn.Module, leaf_modules: Iterable[object], prefix: str = "",
             none_args: tuple[str, ...] = ()) -> fx.GraphModule:
    """Symbolic trace, raising a FxFailure with the failing module path. Arguments of
    ``none_args`` are traced as ``None`` (a branch ``if text is None`` takes its ``None``
    side, as the example runs it) rather than as tensors."""
    tracer = SpruceTracer(leaf_modules)
    try:
        graph = tracer.trace(module, concrete_args=dict.fromkeys(none_args) or None)
        if none_args:
            _specialise_to_none(graph, none_args)
    except Exception as exc:  # any failure inside user code while tracing
        path = tracer.fault_path or "<root>"
        where, line = user_frame(exc.__traceback__)
        if path != "<root>" and prefix:
            path = f"{prefix}.{path}"
        elif path == "<root>" and prefix:
            path = prefix
        raise FxFailure(Failure("other", path, f"{type(exc).__name__}: {exc}".strip(), where, line, exc)) from exc
    return fx.GraphModule(tracer.root, graph, type(module).__name__)
