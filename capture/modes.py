"""Does a module's training mode change its graph? Capture traces the eval-mode graph, and the
train-mode graph only where this says it may differ.

Two questions, for the two ways a graph is captured:

- plain fx keeps modules with a channel rule (BatchNorm, Dropout...) as calls, which switch
  mode by themselves; only Python code that fx traces through can branch on ``training``
  (:func:`may_branch_on_training`);
- torch.export traces through every module down to ATen operators, so BatchNorm, dropout
  with ``p > 0`` and any ``if self.training`` can change the graph. A module whose reads of a
  training flag cannot change what it computes does not: none of its classes mentions
  ``training``, or every read in the code its ``forward`` / ``__call__`` reaches (its classes'
  methods, followed through ``self.<name>``, and the functions they wrap or close over) is
  ``c if not self.training else self.p`` with ``self.p == c`` here (transformers' attention
  dropout of 0.0) or ``self.a and self.training ...`` as a condition with ``self.a`` falsy here
  (transformers' ``gradient_checkpointing`` off). Otherwise the module is run in both modes on
  fake tensors and the ATen operators the two runs call are compared
  (:func:`train_mode_changes_ops`). Functions outside the module classes are not read: a
  helper reading ``module.training`` is seen only where a class's own reads ask for the run.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .fxtrace import SpruceTracer
from .preserve import preserved_state

__all__ = ["may_branch_on_training", "train_mode_changes_ops"]


def may_branch_on_training(model: nn.Module, leaf_modules) -> bool:
    """Can the code fx traces through differ in training mode? Only Python code can: the
    module classes whose forward is traced (not leaves) that mention ``training`` in their
    source or their base classes' (``if self.training``, ``dropout(x, p, self.training)``).
    A class whose source cannot be read counts as one that may."""
    tracer = SpruceTracer(leaf_modules)
    return any(_class_mentions_training(type(m)) for name, m in model.named_modules()
               if not (name and tracer.is_leaf_module(m, name)))


def train_mode_changes_ops(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Does ``module(*args, **kwargs)`` call other ATen operators in training mode than in
    eval mode (another operator, other non-tensor arguments, or other input shapes or
    dtypes)? False at once when no module class in ``module`` mentions ``training`` in its
    source, or each one's reads of it cannot depend on the mode (see the module docstring);
    else ``module`` runs once in each mode on fake tensors (no computation, no grad;
    its buffers, attributes, mode and the RNG state are left as they were). True when either run raises: the caller then
    traces the train-mode graph and compares it. Give inputs a training-mode forward
    accepts (a batch of two or more for BatchNorm after global pooling)."""
    if not any(_class_mentions_training(type(m)) and not _reads_harmless(m) for m in module.modules()):
        return False
    try:
        return _ops_in_mode(module, args, kwargs, training=False) != _ops_in_mode(module, args, kwargs, training=True)
    except Exception:  # noqa: BLE001 - a forward that fails here is settled by tracing the train graph
        return True


@functools.cache
def _class_mentions_training(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        try:
            if "training" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            return True
    return False


@functools.cache
def _training_reads(cls: type) -> tuple[tuple[ast.AST, dict], ...] | None:
    """The reads of a training flag (an attribute ``training``, the string ``"training"``) in
    the functions ``cls``'s ``forward`` and ``__call__`` reach: the definitions in its classes
    (without ``nn.Module``) of every ``self.<name>`` / ``super().<name>`` they use, the
    functions they wrap (``__wrapped__``) and close over (transformers wraps a layer's
    ``forward`` in one that checks ``self.training``). Each read comes with its function's
    child -> parent map; ``None`` where a source cannot be read."""
    reads: list[tuple[ast.AST, dict]] = []
    todo = [f for name in ("forward", "__call__") for f in _definitions(cls, name)]
    seen: set[object] = set()
    while todo:
        function = todo.pop()
        if function in seen:
            continue
        seen.add(function)
        wrapped = getattr(function, "__wrapped__", None)
        cells = [getattr(c, "cell_contents", None) for c in function.__closure__ or ()]
        todo += [f for f in (wrapped, *cells) if inspect.isfunction(f)]
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function.__code__)))  # not unwrapped
        except (OSError, TypeError, SyntaxError):
            return None
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (_is_self(node.value) or _is_super(node.value)):
                todo += _definitions(cls, node.attr)
            if isinstance(node, ast.Attribute) and node.attr == "training" or \
                    isinstance(node, ast.Constant) and node.value == "training":
                reads.append((node, parents))
    return tuple(reads)


def _definitions(cls: type, name: str) -> list:
    """The functions named ``name`` in ``cls``'s classes (without ``nn.Module``): methods,
    properties' getters, static and class methods."""
    found = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        value = klass.__dict__.get(name)
        if isinstance(value, property):
            value = value.fget
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value):
            found.append(value)
    return found


def _is_super(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


_UNKNOWN = object()


def _value(node: ast.AST, module: nn.Module) -> object:
    """A constant, or ``self.<attr>`` (``getattr(self, "attr", constant)``) holding a number,
    bool or None; else unknown."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Attribute) and _is_self(node.value):
        value = getattr(module, node.attr, _UNKNOWN)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
            and len(node.args) == 3 and _is_self(node.args[0]) and isinstance(node.args[1], ast.Constant) \
            and isinstance(node.args[2], ast.Constant) and isinstance(node.args[1].value, str):
        value = getattr(module, node.args[1].value, node.args[2].value)
    else:
        return _UNKNOWN
    return value if value is None or isinstance(value, (bool, int, float)) else _UNKNOWN


def _harmless(read: ast.AST, parents: dict, module: nn.Module) -> bool:
    """Is ``read`` (a ``self.training``) one whose value cannot change what ``module`` computes:
    the test of ``x if [not] self.training else y`` with ``x == y`` here, or an operand of an
    ``and`` that is a condition (``if``, ``while``, a conditional expression's test) with an
    operand ``self.a`` falsy here?"""
    if not (isinstance(read, ast.Attribute) and _is_self(read.value)):
        return False
    node, parent = read, parents.get(read)
    if isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.Not):
        node, parent = parent, parents.get(parent)
    if isinstance(parent, ast.IfExp) and parent.test is node:
        body, orelse = _value(parent.body, module), _value(parent.orelse, module)
        return body is not _UNKNOWN and orelse is not _UNKNOWN and type(body) is type(orelse) and body == orelse
    if isinstance(parent, ast.BoolOp) and isinstance(parent.op, ast.And) and node is read:
        condition = parents.get(parent)
        if isinstance(condition, (ast.If, ast.While, ast.IfExp)) and condition.test is parent:
            return any(v is not read and _value(v, module) in (False, None, 0) for v in parent.values)
    return False


def _reads_harmless(module: nn.Module) -> bool:
    """Can no read of a training flag by ``module``'s class (see :func:`_training_reads`)
    depend on the mode for this module?"""
    if "forward" in vars(module):  # a forward set on the instance: not read here
        return False
    reads = _training_reads(type(module))
    return reads is not None and all(_harmless(read, parents, module) for read, parents in reads)


def _ops_in_mode(module: nn.Module, args: tuple, kwargs: dict, training: bool) -> list[tuple[str, tuple]]:
    was_training = module.training
    module.train(training)
    log = _OpLog()
    # dropout in training mode draws random numbers: leave the CUDA generators as they were too
    cuda = sorted({t.device.index or 0 for t in pytree.tree_leaves((args, kwargs, list(module.parameters())))
                   if isinstance(t, torch.Tensor) and t.is_cuda})
    try:
        # on fake tensors: the operators without their computation (a data-dependent one raises,
        # and the caller traces the training graph to compare)
        with preserved_state(module), torch.random.fork_rng(devices=cuda), torch.no_grad(), \
                FakeTensorMode(allow_non_fake_inputs=True), log:
            module(*args, **kwargs)
    finally:
        module.train(was_training)
    return log.ops


def _argument(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    return repr(value)


class _OpLog(TorchDispatchMode):
    """Every ATen operator called, with its arguments (tensors by shape and dtype)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if not name.startswith("prim."):  # metadata queries (a fake tensor's device), not operators
            self.ops.append((name, tuple(_argument(a) for a in pytree.tree_leaves((args, kwargs)))))
        return func(*args, **kwargs)
