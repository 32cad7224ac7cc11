"""Linear layers, matrix products and embeddings: the contracted dim is one channel space
with the weight's (fx and ATen rules, and the Linear module's meta shape)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..spaces import Analyzer, TensorDims
from .common import broadcast_dims, check_numel, contract, schema_args, unknown
from .registry import Call, aten_rule, function_rule, method_rule, module_fixer, module_rule, module_shape

__all__ = ["embedding", "linear", "matmul"]


# ---------------------------------------------------------------------------
# fx rules
# ---------------------------------------------------------------------------


def linear(an: Analyzer, call: Call, x: TensorDims, w: TensorDims, b: TensorDims | None) -> TensorDims:
    contract(an, call, x[-1], w[1])
    out_f = an.new_space(w[0].size, f"{call.node.name}[-1]")
    an.same(out_f, w[0])
    if b is not None:
        an.same(b[0], out_f)
    return TensorDims(list(x[:-1]) + [out_f])


@module_rule(nn.Linear, nn.LazyLinear)
def linear_module(an: Analyzer, call: Call) -> object:
    m = call.module
    b = an.tensor_dims(m.bias) if m.bias is not None else None
    return linear(an, call, call.args[0], an.tensor_dims(m.weight), b)


@function_rule(F.linear)
def linear_fn(an: Analyzer, call: Call) -> object:
    w, b = call.arg(1, "weight"), call.arg(2, "bias")
    if not isinstance(w, TensorDims) or len(w) != 2:
        return unknown(an, call)
    return linear(an, call, call.args[0], w, b if isinstance(b, TensorDims) else None)


def embedding(an: Analyzer, call: Call, ids: TensorDims, weight: TensorDims) -> TensorDims:
    """Rows of ``weight`` looked up by ``ids``: the vocabulary (rows) is pinned; the output's
    last dim is the weight's columns."""
    an.pin(weight[0], f"embedding vocabulary at node '{call.node.name}'")
    out_d = an.new_space(weight[1].size, f"{call.node.name}[-1]")
    an.same(out_d, weight[1])
    return TensorDims(list(ids) + [out_d])


@module_rule(nn.Embedding)
def embedding_module(an: Analyzer, call: Call) -> object:
    return embedding(an, call, call.args[0], an.tensor_dims(call.module.weight))


@function_rule(F.embedding)
def embedding_fn(an: Analyzer, call: Call) -> object:
    return embedding(an, call, call.args[0], call.arg(1, "weight"))


@aten_rule("embedding")
def embedding_op(an: Analyzer, call: Call) -> object:
    return embedding(an, call, call.args[1], call.args[0])


@function_rule(torch.matmul, torch.bmm, torch.mm, operator.matmul)
@method_rule("matmul", "bmm", "mm", "__matmul__")
def matmul(an: Analyzer, call: Call) -> object:
    a, b = call.args[0], call.args[1]
    if not isinstance(a, TensorDims) or not isinstance(b, TensorDims) or len(a) < 2 or len(b) < 2:
        return unknown(an, call)
    shape = call.out_shape
    k_a, k_b = a[-1], b[-2]
    contract(an, call, k_a, k_b)
    batch = broadcast_dims(an, call, (a, b), shape, skip=2)
    return TensorDims(batch + [a[-2], b[-1]])


# ---------------------------------------------------------------------------
# ATen rules
# ---------------------------------------------------------------------------


@aten_rule("linear")
def linear_op(an: Analyzer, call: Call) -> object:
    a = schema_args(call)
    w, b = a["weight"], a.get("bias")
    if not isinstance(w, TensorDims) or len(w) != 2:
        return unknown(an, call)
    return linear(an, call, a["input"], w, b if isinstance(b, TensorDims) else None)


aten_rule("matmul", "mm", "bmm")(matmul)


@aten_rule("addmm")
def addmm(an: Analyzer, call: Call) -> object:
    """``bias + x @ w`` with ``w`` stored (in, out): transformers' ``Conv1D`` (GPT-2)."""
    a = schema_args(call)
    bias, x, w = a["self"], a["mat1"], a["mat2"]
    if not all(isinstance(v, TensorDims) for v in (bias, x, w)) or len(x) != 2 or len(w) != 2:
        return unknown(an, call)
    contract(an, call, x[1], w[0])
    out_f = an.new_space(w[1].size, f"{call.node.name}[-1]")
    an.same(out_f, w[1])
    rows = x[0]
    if bias[-1].size == out_f.size:
        an.same(bias[-1], out_f)
    else:
        an.pin(bias[-1], f"broadcast bias at node '{call.node.name}'")
    if len(bias) == 2:
        if bias[0].size == rows.size:
            an.same(bias[0], rows)
        else:
            an.pin(bias[0], f"broadcast bias at node '{call.node.name}'")
    return TensorDims([rows, out_f])


# ---------------------------------------------------------------------------
# meta shapes
# ---------------------------------------------------------------------------


@module_shape(nn.Linear)
def _linear_meta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Linear: the input's last dim is ``weight``'s second, the bias one entry per output
    feature, the dtypes equal; the output's last dim is ``weight``'s first."""
    out_features, in_features = module.weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise RuntimeError(f"Linear: input shape {list(x.shape)} does not end in {in_features} features")
    if x.dtype != module.weight.dtype:
        raise RuntimeError(f"Linear: input dtype {x.dtype}, weight dtype {module.weight.dtype}")
    check_numel(module, ("bias",), out_features, "output features")
    return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device="meta")


# ---------------------------------------------------------------------------
# module rewrites (attributes after the tensors shrank)
# ---------------------------------------------------------------------------


@module_fixer(nn.Linear)
def _fix_linear(new: nn.Module, old: nn.Module) -> None:
    new.out_features, new.in_features = new.weight.shape


@module_fixer(nn.Embedding)
def _fix_embedding(new: nn.Module, old: nn.Module) -> None:
    new.embedding_dim = new.weight.shape[1]
