"""``dynamic_shapes`` in torch.export's format: the user's declaration read by argument name,
the batch dim added, dims that vary between recorded calls."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["bound_names", "declared_by_name", "root_dynamic_shapes", "varying_dynamic_shapes", "with_dims"]


def bound_names(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, object] | None:
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    return dict(bound.arguments)


def _leaf_spec(spec: object) -> dict[int, object]:
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, (tuple, list)):
        return {d: s for d, s in enumerate(spec) if s is not None}
    raise TypeError(f"dynamic_shapes: a tensor's entry must be a dict {{dim: Dim}}, a tuple or None, got {spec!r}")


def with_dims(value: object, spec: object, extra: Callable[[torch.Tensor, dict], dict]) -> object:
    """A dynamic_shapes entry for ``value``: the user's ``spec`` plus ``extra`` dims per tensor."""
    if isinstance(value, torch.Tensor):
        return extra(value, _leaf_spec(spec)) or None
    if isinstance(value, (tuple, list)):
        specs = spec if isinstance(spec, (tuple, list)) and len(spec) == len(value) else [None] * len(value)
        items = [with_dims(v, s, extra) for v, s in zip(value, specs)]
        return items if isinstance(value, list) else tuple(items)  # a named tuple's spec is a plain tuple
    if isinstance(value, dict):
        specs = spec if isinstance(spec, dict) else {}
        return {k: with_dims(v, specs.get(k), extra) for k, v in value.items()}
    return None


def declared_by_name(user: object, names: dict[str, object]) -> dict:
    """torch.export's ``dynamic_shapes`` (a dict keyed by argument name, a tuple in argument
    order, or None) as a dict keyed by the names of ``names`` (the bound call). Raises
    TypeError for a declaration of another form."""
    if user is None:
        return {}
    if isinstance(user, dict) and all(isinstance(k, str) for k in user):
        return user
    if isinstance(user, (tuple, list)):
        return dict(zip(names, user))
    raise TypeError("dynamic_shapes must be a dict keyed by argument name or a tuple in argument order")


def root_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict, user: object) -> object:
    """The user's ``dynamic_shapes`` (torch.export's format) with dim 0 of every input
    tensor added as a dynamic batch dim, keyed by argument name."""
    names = bound_names(module, args, kwargs)
    if names is None:
        return None
    user_by_name = declared_by_name(user, names)

    def batch(tensor: torch.Tensor, dims: dict) -> dict:
        if tensor.dim() > 0 and 0 not in dims:
            dims[0] = torch.export.Dim.AUTO
        return dims

    return {name: with_dims(value, user_by_name.get(name), batch) for name, value in names.items()}


def varying_dynamic_shapes(module: nn.Module, calls: list[tuple[tuple, dict]], chosen: int) -> object:
    """Dims that differ between the recorded calls of a piece are dynamic."""
    args, kwargs = calls[chosen]
    names = bound_names(module, args, kwargs)
    if names is None:
        return None
    others = [bound_names(module, a, k) for a, k in calls]
    leaves_per_call = [pytree.tree_leaves(o) for o in others if o is not None]
    ref_leaves = pytree.tree_leaves(names)
    varying: dict[int, set[int]] = {}
    for i, leaf in enumerate(ref_leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        for leaves in leaves_per_call:
            other = leaves[i] if i < len(leaves) else None
            if isinstance(other, torch.Tensor) and other.dim() == leaf.dim():
                for d in range(leaf.dim()):
                    if other.shape[d] != leaf.shape[d]:
                        varying.setdefault(id(leaf), set()).add(d)

    def dims(tensor: torch.Tensor, spec: dict) -> dict:
        for d in varying.get(id(tensor), ()):
            spec[d] = torch.export.Dim.AUTO
        return spec

    return {name: with_dims(value, None, dims) for name, value in names.items()}
