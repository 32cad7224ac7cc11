"""Run a graph on meta tensors (shapes and dtypes only, no compute), cheaply.

On meta tensors the cost of a graph is the Python meta kernels and decompositions of its
operators, not arithmetic: even an elementwise add costs about a millisecond, and
BatchNorm, LayerNorm and a Linear on a 4-d input decompose into a dozen such references,
which made checking a compact model on meta tensors slower than running it for real.
The commonest operators therefore get their output here without a kernel, from a rule
that raises where the kernel would (sizes or parameters that no longer fit the input):

- :data:`~spruce.passes.rules.registry.MODULE_SHAPES`, per module type (exactly that type: a subclass may override
  ``forward``), for modules called with one tensor;
- :data:`~spruce.passes.rules.registry.FUNCTION_SHAPES`, per function or method name, for elementwise operators (the
  output's shape by broadcasting, its dtype by type promotion), ``F.layer_norm`` and
  adaptive average pooling.

The shape rules live with their op family; every other node runs its meta kernel.
"""

from __future__ import annotations

import torch
from torch import fx

from ..graph import has_pytree_io
from .registry import FUNCTION_SHAPES, MODULE_SHAPES

__all__ = ["MetaRules", "MetaRun", "runs_on_meta"]


class MetaRules:
    """Mixed into an ``fx.Interpreter`` (before it) that runs on meta tensors: takes the outputs
    of the modules in :data:`MODULE_SHAPES` (called with one tensor) and of the calls in
    :data:`FUNCTION_SHAPES` from their rules instead of their kernels."""

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        rule = MODULE_SHAPES.get(type(module))
        if rule is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return super().call_module(target, args, kwargs)
        return rule(module, args[0])

    def call_function(self, target, args, kwargs):
        rule = FUNCTION_SHAPES.get(target)
        out = None if rule is None else rule(args, kwargs)
        return super().call_function(target, args, kwargs) if out is None else out

    def call_method(self, target, args, kwargs):
        rule = FUNCTION_SHAPES.get(target)
        out = None if rule is None else rule(args, kwargs)
        return super().call_method(target, args, kwargs) if out is None else out


class MetaRun(MetaRules, fx.Interpreter):
    """Runs a graph on meta-tensor inputs with :class:`MetaRules`."""


def runs_on_meta(graph: fx.GraphModule, inputs: tuple) -> bool:
    """Does ``graph`` run on meta tensors (shapes and dtypes only)? Its parameters, buffers and
    tensor inputs are replaced by meta tensors of the same shapes for the run (``graph`` is not
    changed). What channel removal can break (a size, group count or split that no longer
    fits) fails there as it does for real; an operator without a meta kernel, or code that
    reads values, also gives False (the caller then runs the graph for real)."""
    from torch.nn.utils.stateless import _reparametrize_module

    named = list(graph.named_parameters(remove_duplicate=False)) + list(graph.named_buffers(remove_duplicate=False))
    state = {name: torch.empty_like(t, device="meta") for name, t in named}
    meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    try:
        with _reparametrize_module(graph, state):
            if has_pytree_io(graph.graph):
                graph(*meta_inputs)  # its forward flattens the inputs into the placeholders
            else:
                MetaRun(graph).run(*meta_inputs)
    except Exception:  # noqa: BLE001 - any failure here is settled by the real run
        return False
    return True
