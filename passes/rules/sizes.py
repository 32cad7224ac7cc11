"""Values without channels: sizes read from tensors (``x.size(1)``, ``x.shape``, numel),
arithmetic on them, attributes, assertions, tensors created with a given size, and values
read into Python (fx and ATen rules)."""

from __future__ import annotations

import builtins
import math
import operator

import torch
from torch import fx

from ..spaces import Analyzer, ShapeOf, SizeRead, TensorDims
from .common import dim_index, pin_dims, scalar_of, unknown
from .registry import Call, Resize, aten_rule, function_rule, method_rule

__all__ = []

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# fx rules
# ---------------------------------------------------------------------------


@function_rule(builtins.getattr)
def get_attribute(an: Analyzer, call: Call) -> object:
    obj, name = call.args[0], call.args[1]
    if isinstance(obj, TensorDims):
        if name == "shape":
            return ShapeOf(obj)
        if name in ("T", "mT"):
            return TensorDims(reversed(obj)) if name == "T" else TensorDims(list(obj[:-2]) + [obj[-1], obj[-2]])
        if name in ("data",):
            return obj
        if name in ("dtype", "device", "is_cuda", "requires_grad", "layout"):
            return None
        if name == "ndim":
            return None
    return unknown(an, call)


@method_rule("size")
def size(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    d = call.arg(1, "dim")
    if d is None:
        return ShapeOf(x)
    return SizeRead(frozenset([x[dim_index(int(d), len(x))]]))


@method_rule("dim", "ndimension", "is_contiguous", "is_floating_point", "get_device")
def no_channels(an: Analyzer, call: Call) -> object:
    return None


@method_rule("numel", "nelement")
@function_rule(torch.numel)
@aten_rule("sym_numel", "sym_stride.int", "sym_storage_offset", shape_args=True)
def numel(an: Analyzer, call: Call) -> object:
    """A number read from every dim of a tensor (its element count, a stride, an offset)."""
    return SizeRead(frozenset(call.args[0]))


@function_rule(torch._assert)
def assertion(an: Analyzer, call: Call) -> object:
    # a size compared in an assertion must not change
    an.pin_value(call.args[0], f"size checked by an assertion at node '{call.node.name}'")
    return None


@function_rule(torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
               torch.randn, torch.rand, torch.linspace, torch.eye)
def creation(an: Analyzer, call: Call) -> object:
    an.pin_value((call.args, call.kwargs), f"size used to create a tensor at node '{call.node.name}'")
    out = an.fresh(call.meta, call.node.name)
    an.pin_value(out, f"tensor created with a fixed size at node '{call.node.name}'")
    return out


# ---------------------------------------------------------------------------
# ATen rules
# ---------------------------------------------------------------------------


@aten_rule("arange", "arange.start", "arange.start_step", "zeros", "ones", "full", "empty.memory_format",
           "scalar_tensor", "linspace", "eye", "randn", "rand", "randint", "randint.low", "randperm", "tensor",
           "new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided", "empty_strided", "meshgrid",
           "meshgrid.indexing", "tril", "triu", "tril_indices", "triu_indices")
def creation_op(an: Analyzer, call: Call) -> object:
    """A tensor made with a given size: its dims are fixed. (``new_*`` read only the dtype and
    device of their first argument, meshgrid/tril/triu build index structure.)"""
    fixed = f"tensor created with a fixed size at node '{call.node.name}'"
    if call.node.target in (aten.tril.default, aten.triu.default):
        x = call.args[0]
        pin_dims(an, x, range(max(0, len(x) - 2), len(x)), "triangular part taken over this dim")
        return x
    for value in list(call.args) + list(call.kwargs.values()):
        if isinstance(value, (SizeRead, ShapeOf)) or (isinstance(value, (list, tuple)) and any(
                isinstance(v, (SizeRead, ShapeOf, TensorDims)) for v in value)):
            an.pin_value(value, f"size used to create a tensor at node '{call.node.name}'")
    out = an.fresh(call.meta, call.node.name)
    an.pin_value(out, fixed)
    return out


@aten_rule("sym_size.int", shape_args=True)
def sym_size(an: Analyzer, call: Call) -> object:
    x = call.args[0]
    return SizeRead(frozenset([x[int(call.args[1]) % len(x)]]))


@aten_rule("_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range", "_assert_async",
           "_assert_async.msg")
def assertion_op(an: Analyzer, call: Call) -> object:
    """A check on sizes: they must not change."""
    an.pin_value((call.args, call.kwargs), f"size checked by an assertion at node '{call.node.name}'")
    return None


def _rewrite_metadata_check(node: fx.Node, ctx: Resize) -> None:
    x = ctx.value(node.args[0])
    if isinstance(x, TensorDims) and any(ctx.changed(s) for s in x):
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("size", "stride")}
        node.args = node.args[:1] + tuple(None if i in (1, 2) else a for i, a in enumerate(node.args[1:], 1))


@aten_rule("_assert_tensor_metadata", shape_args=True, rewrite=_rewrite_metadata_check)
def tensor_metadata_check(an: Analyzer, call: Call) -> object:
    """A dtype/device check: sizes it compares are rewritten with the tensor."""
    return None


@aten_rule("item", "_local_scalar_dense", "tolist")
def item(an: Analyzer, call: Call) -> object:
    """A tensor's value read into Python: every element of it matters."""
    an.pin_value(call.args[0], f"tensor value read into Python at node '{call.node.name}'")
    return None


def _scalar(an: Analyzer, call: Call) -> object:
    """Arithmetic on Python numbers (sizes read from tensors stay size reads)."""
    return scalar_of(call.args, call.kwargs)


_SYM_FUNCTIONS = [getattr(torch, n) for n in ("sym_min", "sym_max", "sym_float", "sym_int", "sym_not", "sym_ite",
                                              "sym_sqrt", "sym_sum") if hasattr(torch, n)]
function_rule(*_SYM_FUNCTIONS, operator.truth, operator.not_, math.trunc, shape_args=True)(_scalar)
