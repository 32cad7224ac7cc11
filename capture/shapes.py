"""Shape propagation: ``meta["tensor_meta"]`` (shape, dtype) on every node of a captured graph,
for given placeholder values (meta tensors, fake tensors, a real run, or an exported graph's
symbolic ``meta["val"]``)."""

from __future__ import annotations

import contextlib
import inspect
import io
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from ..passes.graph import has_pytree_io
from ..passes.rules.meta import MetaRules
from .errors import TraceError
from .preserve import no_stderr, preserved_state, quiet

__all__ = ["failing_node", "meta_tensors", "placeholder_values", "propagate", "propagate_from_vals"]


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
        with torch.no_grad(), _reparametrize_module(gm, _meta_state(gm)), quiet(), no_stderr():
            _MetaShapeProp(gm).run(*[_to_meta(x) for x in inputs], initial_env=_shared_meta(gm, known))
        return
    except Exception:  # noqa: BLE001, S110 - any meta-tensor limitation: try the next way
        pass
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with torch.no_grad(), quiet(), no_stderr():
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
    if isinstance(expr, int):  # a bare symbol replaced by a Python int
        return expr
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
            if meta is not None and any(True for _ in meta_tensors(meta)):
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


def meta_tensors(meta) -> Iterator[object]:
    from torch.fx.passes.shape_prop import TensorMetadata

    if isinstance(meta, TensorMetadata):
        yield meta
    elif isinstance(meta, (tuple, list)):
        for m in meta:
            yield from meta_tensors(m)
    elif isinstance(meta, dict):
        for m in meta.values():
            yield from meta_tensors(m)
