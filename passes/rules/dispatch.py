"""Runs the rules over a graph: one rule per node, looked up in the registries by module type
(along the MRO), method name or ``call_function`` target; a node without a rule, or whose rule
does not understand its use, pins every dim it touches (:func:`~spruce.passes.rules.common.unknown`)."""

from __future__ import annotations

import torch
from torch import fx, nn

from ..spaces import Analyzer, ShapeOf, SizeRead, TensorDims, iter_spaces
from .common import describe, unknown
from .registry import FUNCTION_RULES, METHOD_RULES, MODULE_RULES, SHAPE_CONSUMERS, Call, Rule

__all__ = ["apply_rules"]


def _lookup(node: fx.Node, module: nn.Module | None) -> Rule:
    if node.op == "call_module":
        for t in type(module).__mro__:
            if t in MODULE_RULES:
                return MODULE_RULES[t]
        return unknown
    if node.op == "call_method":
        return METHOD_RULES.get(node.target, unknown)
    return FUNCTION_RULES.get(node.target, unknown)


def _shape_consumer(node: fx.Node) -> bool:
    return node.target in SHAPE_CONSUMERS if node.op in ("call_function", "call_method") else False


def apply_rules(an: Analyzer, gm: fx.GraphModule) -> tuple[list, object]:
    """Relate every node's spaces in ``gm`` through the rule tables.

    Returns the values of the graph's placeholders (in order) and of its output; the
    caller decides what the boundary pins (:func:`spruce.passes.analysis.analyze`)."""
    modules = dict(gm.named_modules())
    inputs: list = []
    output: object = None
    for node in gm.graph.nodes:
        an.current = node
        key = (an.graph_index, node)
        meta = node.meta.get("tensor_meta")
        if node.op == "placeholder":
            value = an.fresh(meta, node.name)
            inputs.append(value)
            an.values[key] = value
            an.input_space_ids.update(s.id for s in iter_spaces(value))
            continue  # related by its users, by links between pieces, or pinned as a graph input
        elif node.op == "get_attr":
            value = _get_attr(an, gm, node)
        elif node.op == "output":
            output = _resolve(an, node.args[0])
            continue
        else:
            module = modules.get(node.target) if node.op == "call_module" else None
            args = _resolve(an, node.args)
            kwargs = _resolve(an, node.kwargs)
            if not _shape_consumer(node):
                reads = [v for v in _flatten((args, kwargs)) if isinstance(v, (SizeRead, ShapeOf))]
                for r in reads:
                    an.pin_value(r, f"size of this dim is used as a value at node '{node.name}'")
            call = Call(node, tuple(args), dict(kwargs), meta, module)
            rule = _lookup(node, module)
            try:
                value = rule(an, call)
            except (AssertionError, IndexError, TypeError, ValueError, KeyError, AttributeError) as exc:
                # a rule that does not understand this use falls back to pinning
                value = unknown(an, call, f"unsupported use of {describe(node, module)} at node '{node.name}' "
                                          f"({type(exc).__name__}: {exc})")
        an.values[key] = value
        _pin_untouched(an, value)
    an.current = None
    return inputs, output


def _pin_untouched(an: Analyzer, value: object) -> None:
    for space in iter_spaces(value):
        if (an.graph.degree(space.id) == 0 and space.id not in an.pinned_space_ids
                and space.id not in an.param_space_ids  # parameters get related by their users
                and space.id not in an.copy_space_ids  # copies: related by their users (GQA heads)
                and space.id not in an.input_space_ids):  # graph inputs by the boundary or links
            an.pin(space, f"new dimension from node '{an.current.name}'")


def _get_attr(an: Analyzer, gm: fx.GraphModule, node: fx.Node) -> object:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, torch.Tensor):
        return an.tensor_dims(obj, name=node.target)
    return None


def _resolve(an: Analyzer, args):
    def lookup(n: fx.Node):
        return an.values.get((an.graph_index, n))

    return fx.node.map_arg(args, lookup)


def _flatten(value):
    if isinstance(value, (tuple, list)) and not isinstance(value, TensorDims):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, slice):
        yield from _flatten((value.start, value.stop, value.step))
    else:
        yield value
