"""Depth: whole residual blocks (decoder / encoder layers, residual CNN blocks) found in a
graph, bypassed, or zeroed in the source model.

A *residual block* is a module whose calls form one region of the graph (the nodes whose
``nn_module_stack`` holds it, called once) with exactly one value used outside the region,
``y = x + b_1 + ... + b_k``: a chain of additions back to a value ``x`` computed outside the
region, of ``y``'s shape and dtype, or ``y = relu(x + ...)`` where ``x`` is a ReLU's output
(or a max-pooling of one: torchvision's ResNet blocks with an identity shortcut). A pre-norm
transformer layer is one: ``h = x + attn(norm(x)); y = h + mlp(norm(h))``. The ``b_i`` are its
*branches*. Removing the block replaces ``y`` by ``x`` and drops the region: exactly what the
model computes when every branch is zero. A post-norm layer (BERT: ``norm(x + b)``) or a block
whose shortcut is a projection is no residual block (a zero branch does not give ``x`` back).

The masked twin zeroes, in each branch, the parameters of its last parameterised op (a linear
or convolution's weight and bias, a norm's affine parameters, a per-channel scale), reached
from the branch through ops that keep zeros zero (views, transposes, dropout, casts); a block
whose branch ends otherwise has no masked twin (:attr:`Block.zeroed` is ``None``).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn

from .graph import empty_graph_like

__all__ = ["Block", "bypass_blocks", "residual_blocks", "zero_blocks"]

aten = torch.ops.aten

_ADDS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor, "add", "add_"}
_RELU = {torch.relu, torch.relu_, nn.functional.relu, aten.relu.default, aten.relu_.default, "relu", "relu_"}
_MAX_POOL = {nn.functional.max_pool2d, nn.functional.max_pool1d, aten.max_pool2d.default,
             aten.max_pool2d_with_indices.default, aten.max_pool1d.default}
# ops that return their input unchanged where the shape and dtype stay
_SAME = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
         aten.clone.default, aten.contiguous.default, "to", "contiguous", "clone", "float"}
# ops whose output is zero when their input is zero (first argument)
_KEEP_ZERO = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
              aten.permute.default, aten.clone.default, aten.contiguous.default, aten.dropout.default,
              aten.alias.default, aten.expand.default, aten.flatten.using_ints, aten._to_copy.default,
              aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.squeeze.dim, aten.unsqueeze.default,
              torch.flatten, torch.reshape, torch.transpose, torch.permute, nn.functional.dropout,
              "view", "reshape", "transpose", "permute", "contiguous", "clone", "to", "flatten", "squeeze",
              "unsqueeze", "type_as", "float", "half", "bfloat16"}
# ops whose output is zero when the parameters among their arguments are zero
_ZERO_BY_PARAMS = {aten.linear.default, aten.addmm.default, aten.conv1d.default, aten.conv2d.default,
                   aten.conv3d.default, aten.convolution.default, aten.layer_norm.default,
                   aten.group_norm.default, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                   aten.mul.Tensor, nn.functional.linear, nn.functional.conv1d, nn.functional.conv2d,
                   nn.functional.layer_norm, nn.functional.batch_norm, operator.mul, torch.mul, "mul"}
_ZERO_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Block:
    """A residual block of a graph: the module ``path`` (relative to the graph's root), the
    names of its input node ``x`` and output node ``y``, its region's nodes, the parameters
    (and buffers) it reads (``tensors``, qualified names relative to the graph's root) and
    ``cost``, their element count. ``zeroed``: the parameters whose zeros make every branch
    zero (the masked twin), ``None`` where a branch does not end in a parameterised op."""

    path: str
    input: str
    output: str
    nodes: tuple[str, ...]
    tensors: tuple[str, ...]
    cost: int
    zeroed: tuple[str, ...] | None


def _shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    if isinstance(value, torch.Tensor):
        return tuple(str(s) for s in value.shape), value.dtype
    shape = getattr(value, "shape", None)
    return (tuple(str(s) for s in shape), getattr(value, "dtype", None)) if shape is not None else None


def _is_add(node: fx.Node) -> bool:
    return (node.op in ("call_function", "call_method") and node.target in _ADDS and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args) and node.kwargs.get("alpha", 1) == 1)


def _chain(node: fx.Node, region: set[fx.Node], want: tuple) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, branches) when ``node`` is ``x + b_1 + ...`` with ``x`` outside ``region`` (through
    casts that change nothing: export records ``x.to(float32)`` of a float32 ``x`` as a node)."""
    if (node in region and node.op in ("call_function", "call_method") and node.target in _SAME
            and isinstance(node.args[0], fx.Node) and _shape(node) == want):
        stream = node.args[0]
        return (stream, []) if stream not in region and _shape(stream) == want else _chain(stream, region, want)
    if not _is_add(node):
        return None
    a, b = node.args
    for stream, branch in ((a, b), (b, a)):
        if branch not in region:
            continue
        if stream not in region and stream.op != "get_attr" and _shape(stream) == want:
            return stream, [branch]
        if stream in region:
            found = _chain(stream, region, want)
            if found is not None and found[0] not in region:
                return found[0], [*found[1], branch]
    return None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    return node.op in ("call_function", "call_method") and node.target in _RELU


def _nonnegative(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Is ``node`` a ReLU's output, or a max-pooling of one (so ``relu(x + 0) == x``)?"""
    if _is_relu(gm, node):
        return True
    pooled = (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.pooling._MaxPoolNd)
              or node.op == "call_function" and node.target in _MAX_POOL)
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        pooled, node = node.args[0].target in _MAX_POOL, node.args[0]
    return pooled and isinstance(node.args[0], fx.Node) and _nonnegative(gm, node.args[0])


def _module_tensors(gm: fx.GraphModule, target: str) -> list[str]:
    module = gm.get_submodule(target)
    return [f"{target}.{n}" for n, _ in [*module.named_parameters(), *module.named_buffers()]]


def _zeroing(gm: fx.GraphModule, branch: fx.Node) -> list[str] | None:
    """The parameters whose zeros make ``branch`` zero, or None."""
    node = branch
    while True:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, _ZERO_MODULES):
                return [f"{node.target}.{n}" for n, _ in module.named_parameters(recurse=False)] or None
            if isinstance(module, (nn.Dropout, nn.Identity, nn.Flatten)):
                node = node.args[0]
                continue
            return None
        if node.op not in ("call_function", "call_method"):
            return None
        if node.target in _KEEP_ZERO and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        if node.target in _ZERO_BY_PARAMS:
            params = [a.target for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
            if node.target in (aten.mul.Tensor, operator.mul, torch.mul, "mul"):
                params = params[:1]
            return params or None
        return None


def residual_blocks(gm: fx.GraphModule) -> list[Block]:
    """The residual blocks of ``gm`` (see the module docstring), outermost first where blocks
    nest, in graph order. Modules called more than once are never blocks."""
    regions: dict[str, list[fx.Node]] = {}
    keys: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        for key, entry in (node.meta.get("nn_module_stack") or {}).items():
            path = entry[0] if isinstance(entry, tuple) else str(entry)
            if not path:
                continue
            regions.setdefault(path, []).append(node)
            keys.setdefault(path, set()).add(key.split("@")[0] if "@" in key else key)
    blocks: list[Block] = []
    for path, nodes in regions.items():
        if len(keys[path]) > 1:
            continue
        members = set(nodes)
        outside = [n for n in nodes if any(u not in members for u in n.users)]
        if len(outside) != 1 or _shape(outside[0]) is None:
            continue
        found = _chain(outside[0], members, _shape(outside[0]))
        if found is None and _is_relu(gm, outside[0]) and outside[0].args[0] in members:
            found = _chain(outside[0].args[0], members, _shape(outside[0]))
            found = found if found is not None and _nonnegative(gm, found[0]) else None
        if found is None:
            continue
        x, branches = found
        tensors: list[str] = []
        for n in nodes:
            if n.op == "call_module":
                tensors.extend(_module_tensors(gm, n.target))
            tensors.extend(a.target for a in n.all_input_nodes if a.op == "get_attr")
        tensors = list(dict.fromkeys(tensors))
        zeros = [_zeroing(gm, b) for b in branches]
        cost = sum(_resolve(gm, t).numel() for t in tensors if isinstance(_resolve(gm, t), torch.Tensor))
        blocks.append(Block(path, x.name, outside[0].name, tuple(n.name for n in nodes), tuple(tensors), cost,
                            None if any(z is None for z in zeros) else tuple(dict.fromkeys(sum(zeros, [])))))
    blocks = [b for b in blocks if not any(o.path != b.path and b.path.startswith(f"{o.path}.") for o in blocks)]
    return blocks


def _resolve(gm: nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def bypass_blocks(gm: fx.GraphModule, paths: Iterable[str]) -> fx.GraphModule:
    """A copy of ``gm`` in which each block of ``paths`` is bypassed (its output replaced by
    its input) and its region, parameters and submodules are gone. The copy shares the
    tensors it keeps with ``gm``. Raises ``ValueError`` naming a path that is not a residual
    block of ``gm`` (listing those that are)."""
    paths = list(dict.fromkeys(paths))
    found = {b.path: b for b in residual_blocks(gm)}
    unknown = [p for p in paths if p not in found]
    if unknown:
        raise ValueError(f"remove_blocks: {unknown[0]!r} is not a residual block of the model; its residual "
                         f"blocks: {', '.join(found) or 'none'}")
    graph = empty_graph_like(gm.graph)
    mapping: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    by_name = {n.name: mapping[n] for n in gm.graph.nodes if n in mapping}
    read = {n for n in graph.nodes if n.op == "get_attr" and n.users}  # unused ones stay (a tied weight's name)
    for path in paths:
        block = found[path]
        by_name[block.output].replace_all_uses_with(by_name[block.input])
        for name in reversed(block.nodes):
            node = by_name[name]
            if node.users:
                raise ValueError(f"remove_blocks: node {name!r} of block {path!r} is used outside it")
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node in read and not node.users:
            graph.erase_node(node)
    graph.lint()
    new = fx.GraphModule(gm, graph, gm.__class__.__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    new.train(gm.training)
    return new


def zero_blocks(model: nn.Module, blocks: Iterable[Block], prefix: str = "") -> nn.Module:
    """A copy of ``model`` whose parameters :attr:`Block.zeroed` (named relative to
    ``model.get_submodule(prefix)``) are zero: every branch of every block outputs zero, so
    the copy computes what the graph with these blocks bypassed computes. Raises
    ``ValueError`` naming a block without a masked twin."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for block in blocks:
            if block.zeroed is None:
                raise ValueError(f"block {block.path!r}: a residual branch does not end in a linear, convolution, "
                                 "norm or scale whose parameters can be zeroed, so it has no masked twin")
            for name in block.zeroed:
                tensor = masked.get_parameter(f"{prefix}.{name}" if prefix else name)
                tensor.zero_()
    return masked
