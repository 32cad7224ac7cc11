"""Plain fx symbolic tracing with spruce's leaf-module policy (a module with a channel rule
is one call), reporting the module and user line where tracing failed."""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx, nn
from torch.nn.utils import parametrize

from ..passes.rules.registry import MODULE_RULES
from .errors import Failure, FxFailure, user_frame

__all__ = ["SpruceTracer", "fx_trace"]


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


def fx_trace(module: nn.Module, leaf_modules: Iterable[object], prefix: str = "") -> fx.GraphModule:
    """Symbolic trace, raising a FxFailure with the failing module path."""
    tracer = SpruceTracer(leaf_modules)
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # any failure inside user code while tracing
        path = tracer.fault_path or "<root>"
        where, line = user_frame(exc.__traceback__)
        if path != "<root>" and prefix:
            path = f"{prefix}.{path}"
        elif path == "<root>" and prefix:
            path = prefix
        raise FxFailure(Failure("other", path, f"{type(exc).__name__}: {exc}".strip(), where, line, exc)) from exc
    return fx.GraphModule(tracer.root, graph, type(module).__name__)
