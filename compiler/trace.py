"""The front door of the compiler: symbolic tracing plus shape propagation.

``trace`` returns a ``torch.fx.GraphModule`` whose tensor nodes carry
``meta["tensor_meta"]`` (shape, dtype). ``capture`` returns the
:class:`~spruce.passes.graph.CapturedGraph` that passes take: the eval-mode graph and,
when the model's Python code branches on ``self.training`` (GoogLeNet/Inception
auxiliary heads), the training-mode graph too, so that passes can keep both valid.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from ..passes.graph import CapturedGraph, as_input_tuple

__all__ = ["TraceError", "as_input_tuple", "capture", "trace"]


class TraceError(RuntimeError):
    """The model could not be turned into an fx graph (or its shapes could not be
    propagated). The message names the module path and the operation at fault."""

    def __init__(self, message: str, module_path: str | None = None, operation: str | None = None):
        super().__init__(message)
        self.module_path = module_path
        self.operation = operation


class _SpruceTracer(fx.Tracer):
    """fx tracer with a user leaf-module policy that remembers where tracing failed."""

    def __init__(self, leaf_modules: Iterable[object] = ()):
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.fault_path: str | None = None

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        if parametrize.is_parametrized(m):
            # its weight is computed in forward (weight_norm, spectral_norm, ...): trace through it, so
            # the graph computes the weight from the parameters instead of holding a snapshot of it
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.fault_path is None:
                self.fault_path = self.path_of_module(m) or "<root>"
            raise


def _user_frame(tb) -> str | None:
    """The innermost traceback frame outside torch: the user's line that failed."""
    torch_dir = os.path.dirname(torch.__file__)
    found = None
    for frame in traceback.extract_tb(tb):
        if not frame.filename.startswith(torch_dir):
            found = frame
    if found is None:
        return None
    return f"{found.filename}:{found.lineno} `{(found.line or '').strip()}`"


def _symbolic_trace(model: torch.nn.Module, leaf_modules: Iterable[object]) -> fx.GraphModule:
    tracer = _SpruceTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # any failure inside user code while tracing
        path = tracer.fault_path or "<root>"
        where = _user_frame(exc.__traceback__)
        operation = f"{type(exc).__name__}: {exc}".strip()
        if path == "<root>":  # the model's own forward branches: a leaf would hide the whole model
            hint = ("the model's own forward depends on tensor values; make it free of data-dependent "
                    "control flow (e.g. torch.where instead of if), or compress its submodules separately")
        else:
            hint = (
                f"mark module '{path}' (or its type) as a leaf with leaf_modules=[...] so it is kept "
                "as one opaque call, or make its forward free of data-dependent control flow"
            )
        msg = f"cannot trace module '{path}' ({type(model).__name__} root): {operation}"
        if where:
            msg += f"\n  at {where}"
        msg += f"\n  hint: {hint}"
        raise TraceError(msg, module_path=path, operation=operation) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


@contextlib.contextmanager
def _preserved_state(model: torch.nn.Module):
    """Run code that may update buffers (BatchNorm statistics) or consume RNG
    without changing the model or the global random state."""
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    if k in saved:
                        b.copy_(saved[k])


def _meta_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return {name: torch.empty_like(t, device="meta") for name, t in named}


def _to_meta(value: object) -> object:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


class _QuietShapeProp(ShapeProp):
    """``ShapeProp`` without the traceback torch prints to stderr for a node that fails: the
    failure is raised (as a :class:`TraceError` naming the node) instead. What the model itself
    writes to stderr while a node runs (warnings, prints) still reaches stderr."""

    failed_node: fx.Node | None = None

    def run_node(self, n: fx.Node):
        written = io.StringIO()
        try:
            with contextlib.redirect_stderr(written):
                result = super().run_node(n)
        except Exception:
            self.failed_node = n
            raise
        if written.getvalue():
            sys.stderr.write(written.getvalue())
        return result


def _propagate(gm: fx.GraphModule, inputs: Sequence[object]) -> None:
    """Shape/dtype meta on every node. Tries, cheapest first: meta tensors (no compute,
    no copy of the weights), fake tensors, then a real run for ops neither supports."""
    from torch.nn.utils.stateless import _reparametrize_module

    try:
        with torch.no_grad(), _reparametrize_module(gm, _meta_state(gm)):
            _QuietShapeProp(gm).propagate(*[_to_meta(x) for x in inputs])
        return
    except Exception:  # noqa: BLE001, S110 - any meta-tensor limitation: try the next way
        pass
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with torch.no_grad():
            _QuietShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
        return
    except Exception:  # noqa: BLE001, S110 - any fake-tensor limitation: fall back to a real run
        pass
    propagation = _QuietShapeProp(gm)
    try:
        with torch.no_grad():
            propagation.propagate(*inputs)
    except Exception as exc:
        node = propagation.failed_node
        cause = exc.__cause__ if node is not None and exc.__cause__ is not None else exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        where = f" at node '{node.name}'{_module_of(gm, node)}" if node is not None else ""
        shapes = "; ".join(",".join(map(str, x.shape)) for x in inputs if isinstance(x, torch.Tensor))
        raise TraceError(
            f"example inputs of shape {shapes} do not fit the model{where}: {type(cause).__name__}: {reason}",
            module_path=node.name if node is not None else None,
            operation=reason,
        ) from cause


def _module_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """`` (module NAME, a TYPE)`` for a module call, else empty."""
    if node.op != "call_module":
        return ""
    try:
        return f" (module {node.target}, a {type(gm.get_submodule(node.target)).__name__})"
    except AttributeError:
        return ""


def trace(
    model: torch.nn.Module,
    example_inputs: object,
    leaf_modules: Iterable[object] = (),
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule whose every tensor node has shape/dtype meta.

    ``leaf_modules`` lists module types or qualified names kept as opaque calls.
    Raises :class:`TraceError` naming the module and operation when tracing fails,
    or the node where the example inputs stop fitting the model.
    """
    inputs = as_input_tuple(example_inputs)
    gm = _symbolic_trace(model, leaf_modules)
    was_training = model.training
    try:
        with _preserved_state(model):
            gm.train(was_training)
            _propagate(gm, inputs)
    finally:
        model.train(was_training)
    return gm


def _batch_doubled(inputs: tuple) -> tuple:
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)


def capture(
    model: torch.nn.Module, example_inputs: object, leaf_modules: Iterable[object] = ()
) -> CapturedGraph:
    """Capture ``model`` at ``example_inputs``: the eval-mode graph and, if its code branches
    on ``self.training``, the training-mode graph too. Neither the model's mode, buffers nor
    RNG state change. Raises :class:`TraceError` as :func:`trace` does."""
    inputs = as_input_tuple(example_inputs)
    was_training = model.training
    try:
        model.eval()
        eval_gm = _symbolic_trace(model, leaf_modules)
        with _preserved_state(model):
            eval_gm.eval()
            _propagate(eval_gm, inputs)
        model.train()
        try:
            train_gm = _symbolic_trace(model, leaf_modules)
        except TraceError as exc:
            warnings.warn(f"training-mode graph not traced, the compact model will support eval mode only: {exc}",
                          stacklevel=2)
            return CapturedGraph(eval_gm, None, model, inputs)
        if train_gm.code == eval_gm.code:
            return CapturedGraph(eval_gm, None, model, inputs)
        train_gm.train()
        with _preserved_state(model):
            try:
                # BatchNorm in training mode needs more than one value per channel.
                _propagate(train_gm, _batch_doubled(inputs))
            except TraceError:
                _propagate(train_gm, inputs)
        return CapturedGraph(eval_gm, train_gm, model, inputs)
    finally:
        model.train(was_training)
