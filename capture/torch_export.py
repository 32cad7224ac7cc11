"""A module exported by ``torch.export`` (non-strict) in a given mode, as a GraphModule
on the module's own parameters."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .optional import keep_optional_inputs
from .preserve import no_stderr, preserved_state, quiet

__all__ = ["export_graph"]


def export_graph(module: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: object,
                  training: bool) -> fx.GraphModule:
    """``module`` exported (non-strict) in the given mode, as a GraphModule reading the
    module's own parameters and buffers (lifted constants are held by the graph module);
    arguments ``module.forward`` makes optional stay optional (:mod:`.optional`)."""
    module.train(training)
    with preserved_state(module), quiet(), no_stderr():  # export prints partial graphs on failure
        ep = torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
        unlifted = ep.module(check_guards=False)  # no guard function: one code generation fewer
    graph = unlifted.graph
    _split_dynamic_chunks(graph)
    graph.lint()
    gm = fx.GraphModule(unlifted, graph, type(module).__name__)  # generates its code
    keep_optional_inputs(gm, module, args, kwargs)
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
