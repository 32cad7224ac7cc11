"""The registries of per-operator knowledge: one table per kind, and their decorators.

- :data:`MODULE_RULES` (by module type), :data:`FUNCTION_RULES` (by ``call_function`` target:
  a torch / ``F`` / ``operator`` function or an ATen ``OpOverload``, the latter also listed in
  :data:`ATEN_OPS`) and :data:`METHOD_RULES` (by method name): the channel rule of each op
  (how channels flow through it), called with the :class:`~spruce.passes.spaces.Analyzer` and
  the node's :class:`Call`;
- :data:`REWRITES`: how an op's size-carrying arguments change when channels are removed
  (:data:`MODULE_FIXERS`: how a module's attributes do), and
  :data:`SHAPE_CONSUMERS`, the ops whose size arguments are rewritten (reading a size for them
  is safe);
- :data:`MODULE_SHAPES` and :data:`FUNCTION_SHAPES`: output shapes of common ops on meta
  tensors without their (slow) meta kernels (:mod:`spruce.passes.rules.meta`).

The rules themselves live with their op family (``spruce.passes.rules.<family>``); importing
:mod:`spruce.passes.rules` registers them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..spaces import Analyzer, Space

__all__ = [
    "ATEN_OPS",
    "FUNCTION_RULES",
    "FUNCTION_SHAPES",
    "METHOD_RULES",
    "MODULE_FIXERS",
    "MODULE_RULES",
    "MODULE_SHAPES",
    "REWRITES",
    "SHAPE_CONSUMERS",
    "Call",
    "FunctionShape",
    "ModuleFixer",
    "ModuleShape",
    "Resize",
    "Rewrite",
    "Rule",
    "aten_rule",
    "function_rule",
    "function_shape",
    "method_rule",
    "module_fixer",
    "module_rule",
    "module_shape",
]


@dataclass
class Call:
    """What a rule sees of one node: argument values and the output's shape meta."""

    node: fx.Node
    args: tuple
    kwargs: dict
    meta: object
    module: nn.Module | None = None

    def arg(self, i: int, name: str, default: object = None) -> object:
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    @property
    def out_shape(self) -> tuple[int, ...]:
        assert isinstance(self.meta, TensorMetadata), f"node '{self.node.name}' is not a tensor"
        return tuple(self.meta.shape)


Rule = Callable[[Analyzer, Call], object]
MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[object, Rule] = {}  # call_function targets: torch, F, operator, torch.ops.aten...
METHOD_RULES: dict[str, Rule] = {}
# ops whose size-valued arguments the export pass rewrites: reading a size for them is safe
SHAPE_CONSUMERS: set[object] = set()


class Resize(Protocol):
    """What a size rewrite sees (built by :func:`spruce.passes.export.remove_channels`)."""

    out: object  # the analysis value of the node in the original graph

    def size(self, space: Space) -> int: ...  # the space's size once channels are removed
    def changed(self, space: Space) -> bool: ...
    def value(self, arg: object) -> object: ...  # the analysis value of an argument node
    def stale(self, arg: object) -> bool: ...  # a size read whose spaces change
    def extra(self, name: str) -> object: ...  # what the rule noted (Analyzer.note)


Rewrite = Callable[[fx.Node, Resize], None]
# how an op's size-carrying arguments (view sizes, split sizes, group counts) change when
# channels are removed; keyed like the rule tables (function / method name / aten op)
REWRITES: dict[object, Rewrite] = {}


def _registrar(table: dict, keys: tuple, shape_args: bool = False, rewrite: Rewrite | None = None):
    """A decorator registering a rule in ``table`` under every key (a module type, function,
    method name), noting keys whose size arguments are read (``shape_args``) and their size
    ``rewrite``."""
    def register(rule: Rule) -> Rule:
        for key in keys:
            table[key] = rule
            if shape_args:
                SHAPE_CONSUMERS.add(key)
            if rewrite is not None:
                REWRITES[key] = rewrite
        return rule

    return register


ModuleFixer = Callable[[nn.Module, nn.Module], None]
# how a module's attributes (channel counts, group counts, head counts) follow its tensors once
# channels are removed: fixer(new, old), new the compact copy of old, by module type (along the MRO)
MODULE_FIXERS: dict[type, ModuleFixer] = {}


def module_fixer(*types: type):
    """Register the attribute rewrite of modules of ``types`` (and their subclasses without
    their own): ``fixer(new, old)`` sets ``new``'s attributes from its shrunk tensors."""
    def register(fn: ModuleFixer) -> ModuleFixer:
        for t in types:
            MODULE_FIXERS[t] = fn
        return fn

    return register


def module_rule(*types: type):
    return _registrar(MODULE_RULES, types)


def function_rule(*fns: object, shape_args: bool = False, rewrite: Rewrite | None = None):
    return _registrar(FUNCTION_RULES, fns, shape_args, rewrite)


def method_rule(*names: str, shape_args: bool = False, rewrite: Rewrite | None = None):
    return _registrar(METHOD_RULES, names, shape_args, rewrite)


aten = torch.ops.aten
# every ATen operator with a rule here (the soundness tests run over this list)
ATEN_OPS: list[object] = []


def _ops(*names: str) -> list[object]:
    """The OpOverloads ``aten.<packet>.<overload>`` that exist in the installed torch."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


def aten_rule(*names: str, shape_args: bool = False, rewrite: Rewrite | None = None):
    """Register a rule for the named ATen overloads (``"add.Tensor"``; no overload means
    ``.default``)."""
    ops = _ops(*names)

    def register(rule: Callable) -> Callable:
        ATEN_OPS.extend(op for op in ops if op not in ATEN_OPS)
        return function_rule(*ops, shape_args=shape_args, rewrite=rewrite)(rule)

    return register


ModuleShape = Callable[[nn.Module, torch.Tensor], torch.Tensor]
FunctionShape = Callable[[tuple, dict], "torch.Tensor | None"]
MODULE_SHAPES: dict[type, ModuleShape] = {}
FUNCTION_SHAPES: dict[object, FunctionShape] = {}


def module_shape(*types: type):
    """Register the output rule of modules of exactly ``types``: ``rule(module, x)`` returns a
    meta tensor shaped as the module's output for input ``x``, or raises as its kernel would."""

    def register(fn: ModuleShape) -> ModuleShape:
        for t in types:
            MODULE_SHAPES[t] = fn
        return fn

    return register


def function_shape(*targets: object):
    """Register the output rule of ``targets`` (functions, or method names): ``rule(args,
    kwargs)`` returns a meta tensor shaped as the output, raises as the kernel would, or
    returns None for a call it does not cover (the kernel then runs)."""

    def register(fn: FunctionShape) -> FunctionShape:
        for t in targets:
            FUNCTION_SHAPES[t] = fn
        return fn

    return register
