"""Mixture-of-experts: the routed experts of a layer as one operator, ``spruce::routed_experts``,
whose whole experts (with the router's rows) and expert intermediate width prune.

A mixture-of-experts layer routes each token to ``top_k`` of ``E`` experts by a softmax over the
router's logits; written out in tensor ops (a top-k whose indices pick experts, a histogram of
them, grouped matmuls) the expert dim travels as index *values*, which no channel rule can
follow. Captured as one operator, its relations are plain: the router's rows, dim 0 of the 3-D
``gate_up`` (E, 2 * I, H) and ``down`` (E, H, I) weights are the experts; ``gate_up``'s two halves
(gate, then up) and ``down``'s last dim are the intermediate width I; every hidden dim is the
input's last dim. Removing an expert is exact when the router never picks it: the masked
model adds ``-inf`` to its logit (``expert_bias``; a zeroed router row would leave logit 0 in
the softmax, a share of the probability for routers without top-k renormalisation), and at least
``top_k`` experts stay (the group's ``min_keep``).

The operator computes what transformers' eager experts compute (softmax in float32, top-k,
renormalised when ``renorm``, each hit expert's gated MLP, weighted sum), on CPU and CUDA; its
gradient recomputes the forward under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spaces import Analyzer, TensorDims
from .common import unknown
from .registry import Call, function_rule

__all__ = ["ACTIVATIONS", "routed_experts", "routed_experts_reference"]

# activations the operator takes by name (transformers' ``hidden_act`` spelling)
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def routed_experts_reference(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                             top_k: int, renorm: bool, act: str, expert_bias: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """Routed experts of ``x`` (tokens, H): router ``(E, H)``, ``gate_up`` ``(E, 2 * I, H)`` (gate
    rows, then up rows), ``down`` ``(E, H, I)``; ``expert_bias`` ``(E,)`` is added to the logits
    (``-inf``: an expert never picked). Returns (tokens, H) in ``x``'s dtype. Raises
    ``RuntimeError`` when ``top_k`` exceeds the experts."""
    logits = F.linear(x, router)
    if expert_bias is not None:
        logits = logits + expert_bias.to(logits.dtype)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    activation = ACTIVATIONS[act]
    out = torch.zeros_like(x)
    for expert in torch.unique(index).tolist():
        token, slot = torch.where(index == expert)
        gate, up = F.linear(x[token], gate_up[expert]).chunk(2, dim=-1)
        hidden = F.linear(activation(gate) * up, down[expert]) * weights[token, slot, None]
        out = out.index_add(0, token, hidden.to(out.dtype))
    return out


@torch.library.custom_op("spruce::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
                   renorm: bool, act: str, expert_bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`routed_experts_reference` as one graph operator (``torch.ops.spruce.routed_experts``)."""
    with torch.no_grad():
        return routed_experts_reference(x, router, gate_up, down, top_k, renorm, act, expert_bias)


@routed_experts.register_fake
def _(x, router, gate_up, down, top_k, renorm, act, expert_bias=None):
    return torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:7]
    ctx.expert_bias = inputs[7]


def _backward(ctx, grad):
    tensors = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:4])]
    wanted = [t for t in tensors if t.requires_grad]
    grads = iter(())
    if wanted:
        with torch.enable_grad():
            out = routed_experts_reference(*tensors, *ctx.options, ctx.expert_bias)
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    result = [next(grads) if t.requires_grad else None for t in tensors]
    return (*result, None, None, None, None)


routed_experts.register_autograd(_backward, setup_context=_setup)


@function_rule(torch.ops.spruce.routed_experts.default)
def routed_experts_rule(an: Analyzer, call: Call) -> object:
    """Experts (the router's rows, dim 0 of ``gate_up`` and ``down``, the bias) are one dim;
    the intermediate width is ``gate_up``'s two halves and ``down``'s last dim; every hidden
    dim is the input's last. At least ``top_k`` experts stay."""
    x, router, gate_up, down = (call.arg(i, name) for i, name in enumerate(("x", "router", "gate_up", "down")))
    bias = call.arg(7, "expert_bias")
    if not all(isinstance(t, TensorDims) for t in (x, router, gate_up, down)) or len(gate_up) != 3:
        return unknown(an, call)
    name = call.node.name
    experts = an.new_space(router[0].size, f"{name}.experts")
    for dims in (router, gate_up, down) + ((bias,) if isinstance(bias, TensorDims) else ()):
        an.same(dims[0], experts)
    width = down[2].size
    inner = an.new_space(width, f"{name}.intermediate")
    an.slice_same(gate_up[1], 0, inner, 0, width)
    an.slice_same(gate_up[1], width, inner, 0, width)
    an.same(down[2], inner)
    for hidden in (router[1], gate_up[2], down[1]):
        an.same(x[-1], hidden)
    an.keep_at_least(experts, int(call.arg(4, "top_k")), f"top_k of the router at node '{name}'")
    return TensorDims(list(x))
