"""Capture: a model at its example input becomes the graphs that passes take.

The user never chooses how. In order:

1. **Plain fx** symbolic tracing of the root, the fast path: its graph calls the
   user's modules (what masks and latency tables key on) and is symbolic in every
   shape, so the batch stays dynamic by construction.
2. **torch.export** (non-strict) of the root, when fx fails (``*args`` wrappers,
   iteration over chunks or shapes, branches on a shape, dtype or device, list/dict
   inputs...): the user's Python runs at the example's shapes and the graph is ATen
   operators on the user's parameters. The batch dimension (dim 0 of every input
   tensor) is dynamic, other dims where the user declares them (``dynamic_shapes``, as
   in ``torch.export``). A batch of one cannot be marked dynamic (0/1 specialisation),
   so the model is exported at a second batch size (the example tiled) and shapes are
   then propagated at the example.
3. **Pieces**, when the root cannot be captured whole because it filters by data
   (detection post-processing: NMS, top-k, thresholds, anchor matching) or runs a
   module listed in ``leaf_modules``: the model is run eagerly at the example and at a
   second batch size with hooks; every module owning parameters that was called is
   captured (fx, else export) if it can be, else its children are tried. Dims that
   differ between the recorded calls (batch, number of proposals) are dynamic. Each
   piece is checked against its recorded calls. A third eager run finds which piece
   outputs feed other pieces as the same tensor objects (coupled channels: a
   :class:`~spruce.passes.graph.Link`) and which reach eager code (pinned). The glue
   code keeps running eagerly in the compact model.

Only truly data-dependent control flow (a Python branch on a tensor *value*) fails:
:class:`TraceError` names the module, the file:line and the right hint (``torch.cond``,
``torch.where``, a leaf module, or leaving post-processing out of the model). Data-
dependent *shapes* (filtering) are post-processing and stay eager.

Neither the model's mode, its buffers, its Python attributes nor the global RNG state
change.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import operator
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..passes.graph import CapturedGraph, Link, Piece, has_pytree_io, split_inputs, tensor_leaves
from ..passes.rules.meta import MetaRules
from ..passes.rules.registry import MODULE_RULES
from .transformers import capture_settings

__all__ = ["INPUT_ADAPTERS", "InputAdapter", "TraceError", "capture", "resized_batch"]


class TraceError(RuntimeError):
    """The model could not be captured (or its shapes could not be propagated). The
    message names the module path, the operation and the user's source line at fault,
    with a hint."""

    def __init__(self, message: str, module_path: str | None = None, operation: str | None = None):
        super().__init__(message)
        self.module_path = module_path
        self.operation = operation


# ---------------------------------------------------------------------------
# input adapters: what "the batch" of an example is
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InputAdapter:
    """How to read and change the batch size of a model family's example inputs.

    ``batch_size(args, kwargs)`` returns the example's batch size (None: unknown);
    ``resize(args, kwargs, n)`` returns the inputs at batch size ``n``, repeating the
    example's samples cyclically."""

    batch_size: Callable[[tuple, dict], int | None]
    resize: Callable[[tuple, dict, int], tuple[tuple, dict]]


def _leading_batch(args: tuple, kwargs: dict) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _cycle(n: int, size: int) -> torch.Tensor:
    return torch.arange(n) % size


def _resize_leading(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    batch = _leading_batch(args, kwargs)

    def resize(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch:
            return leaf.index_select(0, _cycle(n, batch).to(leaf.device))
        return leaf

    return pytree.tree_map(resize, (args, kwargs))


def _image_list_batch(args: tuple, kwargs: dict) -> int | None:
    images = args[0] if args else kwargs.get("images")
    return len(images) if isinstance(images, (list, tuple)) else None


def _resize_image_list(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    """torchvision detectors take a list of images (and of targets in training)."""
    def cyc(seq):
        return [seq[i % len(seq)] for i in range(n)]

    args = tuple(cyc(a) if i in (0, 1) and isinstance(a, (list, tuple)) else a for i, a in enumerate(args))
    kwargs = {k: cyc(v) if k in ("images", "targets") and isinstance(v, (list, tuple)) else v
              for k, v in kwargs.items()}
    return args, kwargs


DEFAULT_ADAPTER = InputAdapter(_leading_batch, _resize_leading)
IMAGE_LIST_ADAPTER = InputAdapter(_image_list_batch, _resize_image_list)
# model class -> adapter (looked up along the MRO); families register here
INPUT_ADAPTERS: dict[type, InputAdapter] = {}


def _register_torchvision_adapters() -> None:
    try:
        from torchvision.models import detection
    except ImportError:  # torchvision is optional
        return
    for name in ("GeneralizedRCNN", "RetinaNet", "SSD", "FCOS"):
        cls = getattr(detection, name, None) or getattr(getattr(detection, name.lower(), None), name, None)
        if cls is None:
            for mod in (detection.generalized_rcnn, detection.retinanet, detection.ssd, detection.fcos):
                cls = getattr(mod, name, None) or cls
        if cls is not None:
            INPUT_ADAPTERS[cls] = IMAGE_LIST_ADAPTER


def adapter_for(model: nn.Module) -> InputAdapter:
    """The input adapter of ``model``'s family (default: dim 0 of every input tensor)."""
    if type(model).__module__.startswith("torchvision.") and not INPUT_ADAPTERS:
        _register_torchvision_adapters()
    for cls in type(model).__mro__:
        if cls in INPUT_ADAPTERS:
            return INPUT_ADAPTERS[cls]
    return DEFAULT_ADAPTER


def resized_batch(model: nn.Module, args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    """``(args, kwargs)`` at batch size ``n`` (samples repeated cyclically)."""
    return adapter_for(model).resize(args, kwargs, n)


def second_batch(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example at another batch size: 2 for a batch of one, else one more."""
    adapter = adapter_for(model)
    batch = adapter.batch_size(args, kwargs)
    if not batch:
        return None
    return adapter.resize(args, kwargs, 2 if batch == 1 else batch + 1)


# ---------------------------------------------------------------------------
# state that capture must not change
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run code that may update buffers (BatchNorm statistics), consume RNG, flip modes or
    set Python attributes (shape caches) without changing the model or the global RNG."""
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    modules = list(model.modules())
    attrs = [dict(m.__dict__) for m in modules]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    if k in saved and b.shape == saved[k].shape:
                        b.copy_(saved[k])
            for m, before in zip(modules, attrs):
                for key in [k for k in m.__dict__ if k not in before]:
                    del m.__dict__[key]
                for key, value in before.items():
                    if m.__dict__.get(key, _MISSING) is not value:
                        m.__dict__[key] = value


_MISSING = object()


@contextlib.contextmanager
def quiet():
    """torch.export logs partial graphs and warnings while it tries; capture reports itself."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.fx", "torch._dynamo", "torch.export",
                                               "torch.fx.experimental.symbolic_shapes", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _no_stderr():
    """ShapeProp prints the traceback of a failing node before raising; an attempt that may
    fail (meta or fake tensors) should not."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


# ---------------------------------------------------------------------------
# plain fx
# ---------------------------------------------------------------------------


class _SpruceTracer(fx.Tracer):
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


@dataclass
class _Failure:
    """Why a module could not be captured: ``kind`` is "value" (a branch on a tensor
    value), "size" (data-dependent shapes: filtering), or "other"."""

    kind: str
    path: str
    operation: str
    where: str | None
    line: str = ""
    exc: BaseException | None = field(default=None, repr=False)


def fx_trace(module: nn.Module, leaf_modules: Iterable[object], prefix: str = "") -> fx.GraphModule:
    """Symbolic trace, raising a FxFailure with the failing module path."""
    tracer = _SpruceTracer(leaf_modules)
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # any failure inside user code while tracing
        path = tracer.fault_path or "<root>"
        where, line = _user_frame(exc.__traceback__)
        if path != "<root>" and prefix:
            path = f"{prefix}.{path}"
        elif path == "<root>" and prefix:
            path = prefix
        raise FxFailure(_Failure("other", path, f"{type(exc).__name__}: {exc}".strip(), where, line, exc)) from exc
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


class FxFailure(Exception):
    def __init__(self, failure: _Failure):
        super().__init__(failure.operation)
        self.failure = failure


def _user_frame(tb) -> tuple[str | None, str]:
    """The innermost traceback frame outside torch and spruce: the user's line that failed."""
    torch_dir = os.path.dirname(torch.__file__)
    spruce_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = None
    for frame in traceback.extract_tb(tb):
        name = frame.filename
        if name.startswith(torch_dir) or name.startswith("<"):
            continue
        if name.startswith(spruce_dir) and "/tests/" not in name and "/bench/" not in name:
            continue
        found = frame
    if found is None:
        return None, ""
    line = (found.line or "").strip()
    return f"{found.filename}:{found.lineno} `{line}`", line


def _module_chain(tb, paths: dict[int, str]) -> list[str]:
    """Qualified names of the model's modules whose code was running when ``tb`` was raised,
    outermost first (read from the ``self`` of each frame)."""
    chain: list[str] = []
    for frame, _ in traceback.walk_tb(tb):
        owner = frame.f_locals.get("self")
        path = paths.get(id(owner)) if owner is not None else None
        if path is not None and (not chain or chain[-1] != path):
            chain.append(path)
    return chain


# ---------------------------------------------------------------------------
# shape propagation
# ---------------------------------------------------------------------------


def _meta_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return {name: torch.empty_like(t, device="meta") for name, t in named}


def _to_meta(value: object) -> object:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def propagate(gm: fx.GraphModule, inputs: Sequence[object], known: fx.GraphModule | None = None) -> None:
    """Shape/dtype meta (``meta["tensor_meta"]``) on every node, for the placeholder values
    ``inputs``. Tries, cheapest first: meta tensors (no compute, no copy of the weights;
    ``known``, another graph of the same module, lends the meta of nodes it shares), fake
    tensors, then a real run for ops neither supports (buffers restored after it). Raises
    :class:`TraceError` naming the node where the inputs stop fitting the model."""
    from torch.nn.utils.stateless import _reparametrize_module

    try:
        with torch.no_grad(), _reparametrize_module(gm, _meta_state(gm)), quiet(), _no_stderr():
            _MetaShapeProp(gm).run(*[_to_meta(x) for x in inputs], initial_env=_shared_meta(gm, known))
        return
    except Exception:  # noqa: BLE001, S110 - any meta-tensor limitation: try the next way
        pass
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with torch.no_grad(), quiet(), _no_stderr():
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
        return
    except Exception:  # noqa: BLE001, S110 - any fake-tensor limitation: fall back to a real run
        pass
    propagation = _QuietShapeProp(gm)
    try:
        with torch.no_grad(), preserved_state(gm):
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


def _module_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """`` (module NAME, a TYPE)`` for a module call, else empty."""
    if node.op != "call_module":
        return ""
    try:
        return f" (module {node.target}, a {type(gm.get_submodule(node.target)).__name__})"
    except AttributeError:
        return ""


def _shared_meta(gm: fx.GraphModule, known: fx.GraphModule | None) -> dict:
    """Meta tensors for the nodes of ``gm`` that ``known`` computes the same way (same name,
    operation, target and arguments), from ``known``'s shape meta: the training-mode graph
    of a model differs from its eval graph in a few nodes only."""
    if known is None:
        return {}
    from torch.fx.passes.shape_prop import TensorMetadata

    theirs = {n.name: n for n in known.graph.nodes}
    env: dict = {}
    for node in gm.graph.nodes:
        other = theirs.get(node.name)
        meta = other.meta.get("tensor_meta") if other is not None else None
        if (other is None or node.op in ("placeholder", "output") or other.op != node.op
                or other.target != node.target or not isinstance(meta, TensorMetadata)
                or str(other.args) != str(node.args) or str(other.kwargs) != str(node.kwargs)
                or any(a.op != "placeholder" and a not in env for a in node.all_input_nodes)):
            continue
        env[node] = torch.empty(meta.shape, dtype=meta.dtype, device="meta")
        node.meta["tensor_meta"] = meta
    return env


class _MetaShapeProp(MetaRules, ShapeProp):
    """ShapeProp on meta tensors that takes the outputs of the commonest operators from
    :mod:`spruce.passes.rules.meta`'s rules instead of their (slow) meta kernels."""


def failing_node(exc: BaseException) -> str | None:
    # fx's Interpreter annotates failures with "While executing %name : ..."
    for note in getattr(exc, "__notes__", []) or []:
        if "While executing" in note:
            return note.split("%", 1)[-1].split(" ", 1)[0].strip(":")
    text = str(exc)
    if "While executing %" in text:
        return text.split("While executing %", 1)[1].split(" ", 1)[0].strip(":")
    return None


def _concrete(value: object, mapping: dict) -> int:
    if isinstance(value, int):
        return value
    expr = value.node.expr.xreplace(mapping)
    if expr.free_symbols:
        raise KeyError(f"size {value} does not follow from the input sizes")
    return int(expr)


def propagate_from_vals(gm: fx.GraphModule, inputs: Sequence[object]) -> bool:
    """``meta["tensor_meta"]`` from the symbolic ``meta["val"]`` torch.export leaves on every
    node, evaluated at the sizes of ``inputs`` (no computation at all). False when a size
    does not follow from the input sizes (data-dependent), leaving the graph unchanged."""
    from torch.fx.experimental.sym_node import SymNode  # noqa: F401  (SymInt.node)
    from torch.fx.passes.shape_prop import TensorMetadata

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        return False
    mapping: dict = {}
    for node, value in zip(placeholders, inputs):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(value, torch.Tensor):
            if val.dim() != value.dim():
                return False
            for sym, size in zip(val.shape, value.shape):
                if isinstance(sym, torch.SymInt):
                    expr = sym.node.expr
                    if expr.is_Symbol:
                        mapping[expr] = int(size)
                elif sym != size:
                    return False

    def meta_of(val: object) -> object:
        if isinstance(val, torch.Tensor):
            shape = torch.Size(_concrete(s, mapping) for s in val.shape)
            return TensorMetadata(shape, val.dtype, val.requires_grad, (), None, False, {})
        if isinstance(val, (tuple, list)):
            metas = [meta_of(v) for v in val]
            return type(val)(metas) if isinstance(val, list) else tuple(metas)
        return None

    found: dict[fx.Node, object] = {}
    try:
        for node in gm.graph.nodes:
            if node.op == "output" or "val" not in node.meta:
                continue
            meta = meta_of(node.meta["val"])
            if meta is not None and any(True for _ in _meta_tensors(meta)):
                found[node] = meta
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    for node, meta in found.items():
        node.meta["tensor_meta"] = meta
    return True


def placeholder_values(gm: fx.GraphModule, module: nn.Module, args: tuple, kwargs: dict) -> list[object]:
    """The values of ``gm``'s placeholders when ``module(*args, **kwargs)`` is called:
    pytree leaves for an export graph, the bound forward arguments for an fx graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if has_pytree_io(gm.graph):
        leaves = pytree.tree_leaves((args, kwargs))
        if len(leaves) != len(placeholders):
            leaves = pytree.tree_leaves(args)
        return leaves
    if not kwargs:
        return list(args)[: len(placeholders)] + [p.args[0] if p.args else None for p in placeholders[len(args):]]
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    values = []
    for p in placeholders:
        name = p.target.lstrip("*")
        values.append(bound.arguments.get(name, p.args[0] if p.args else None))
    return values


# ---------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------


def export_graph(module: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: object,
                  training: bool) -> fx.GraphModule:
    """``module`` exported (non-strict) in the given mode, as a GraphModule reading the
    module's own parameters and buffers (lifted constants are held by the graph module)."""
    module.train(training)
    with preserved_state(module), quiet(), _no_stderr():  # export prints partial graphs on failure
        ep = torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
        unlifted = ep.module()
    graph = unlifted.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    _split_dynamic_chunks(graph)
    gm = fx.GraphModule(unlifted, graph, type(module).__name__)
    gm.graph.lint()
    gm.recompile()
    return gm


def _split_dynamic_chunks(graph: fx.Graph) -> None:
    """``chunk`` along a dynamic dim becomes ``split_with_sizes`` with sizes computed from the
    dim's size (the same pieces: ceil(size / chunks) each, the rest last). torch.export
    cannot prove chunk's piece count constant in a symbolic size and would pin the batch
    when the compact model is exported again (RAFT chunks its two images' features)."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.chunk.default:
            continue
        x = node.args[0]
        chunks = node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        outs = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(outs, (list, tuple)):
            continue
        dim = dim % val.dim()
        if not isinstance(val.shape[dim], torch.SymInt):
            continue
        n = len(outs)
        with graph.inserting_before(node):
            size = graph.call_function(aten.sym_size.int, (x, dim))
            plus = graph.call_function(operator.add, (size, chunks - 1))
            each = graph.call_function(operator.floordiv, (plus, chunks))
            used = graph.call_function(operator.mul, (each, n - 1))
            last = graph.call_function(operator.sub, (size, used))
            split = graph.call_function(aten.split_with_sizes.default, (x, [each] * (n - 1) + [last], dim))
        split.meta = dict(node.meta)
        split.meta["spruce_chunks"] = chunks  # TorchScript export turns it back into a chunk
        node.replace_all_uses_with(split)
        graph.erase_node(node)


def _classify(exc: BaseException) -> str:
    """"value" for a branch on a tensor value, "size" for data-dependent shapes, else "other"."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GuardOnDataDependentSymNode):
            graph_text = str(getattr(exc, "partial_fx_graph", "") or "")
            symbols = sorted(str(s) for s in getattr(exc.cond, "free_symbols", ()))
            value_lines = [line.split("=", 1)[0] for line in graph_text.splitlines()
                           if re.search(r"= torch\.ops\.aten\.(item|_local_scalar_dense)\b", line)]
            for sym in symbols:
                if sym.startswith(("zuf", "zf")):
                    return "value"
                if any(re.search(rf"\b{re.escape(sym)}\b", line) for line in value_lines):
                    return "value"
            return "size"
        if isinstance(exc, DataDependentOutputException):
            return "value"
        if isinstance(exc, DynamicOutputShapeException):
            return "size"
        exc = exc.__cause__ or exc.__context__
    return "other"


# ---------------------------------------------------------------------------
# dynamic shapes
# ---------------------------------------------------------------------------


def bound_names(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, object] | None:
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    return dict(bound.arguments)


def _leaf_spec(spec: object) -> dict[int, object]:
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, (tuple, list)):
        return {d: s for d, s in enumerate(spec) if s is not None}
    raise TypeError(f"dynamic_shapes: a tensor's entry must be a dict {{dim: Dim}}, a tuple or None, got {spec!r}")


def with_dims(value: object, spec: object, extra: Callable[[torch.Tensor, dict], dict]) -> object:
    """A dynamic_shapes entry for ``value``: the user's ``spec`` plus ``extra`` dims per tensor."""
    if isinstance(value, torch.Tensor):
        return extra(value, _leaf_spec(spec)) or None
    if isinstance(value, (tuple, list)):
        specs = spec if isinstance(spec, (tuple, list)) and len(spec) == len(value) else [None] * len(value)
        items = [with_dims(v, s, extra) for v, s in zip(value, specs)]
        return items if isinstance(value, list) else tuple(items)  # a named tuple's spec is a plain tuple
    if isinstance(value, dict):
        specs = spec if isinstance(spec, dict) else {}
        return {k: with_dims(v, specs.get(k), extra) for k, v in value.items()}
    return None


def declared_by_name(user: object, names: dict[str, object]) -> dict:
    """torch.export's ``dynamic_shapes`` (a dict keyed by argument name, a tuple in argument
    order, or None) as a dict keyed by the names of ``names`` (the bound call). Raises
    TypeError for a declaration of another form."""
    if user is None:
        return {}
    if isinstance(user, dict) and all(isinstance(k, str) for k in user):
        return user
    if isinstance(user, (tuple, list)):
        return dict(zip(names, user))
    raise TypeError("dynamic_shapes must be a dict keyed by argument name or a tuple in argument order")


def root_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict, user: object) -> object:
    """The user's ``dynamic_shapes`` (torch.export's format) with dim 0 of every input
    tensor added as a dynamic batch dim, keyed by argument name."""
    names = bound_names(module, args, kwargs)
    if names is None:
        return None
    user_by_name = declared_by_name(user, names)

    def batch(tensor: torch.Tensor, dims: dict) -> dict:
        if tensor.dim() > 0 and 0 not in dims:
            dims[0] = torch.export.Dim.AUTO
        return dims

    return {name: with_dims(value, user_by_name.get(name), batch) for name, value in names.items()}


def _varying_dynamic_shapes(module: nn.Module, calls: list[tuple[tuple, dict]], chosen: int) -> object:
    """Dims that differ between the recorded calls of a piece are dynamic."""
    args, kwargs = calls[chosen]
    names = bound_names(module, args, kwargs)
    if names is None:
        return None
    others = [bound_names(module, a, k) for a, k in calls]
    leaves_per_call = [pytree.tree_leaves(o) for o in others if o is not None]
    ref_leaves = pytree.tree_leaves(names)
    varying: dict[int, set[int]] = {}
    for i, leaf in enumerate(ref_leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        for leaves in leaves_per_call:
            other = leaves[i] if i < len(leaves) else None
            if isinstance(other, torch.Tensor) and other.dim() == leaf.dim():
                for d in range(leaf.dim()):
                    if other.shape[d] != leaf.shape[d]:
                        varying.setdefault(id(leaf), set()).add(d)

    def dims(tensor: torch.Tensor, spec: dict) -> dict:
        for d in varying.get(id(tensor), ()):
            spec[d] = torch.export.Dim.AUTO
        return spec

    return {name: with_dims(value, None, dims) for name, value in names.items()}


# ---------------------------------------------------------------------------
# eager recording
# ---------------------------------------------------------------------------


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    output: object


@dataclass
class _Recording:
    calls: dict[str, list[_Call]] = field(default_factory=dict)
    filters: set[str] = field(default_factory=set)  # modules whose run had data-dependent shapes
    output: object = None


def _data_dependent_shape(func, args, out) -> bool:
    if torch.Tag.dynamic_output_shape not in getattr(func, "tags", ()):
        return getattr(func, "namespace", "") == "torchvision" and "nms" in str(func)
    name = str(func)
    if name.startswith("aten.index_put") or name.startswith("aten._index_put"):
        return False
    if name.startswith("aten.index."):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    return True


class _FilterSpy(TorchDispatchMode):
    """Marks every module on the call stack when an operator with a data-dependent output
    shape runs (nonzero, boolean masks, NMS)."""

    def __init__(self, stack: list[str], filters: set[str]):
        super().__init__()
        self.stack, self.filters = stack, filters

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack and _data_dependent_shape(func, args, out):
            self.filters.update(self.stack)
        return out


def _record(model: nn.Module, args: tuple, kwargs: dict, keep: Callable[[str, nn.Module], bool]) -> _Recording:
    """Run ``model`` eagerly (no grad, its current mode), recording every call of the modules
    ``keep`` selects and which modules filter by data."""
    rec = _Recording()
    stack: list[str] = []
    handles = []
    for path, module in model.named_modules():
        def pre(mod, a, k, path=path):
            stack.append(path)

        def post(mod, a, k, out, path=path):
            if stack and stack[-1] == path:
                stack.pop()
            if keep(path, mod):
                rec.calls.setdefault(path, []).append(_Call(a, dict(k), out))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), _FilterSpy(stack, rec.filters):
            rec.output = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return rec


# ---------------------------------------------------------------------------
# capturing one module
# ---------------------------------------------------------------------------


def _graphs_fx(module: nn.Module, args: tuple, kwargs: dict, leaf_modules, prefix: str):
    """(eval graph, train graph or None) by plain fx, shapes propagated at the call."""
    was_training = module.training
    try:
        module.eval()
        eval_gm = fx_trace(module, leaf_modules, prefix)
        values = placeholder_values(eval_gm, module, args, kwargs)
        eval_gm.eval()
        propagate(eval_gm, values)
        if not _may_branch_on_training(module, leaf_modules):
            return eval_gm, None
        module.train()
        train_gm = _train_graph(
            eval_gm, lambda: fx_trace(module, leaf_modules, prefix),
            lambda gm: propagate(gm, values, known=eval_gm), FxFailure,
            lambda exc: f"training-mode graph not traced, {_EVAL_ONLY}: {exc.failure.operation}")
        return eval_gm, train_gm
    finally:
        module.train(was_training)


_EVAL_ONLY = "the compact model will support eval mode only"


def _train_graph(eval_gm: fx.GraphModule, capture_train, propagate_train, failure: type[Exception] | tuple,
                 say) -> fx.GraphModule | None:
    """The training-mode graph (``capture_train()``, shapes propagated by ``propagate_train``)
    when its code differs from ``eval_gm``'s; None when it is the same code, or when capturing
    it raised ``failure`` (then the compact model supports eval mode only, and a warning says
    ``say(exc)``)."""
    try:
        train_gm = capture_train()
    except failure as exc:
        warnings.warn(say(exc), stacklevel=5)
        return None
    if train_gm.code == eval_gm.code:
        return None
    train_gm.train()
    propagate_train(train_gm)
    return train_gm


def _may_branch_on_training(model: nn.Module, leaf_modules) -> bool:
    """Can the code fx traces through differ in training mode? Only Python code can: the
    module classes whose forward is traced (not leaves) that mention ``training`` in their
    source or their base classes' (``if self.training``, ``dropout(x, p, self.training)``).
    A class whose source cannot be read counts as one that may."""
    tracer = _SpruceTracer(leaf_modules)
    return any(_class_mentions_training(type(m)) for name, m in model.named_modules()
               if not (name and tracer.is_leaf_module(m, name)))


@functools.cache
def _class_mentions_training(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        try:
            if "training" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            return True
    return False


def _graphs_export(module: nn.Module, trace_args: tuple, trace_kwargs: dict, dynamic_shapes: object,
                   args: tuple, kwargs: dict, prefix: str):
    """(eval graph, train graph or None) by torch.export at ``trace_args`` (a batch of two or
    more), shapes propagated at ``args``."""
    was_training = module.training
    try:
        eval_gm = export_graph(module, trace_args, trace_kwargs, dynamic_shapes, training=False)
        values = placeholder_values(eval_gm, module, args, kwargs)
        if not propagate_from_vals(eval_gm, values):
            with preserved_state(module):
                propagate(eval_gm, values)

        def propagate_train(train_gm: fx.GraphModule) -> None:
            if not propagate_from_vals(train_gm, placeholder_values(train_gm, module, args, kwargs)):
                with preserved_state(module):
                    propagate(train_gm, placeholder_values(train_gm, module, trace_args, trace_kwargs))

        # any exception: an eval-only compact model, said in a warning
        train_gm = _train_graph(
            eval_gm, lambda: export_graph(module, trace_args, trace_kwargs, dynamic_shapes, training=True),
            propagate_train, Exception,
            lambda exc: f"{prefix or 'model'}: training-mode graph not captured, {_EVAL_ONLY}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return eval_gm, train_gm
    finally:
        module.train(was_training)


def _matches(gm: fx.GraphModule, module: nn.Module, call: _Call) -> bool:
    """Does the eval graph reproduce a recorded call (within 1e-4 of the output scale)?"""
    try:
        with torch.no_grad(), preserved_state(module):
            out = gm(*call.args, **call.kwargs)
    except Exception:  # noqa: BLE001 - a graph that cannot run the call does not match it
        return False
    got = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    want = [t for t in pytree.tree_leaves(call.output) if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return False
        if a.is_floating_point():
            scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
            if b.numel() and float((a - b).abs().max()) > 1e-4 * scale:
                return False
        elif not torch.equal(a, b):
            return False
    return True


def _same_structure(calls: list[_Call]) -> bool:
    specs = {str(pytree.tree_structure((c.args, c.kwargs))) for c in calls}
    return len(specs) == 1


def _export_call(calls: list[_Call]) -> int:
    """The recorded call to export at: the one whose dims are all at least 2 where possible."""
    def small(call: _Call) -> int:
        return sum(1 for t in pytree.tree_leaves((call.args, call.kwargs))
                   if isinstance(t, torch.Tensor) for s in t.shape if s < 2)

    return min(range(len(calls)), key=lambda i: (small(calls[i]), -i))


def _capture_module(module: nn.Module, path: str, calls: list[_Call], leaf_modules) -> Piece | _Failure:
    """One module at its recorded calls (the first at the example input): fx, else export."""
    first = calls[0]
    try:
        eval_gm, train_gm = _graphs_fx(module, first.args, first.kwargs, leaf_modules, path)
        return Piece(path, eval_gm, train_gm, "fx", first.args, dict(first.kwargs))
    except (FxFailure, TraceError, TypeError):
        pass
    if not _same_structure(calls):
        return _Failure("other", path, "its inputs change structure with the batch size (a list per image)", None)
    chosen = _export_call(calls)
    dyn = _varying_dynamic_shapes(module, [(c.args, c.kwargs) for c in calls], chosen)
    try:
        eval_gm, train_gm = _graphs_export(module, calls[chosen].args, calls[chosen].kwargs, dyn, first.args,
                                           first.kwargs, path)
    except Exception as exc:  # noqa: BLE001 - classified below
        where, line = _user_frame(exc.__traceback__)
        return _Failure(_classify(exc), path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", where,
                        line, exc)
    if not all(_matches(eval_gm, module, c) for c in calls):
        return _Failure("other", path, "its exported graph does not reproduce every recorded call", None)
    return Piece(path, eval_gm, train_gm, "export", first.args, dict(first.kwargs))


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def _hint(failure: _Failure, root_name: str) -> str:
    line = failure.line
    if re.search(r"\[[^\]]*\]\s*(\+|-|\*|/)?=(?!=)", line):
        return ("item assignment on a traced value: write it as a whole-tensor operation "
                "(torch.where(mask, value, x), index_put or masked_fill) instead of x[...] = ...")
    where = "the model's own forward" if failure.path in ("", "<root>") else f"module '{failure.path}'"
    if failure.kind == "value":
        hint = (f"{where} branches on a tensor value (data-dependent control flow), which a graph captured at "
                "the example input cannot follow: use torch.cond for the branch (torch.where for an elementwise "
                "choice), or keep this code out of the model (leave post-processing eager)")
        if failure.path not in ("", "<root>"):
            hint += (f", or list module '{failure.path}' (or its type) in leaf_modules=[...] so it runs as one "
                     "opaque call and keeps its channels")
        return hint
    if failure.path not in ("", "<root>"):
        return (f"list module '{failure.path}' (or its type) in leaf_modules=[...] so it is kept as one opaque "
                "call, or make its forward capturable by torch.export")
    return "make the model's forward capturable by torch.export (see the operation above)"


def trace_error(failure: _Failure, model: nn.Module) -> TraceError:
    path = failure.path or "<root>"
    msg = f"cannot trace module '{path}' ({type(model).__name__} root): {failure.operation}"
    if failure.where:
        msg += f"\n  at {failure.where}"
    msg += f"\n  hint: {_hint(failure, type(model).__name__)}"
    return TraceError(msg, module_path=path, operation=failure.operation)


# ---------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_leaf(path: str, module: nn.Module, leaf_modules: Sequence[object]) -> bool:
    return any((isinstance(m, str) and m == path) or (isinstance(m, type) and isinstance(module, m))
               for m in leaf_modules)


def _contains_leaf(path: str, module: nn.Module, leaf_modules: Sequence[object]) -> bool:
    if not leaf_modules:
        return False
    prefix = f"{path}." if path else ""
    return any(_is_leaf(prefix + name if name else path, m, leaf_modules) for name, m in module.named_modules())


def capture(
    model: nn.Module,
    example_inputs: object,
    leaf_modules: Iterable[object] = (),
    dynamic_shapes: object = None,
    see_through_wrapped: bool = False,
) -> CapturedGraph:
    """Capture ``model`` at ``example_inputs`` (a tensor, a tuple of positional arguments, or
    a dict of keyword arguments) into the graphs passes take (see the module docstring and
    :mod:`spruce.passes.graph`). ``dynamic_shapes`` declares dims other than the batch as
    dynamic, in ``torch.export``'s format. ``see_through_wrapped``: where plain fx keeps a
    function registered with ``torch.fx.wrap`` opaque (torchvision's Swin attention and patch
    merging), capture the whole model by torch.export instead, which traces through it (the
    fx graph stays where export cannot take the model whole). Raises :class:`TraceError`
    for data-dependent control flow and for inputs that do not fit the model."""
    leaf_modules = list(leaf_modules)
    args, kwargs = split_inputs(example_inputs)
    was_training = model.training
    with capture_settings(model):
        captured = _capture(model, args, kwargs, leaf_modules, dynamic_shapes, was_training, see_through_wrapped)
    captured.dynamic_shapes = dynamic_shapes
    return captured


def _fx_wrapped_calls(gm: fx.GraphModule) -> list[str]:
    """Nodes of ``gm`` calling a function that ``torch.fx.wrap`` keeps opaque to fx and that
    has no channel rule (torchvision's ``stochastic_depth`` has one)."""
    from torch.fx._symbolic_trace import _wrapped_fns_to_patch

    from ..passes.rules.registry import FUNCTION_RULES

    wrapped = {id(scope[name]) for (_, name), scope in _wrapped_fns_to_patch.items() if name in scope}
    return [n.name for n in gm.graph.nodes
            if n.op == "call_function" and id(n.target) in wrapped and n.target not in FUNCTION_RULES]


def _capture(model, args, kwargs, leaf_modules, dynamic_shapes, was_training,
             see_through_wrapped: bool = False) -> CapturedGraph:
    try:
        second = second_batch(model, args, kwargs)
        fx_failure: _Failure | None = None
        try:
            eval_gm, train_gm = _graphs_fx(model, args, kwargs, leaf_modules, "")
            captured = CapturedGraph([Piece("", eval_gm, train_gm, "fx", args, kwargs)], model, args, kwargs,
                                     second_inputs=second)
            if see_through_wrapped and _fx_wrapped_calls(eval_gm):
                try:
                    exported = _capture_by_export(model, args, kwargs, second, leaf_modules, dynamic_shapes, None)
                except Exception:  # noqa: BLE001 - the fx graph stays
                    exported = None
                finally:
                    model.train(was_training)
                if exported is not None and exported.whole:
                    return exported
            return captured
        except FxFailure as exc:
            fx_failure = exc.failure
        except TypeError as exc:  # keyword inputs fx cannot bind
            fx_failure = _Failure("other", "<root>", str(exc), None)
        return _capture_by_export(model, args, kwargs, second, leaf_modules, dynamic_shapes, fx_failure)
    finally:
        model.train(was_training)


def _capture_by_export(model, args, kwargs, second, leaf_modules, dynamic_shapes, fx_failure) -> CapturedGraph:
    paths = {id(m): p for p, m in model.named_modules()}
    model.eval()
    with preserved_state(model):
        try:
            rec = _record(model, args, kwargs, keep=lambda p, m: _owns_parameters(m))
        except Exception as exc:
            where, _ = _user_frame(exc.__traceback__)
            raise TraceError(f"example inputs do not fit the model: {type(exc).__name__}: {exc}"
                             + (f"\n  at {where}" if where else ""), operation=str(exc)) from exc
    notes: list[str] = []
    if "" not in rec.filters and not _contains_leaf("", model, leaf_modules):
        trace_args, trace_kwargs = second if second is not None else (args, kwargs)
        dyn = root_dynamic_shapes(model, trace_args, trace_kwargs, dynamic_shapes)
        try:
            eval_gm, train_gm = _graphs_export(model, trace_args, trace_kwargs, dyn, args, kwargs, "")
        except TraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified: an error, or capture in pieces
            failure = root_failure(exc, paths)
            if failure.kind == "value" and _owns_parameters(model.get_submodule(failure.path or "")):
                raise trace_error(failure, model) from exc
            notes.append(_note(failure))
        else:
            return CapturedGraph([Piece("", eval_gm, train_gm, "export", args, kwargs)], model, args, kwargs,
                                 second_inputs=second, notes=[])
    else:
        notes.append("the model's forward filters by data (data-dependent shapes: NMS, boolean masks...); "
                     "that code stays eager" if "" in rec.filters else "leaf modules stay eager")
    return _capture_in_pieces(model, args, kwargs, second, rec, leaf_modules, notes, fx_failure)


def root_failure(exc: BaseException, paths: dict[int, str]) -> _Failure:
    chain = _module_chain(exc.__traceback__, paths)
    where, line = _user_frame(exc.__traceback__)
    operation = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return _Failure(_classify(exc), chain[-1] if chain else "", operation, where, line, exc)


def _note(failure: _Failure) -> str:
    where = f" at {failure.where}" if failure.where else ""
    what = {"size": "filters by data (data-dependent shapes)", "value": "branches on a tensor value"}.get(
        failure.kind, "cannot be exported")
    return f"module '{failure.path or '<root>'}' {what}{where}: {failure.operation}"


def _capture_in_pieces(model, args, kwargs, second, rec, leaf_modules, notes, fx_failure) -> CapturedGraph:
    rec2 = None
    if second is not None:
        with preserved_state(model):
            try:
                rec2 = _record(model, second[0], second[1], keep=lambda p, m: _owns_parameters(m))
            except Exception as exc:  # noqa: BLE001 - the second batch is an extra, not a requirement
                notes.append(f"the model does not run at a second batch size ({type(exc).__name__}: {exc})")
    pieces: list[Piece] = []

    def visit(path: str, module: nn.Module) -> None:
        calls = rec.calls.get(path)
        if not calls or not _owns_parameters(module):
            return
        if _is_leaf(path, module, leaf_modules):
            notes.append(f"leaf module '{path}' runs eagerly")
            return
        if path and path not in rec.filters and not _contains_leaf(path, module, leaf_modules):
            all_calls = calls + (rec2.calls.get(path, []) if rec2 is not None else [])
            found = _capture_module(module, path, all_calls, leaf_modules)
            if isinstance(found, Piece):
                pieces.append(found)
                return
            if found.kind == "value":
                owner = found.path
                chain = _module_chain(found.exc.__traceback__, {id(m): p for p, m in model.named_modules()}) \
                    if found.exc is not None else []
                owner = chain[-1] if chain else path
                if _owns_parameters(model.get_submodule(owner)):
                    found.path = owner
                    raise trace_error(found, model) from found.exc
            notes.append(_note(found))
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    if not pieces:
        failure = fx_failure or _Failure("other", "<root>", "no part of the model could be captured", None)
        raise trace_error(failure, model)
    captured = CapturedGraph(pieces, model, args, kwargs, second_inputs=second, notes=notes)
    _find_links(captured)
    return captured


# ---------------------------------------------------------------------------
# links between pieces
# ---------------------------------------------------------------------------


def input_tensors(piece: Piece, gm: fx.GraphModule, module: nn.Module, args: tuple, kwargs: dict) -> list:
    """The input leaves of a call of ``piece`` in the contract's order (tensors only)."""
    values = placeholder_values(gm, module, args, kwargs)
    return [t for t in tensor_leaves(values) if isinstance(t, torch.Tensor)]


def output_tensors(gm: fx.GraphModule, output: object) -> list:
    """The output leaves of a call in the contract's order (tensors only)."""
    if has_pytree_io(gm.graph):
        leaves = pytree.tree_leaves(output)
    else:
        leaves = list(tensor_leaves(output))
    return [t for t in leaves if isinstance(t, torch.Tensor)]


_METADATA = {"dtype", "device", "is_cuda", "requires_grad", "layout", "is_sparse", "is_quantized", "is_meta",
             "dim", "ndim", "ndimension", "is_floating_point", "is_complex", "get_device", "element_size",
             "is_contiguous", "data_ptr", "__hash__", "__format__", "__repr__"}


def _function_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "") or name
    return name


class _ReadShape(tuple):
    """The shape of a piece output as eager code sees it: records which dims it reads
    (``x.shape[-2:]`` reads the spatial dims only), so only those keep their channels."""

    def __new__(cls, shape, read: Callable[[tuple[int, ...] | None], None]):
        obj = super().__new__(cls, shape)
        obj._read = read
        return obj

    def _dims(self, index) -> tuple[int, ...]:
        n = len(self)
        if isinstance(index, slice):
            return tuple(range(n))[index]
        return (index % n,) if n else ()

    def __getitem__(self, index):
        if isinstance(index, (int, slice)):
            self._read(self._dims(index))
            value = tuple.__getitem__(self, index)
            return torch.Size(value) if isinstance(index, slice) else value
        self._read(None)
        return tuple.__getitem__(self, index)

    def __iter__(self):
        self._read(None)
        return tuple.__iter__(self)

    def _all(self, *args):
        self._read(None)

    def __eq__(self, other):
        self._read(None)
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list)) else NotImplemented

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __hash__(self):
        self._read(None)
        return tuple.__hash__(self)

    def __repr__(self):
        self._read(None)
        return f"torch.Size({list(tuple.__iter__(self))})"

    def __add__(self, other):
        self._read(None)
        return torch.Size(tuple(tuple.__iter__(self)) + tuple(other))

    def numel(self) -> int:
        self._read(None)
        return torch.Size(tuple(tuple.__iter__(self))).numel()


class _GlueSpy(TorchFunctionMode):
    """Notes every piece output that eager code (outside any piece) touches, and how: a
    shape read pins the dims it reads, any other use pins the whole output."""

    def __init__(self, state: _LinkState, track_shapes: bool):
        super().__init__()
        self.state = state
        self.track_shapes = track_shapes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state.depth > 0:
            return func(*args, **kwargs)
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, _ReadShape):  # a recorded shape handed to torch: all of it counts
                leaf._read(None)
        name = _function_name(func)
        if name in _METADATA:
            return func(*args, **kwargs)
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        key = id(target) if target is not None else None
        if key in self.state.produced and name in ("shape", "size") and (len(args) == 1 and not kwargs):
            result = func(*args, **kwargs)
            if not self.track_shapes:
                self.state.glue(key, None, name)
                return result
            return _ReadShape(result, lambda dims, key=key, name=name: self.state.glue(key, dims, name))
        dims: tuple[int, ...] | None = None
        if name == "size" and len(args) > 1 and isinstance(args[1], int):
            dims = (args[1],)
        elif name == "__len__":
            dims = (0,)
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.state.produced:
                self.state.glue(id(leaf), dims, name)
        return func(*args, **kwargs)


@dataclass
class _LinkState:
    depth: int = 0
    produced: dict[int, tuple[int, int, torch.Tensor]] = field(default_factory=dict)
    reads: dict[tuple[int, int], tuple[set[int] | None, str]] = field(default_factory=dict)
    links: set[Link] = field(default_factory=set)
    eager_inputs: set[tuple[int, int]] = field(default_factory=set)
    output: object = None

    def glue(self, key: int, dims: tuple[int, ...] | None, name: str) -> None:
        src, leaf, tensor = self.produced[key]
        known, what = self.reads.get((src, leaf), (set(), name))
        if known is None or dims is None:
            merged = None
        else:
            merged = known | {d % max(tensor.dim(), 1) for d in dims}
        self.reads[(src, leaf)] = (merged, what)


def _find_links(captured: CapturedGraph) -> None:
    """Run the model once more with hooks on the pieces: record which piece outputs reach
    which piece inputs as the same objects (links) and which reach eager code (pinned).
    Shape reads are tracked per dim; if the eager code does not run with the tracked
    shapes, it runs again with every shape read pinning the whole output."""
    try:
        state = _link_run(captured, track_shapes=True)
    except Exception:  # noqa: BLE001 - eager code that needs a real torch.Size
        state = _link_run(captured, track_shapes=False)
    _apply_links(captured, state)


def _link_run(captured: CapturedGraph, track_shapes: bool) -> _LinkState:
    model = captured.root
    state = _LinkState()
    handles = []
    for i, piece in enumerate(captured.pieces):
        module = model.get_submodule(piece.path)

        def pre(mod, a, k, i=i, piece=piece):
            for leaf, t in enumerate(input_tensors(piece, piece.eval, mod, a, k)):
                found = state.produced.get(id(t))
                if found is not None:
                    state.links.add(Link(found[0], found[1], i, leaf))
                else:
                    state.eager_inputs.add((i, leaf))
            state.depth += 1

        def post(mod, a, k, out, i=i, piece=piece):
            state.depth -= 1
            for leaf, t in enumerate(output_tensors(piece.eval, out)):
                state.produced.setdefault(id(t), (i, leaf, t))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    model.eval()
    try:
        with preserved_state(model), torch.no_grad(), _GlueSpy(state, track_shapes):
            output = model(*captured.example_inputs, **captured.example_kwargs)
    finally:
        for h in handles:
            h.remove()
    state.output = output
    return state


def _apply_links(captured: CapturedGraph, state: _LinkState) -> None:
    for leaf in pytree.tree_leaves(state.output):
        if isinstance(leaf, torch.Tensor) and id(leaf) in state.produced:
            src, out_leaf, _ = state.produced[id(leaf)]
            state.reads[(src, out_leaf)] = (None, "the model's output")
    linked_outputs = {(link.src, link.out_leaf) for link in state.links}
    for i, piece in enumerate(captured.pieces):
        for leaf in range(_output_leaf_count(piece)):
            read = state.reads.get((i, leaf))
            if read is not None:
                dims, what = read
                piece.pinned_outputs[leaf] = (f"output of '{piece.path}' read by eager code ({what})",
                                              None if dims is None else tuple(sorted(dims)))
            elif (i, leaf) not in linked_outputs:
                piece.pinned_outputs[leaf] = (f"output of '{piece.path}' unused in eval mode", None)
        for leaf in {leaf for (j, leaf) in state.eager_inputs if j == i}:
            piece.pinned_inputs[leaf] = f"input of '{piece.path}' computed by eager code"
    captured.links = sorted(state.links, key=lambda link: (link.dst, link.in_leaf, link.src, link.out_leaf))


def _output_leaf_count(piece: Piece) -> int:
    node = next(n for n in piece.eval.graph.nodes if n.op == "output")
    count = 0
    for value in tensor_leaves(node.args[0]):
        if isinstance(value, fx.Node) and "tensor_meta" in value.meta:
            meta = value.meta["tensor_meta"]
            count += sum(1 for _ in _meta_tensors(meta))
    return count


def _meta_tensors(meta) -> Iterator[object]:
    from torch.fx.passes.shape_prop import TensorMetadata

    if isinstance(meta, TensorMetadata):
        yield meta
    elif isinstance(meta, (tuple, list)):
        for m in meta:
            yield from _meta_tensors(m)
    elif isinstance(meta, dict):
        for m in meta.values():
            yield from _meta_tensors(m)
