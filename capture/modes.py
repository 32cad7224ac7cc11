"""Does a module's training mode change its graph? Capture traces the eval-mode graph, and the
train-mode graph only where this says it may differ.

Two questions, for the two ways a graph is captured:

- plain fx keeps modules with a channel rule (BatchNorm, Dropout...) as calls, which switch
  mode by themselves; only Python code that fx traces through can branch on ``training``
  (:func:`may_branch_on_training`);
- torch.export traces through every module down to ATen operators, so BatchNorm, dropout
  with ``p > 0`` and any ``if self.training`` can change the graph. A model none of whose
  module classes mentions ``training`` cannot; otherwise the module is run eagerly in both
  modes and the ATen operators the two runs call are compared (:func:`train_mode_changes_ops`):
  a transformers decoder reads ``self.training`` only to pick an attention dropout of 0.0,
  which calls the same operators in both modes.
"""

from __future__ import annotations

import functools
import inspect

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
    source; else ``module`` runs once in each mode on fake tensors (no computation, no grad;
    its buffers, attributes, mode and the RNG state are left as they were). True when either run raises: the caller then
    traces the train-mode graph and compares it. Give inputs a training-mode forward
    accepts (a batch of two or more for BatchNorm after global pooling)."""
    if not any(_class_mentions_training(type(m)) for m in module.modules()):
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
