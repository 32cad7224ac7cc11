"""Attention: ``scaled_dot_product_attention`` and ``nn.MultiheadAttention`` prune whole heads
(fx and ATen rules)."""

from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx, nn

from ..spaces import Analyzer, Space, TensorDims
from .common import is_multi, pin_new, unknown
from .registry import Call, aten_rule, function_rule, module_fixer, module_rule

__all__ = ["sdpa"]


# ---------------------------------------------------------------------------
# fx rules
# ---------------------------------------------------------------------------


@function_rule(F.scaled_dot_product_attention)
def sdpa(an: Analyzer, call: Call) -> object:
    """Heads (leading dims) are the independent units, pruned whole: the q/k feature dim is
    contracted and sets the default scale (and rotary embeddings act on it), so it is
    pinned; v's feature dim is pinned too, so that a head keeps its width and head counts
    (``num_attention_heads``, the head reshapes) are what changes. With ``is_causal`` query row
    i reads keys 0..i by position, so the query rows are pinned too (removing one would shift
    every later row's mask)."""
    q, k, v = call.args[0], call.args[1], call.args[2]
    mask = call.arg(3, "attn_mask")
    if call.arg(5, "is_causal", False) is not False:  # True, or a value only known at run time
        an.pin(q[-2], f"causal attention query rows (positions) at node '{call.node.name}'")
    reason = f"attention query/key feature dim at node '{call.node.name}'"
    an.pin(q[-1], reason)
    an.pin(k[-1], reason)
    an.pin(v[-1], f"attention head dim (whole heads are pruned) at node '{call.node.name}'")
    an.pin(k[-2], f"attention keys at node '{call.node.name}'")
    an.same(k[-2], v[-2])
    shape = call.out_shape
    lead = []
    for pos in range(3, len(shape) + 1):
        cands = [t[-pos] for t in (q, k, v) if len(t) >= pos and t[-pos].size == shape[-pos]]
        for other in cands[1:]:
            an.same(cands[0], other)
        lead.append(cands[0] if cands else pin_new(an, an.new_space(shape[-pos], "sdpa"), "broadcast dim"))
    _attention_mask(an, call, mask, lead)
    return TensorDims(list(reversed(lead)) + [q[-2], v[-1]])


def _attention_mask(an: Analyzer, call: Call, mask: object, lead: list[Space]) -> None:
    """An additive mask or bias with a dim per head (T5's relative position bias) loses the
    heads its attention loses; its other dims (queries, keys, broadcast dims) are pinned."""
    where = f"attention mask at node '{call.node.name}'"
    if not isinstance(mask, TensorDims):
        an.pin_value(mask, where)
        return
    for pos in range(1, len(mask) + 1):
        space = mask[-pos]
        if pos >= 3 and pos - 3 < len(lead) and space.size == lead[pos - 3].size and space.size != 1:
            an.same(space, lead[pos - 3])
        else:
            an.pin(space, where)


def _weights_used(node: fx.Node) -> bool:
    """Is the second output (attention weights) of a multi-output node read?"""
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            if user.args[1] != 0 and user.users:
                return True
        else:
            return True
    return False


@module_rule(nn.MultiheadAttention)
def multihead_attention(an: Analyzer, call: Call) -> object:
    """Whole heads are the unit. nn.MultiheadAttention requires embed_dim == heads x
    head_dim == the query width, so the query/output width is tied to the heads."""
    m = call.module
    q, k, v = call.arg(0, "query"), call.arg(1, "key"), call.arg(2, "value")
    if (not m._qkv_same_embed_dim or m.in_proj_weight is None or m.bias_k is not None
            or not all(isinstance(t, TensorDims) for t in (q, k, v))):
        return unknown(an, call)
    for name in ("key_padding_mask", "attn_mask"):
        an.pin_value(call.kwargs.get(name), f"attention mask at node '{call.node.name}'")
    if len(call.args) > 3:
        an.pin_value(call.args[3:], f"attention mask at node '{call.node.name}'")
    e = m.embed_dim
    an.same(q[-1], k[-1])
    an.same(q[-1], v[-1])
    w = an.tensor_dims(m.in_proj_weight)
    an.same(w[1], q[-1])
    inner = an.new_space(e, f"{call.node.name}.inner")
    heads = an.new_space(m.num_heads, f"{call.node.name}.heads")
    head_dim = pin_new(an, an.new_space(m.head_dim, f"{call.node.name}.head_dim"), "attention head dim")
    an.product(inner, [heads, head_dim])
    an.same(inner, q[-1])
    for part in range(3):
        an.slice_same(w[0], part * e, inner, 0, e)
    if m.in_proj_bias is not None:
        bias = an.tensor_dims(m.in_proj_bias)
        for part in range(3):
            an.slice_same(bias[0], part * e, inner, 0, e)
    ow = an.tensor_dims(m.out_proj.weight)
    an.same(ow[1], inner)
    an.same(ow[0], q[-1])
    if m.out_proj.bias is not None:
        an.same(an.tensor_dims(m.out_proj.bias)[0], q[-1])
    seq_k = 0 if not m.batch_first and len(k) == 3 else len(k) - 2
    an.pin(k[seq_k], f"attention keys at node '{call.node.name}'")
    an.same(k[seq_k], v[seq_k])
    if len(q) == 3:  # batch rows attend only within themselves
        batch = 0 if m.batch_first else 1
        an.same(q[batch], k[batch])
        an.same(q[batch], v[batch])
    out = TensorDims(list(q))
    weights = an.fresh(call.meta[1], call.node.name + ".weights") if is_multi(call.meta) else None
    an.pin_value(weights, f"attention weights at node '{call.node.name}'")
    if weights is not None and _weights_used(call.node):  # averaged over heads: every head counts
        an.pin(heads, f"attention weights averaged over heads are used at node '{call.node.name}'")
    if isinstance(weights, TensorDims) and len(q) == 3 and weights[0].size == q[batch].size:
        an.same(weights[0], q[batch])  # (batch, [heads,] queries, keys): a batch row's own weights
        seq_q = 1 if m.batch_first else 0
        if weights[-2].size == q[seq_q].size:
            an.same(weights[-2], q[seq_q])  # each query's row
    return (out, weights)


# ---------------------------------------------------------------------------
# ATen rules
# ---------------------------------------------------------------------------


aten_rule("scaled_dot_product_attention")(sdpa)


# ---------------------------------------------------------------------------
# module rewrites (attributes after the tensors shrank)
# ---------------------------------------------------------------------------


@module_fixer(nn.MultiheadAttention)
def _fix_mha(new: nn.Module, old: nn.Module) -> None:
    embed = new.in_proj_weight.shape[1]
    new.embed_dim = new.kdim = new.vdim = embed
    new.num_heads = embed // old.head_dim
    new.out_proj.in_features = new.out_proj.out_features = embed
