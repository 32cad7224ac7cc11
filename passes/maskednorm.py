"""Masked LayerNorm / RMSNorm: what a norm computes in the masked model when its width prunes.

Under ``normalised_widths`` (:func:`spruce.passes.analysis.analyze`) the dim a LayerNorm
or RMSNorm normalises over may lose channels. The compact model's norm is then simply
smaller (``normalized_shape`` and its weight and bias sliced), so it computes its
statistics over the kept channels. The masked model (the original architecture) must
compute the same: a *masked norm* whose mean and variance (LayerNorm) or mean square
(RMSNorm) count the kept channels only, and whose output is zero on the removed ones.

A norm is found in the masked model by its weight (the parameter object it is called
with), so one mechanism covers ``nn.LayerNorm``, ``nn.RMSNorm``, their subclasses and
``F.layer_norm`` / ``F.rms_norm`` or their ATen ops called by a model's code or a captured
graph: a :class:`torch.overrides.TorchFunctionMode` active while the model runs replaces
those calls. An RMSNorm computed by hand (``x.pow(2).mean(-1, keepdim=True)`` in a norm
module, as Llama's, Qwen2's and T5's) is found by its module instead: while that module
runs, a mean over its last dim counts the kept channels only. This changes the function
the model computes (statistics over fewer channels): the compact model equals the masked model, not the unpruned one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["install_masked_norms", "masked_layer_norm", "masked_norms", "masked_rms_norm"]

_aten = torch.ops.aten
_LAYER_NORMS = {F.layer_norm, torch.layer_norm, _aten.layer_norm.default}
_RMS_NORMS = {F.rms_norm, _aten.rms_norm.default}
if hasattr(torch, "rms_norm"):
    _RMS_NORMS.add(torch.rms_norm)


def masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Layer norm of ``x`` over its last dim (C channels) counting only the channels where
    ``keep`` (bool, shape ``(C,)``) is True: mean and biased variance over those, zero output
    on the others. ``weight`` / ``bias``: ``(C,)`` or None. Computed in float32 at least,
    returned in ``x``'s dtype."""
    m = keep.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    xf = x.to(m.dtype)
    count = m.sum()
    mean = (xf * m).sum(-1, keepdim=True) / count
    centred = (xf - mean) * m
    var = centred.pow(2).sum(-1, keepdim=True) / count
    y = centred * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(m.dtype)
    if bias is not None:
        y = y + bias.to(m.dtype) * m
    return y.to(x.dtype)


def masked_rms_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None = None,
                    eps: float | None = None) -> torch.Tensor:
    """RMS norm of ``x`` over its last dim counting only the channels where ``keep`` (bool,
    ``(C,)``) is True (mean square over those), zero output on the others. ``eps`` None is
    the machine epsilon of ``x``'s dtype (as ``F.rms_norm``)."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    m = keep.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    xf = x.to(m.dtype) * m
    mean_square = xf.pow(2).sum(-1, keepdim=True) / m.sum()
    y = xf * torch.rsqrt(mean_square + eps)
    if weight is not None:
        y = y * weight.to(m.dtype)
    return y.to(x.dtype)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: object = None) -> object:
    return args[i] if i < len(args) else kwargs.get(name, default)


class _MaskedNormMode(TorchFunctionMode):
    """Replaces layer_norm / rms_norm calls whose weight is a key of ``keeps`` (by id)."""

    def __init__(self, keeps: dict[int, torch.Tensor]):
        super().__init__()
        self.keeps = keeps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        layer = func in _LAYER_NORMS
        if layer or func in _RMS_NORMS:
            weight = _arg(args, kwargs, 2, "weight")
            keep = self.keeps.get(id(weight)) if isinstance(weight, torch.Tensor) else None
            if keep is not None:
                x = args[0] if args else kwargs["input"]
                if layer:
                    return masked_layer_norm(x, keep, weight, _arg(args, kwargs, 3, "bias"),
                                             _arg(args, kwargs, 4, "eps", 1e-5))
                return masked_rms_norm(x, keep, weight, _arg(args, kwargs, 3, "eps"))
        return func(*args, **kwargs)


@contextlib.contextmanager
def masked_norms(module: nn.Module, keeps: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While open, every layer_norm / rms_norm call whose weight is ``module``'s parameter
    named in ``keeps`` (name -> bool ``(C,)`` kept channels) computes the masked norm."""
    by_id = {id(p): keeps[name] for name, p in module.named_parameters(remove_duplicate=False) if name in keeps}
    if not by_id:
        yield
        return
    with _MaskedNormMode(by_id):
        yield


_MEANS = {torch.mean, torch.Tensor.mean}


def _last_dim(dim: object, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and dim % ndim == ndim - 1


class _MaskedMeanMode(TorchFunctionMode):
    """Replaces a mean over the last dim of a tensor as wide as ``keep`` by the mean over
    the kept channels."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.keep = keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MEANS and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            dim = _arg(args, kwargs, 1, "dim")
            if x.dim() > 0 and x.shape[-1] == self.keep.numel() and _last_dim(dim, x.dim()) \
                    and kwargs.get("dtype") is None:
                m = self.keep.to(device=x.device, dtype=x.dtype)
                return (x * m).sum(-1, keepdim=bool(_arg(args, kwargs, 2, "keepdim", False))) / m.sum()
        return func(*args, **kwargs)


class _ContextHook:
    """A forward pre-hook (``enter``) and hook (``exit``) pair that holds ``context(module)``
    open around each forward of the module (a stack, so nested calls close in order)."""

    def __init__(self) -> None:
        self._open: list[contextlib.AbstractContextManager] = []

    def context(self, module: nn.Module) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def enter(self, module: nn.Module, args: tuple) -> None:
        context = self.context(module)
        context.__enter__()
        self._open.append(context)

    def exit(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)


class _MaskedMeanHook(_ContextHook):
    """Forward pre-hook and hook pair opening :class:`_MaskedMeanMode` around a hand-written
    norm module's forward."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.keep = torch.as_tensor(keep, dtype=torch.bool)

    def context(self, module: nn.Module) -> TorchFunctionMode:
        return _MaskedMeanMode(self.keep)

    def __deepcopy__(self, memo: dict) -> _MaskedMeanHook:
        copied = _MaskedMeanHook(self.keep.clone())
        memo[id(self)] = copied
        return copied


class _MaskedNormHook(_ContextHook):
    """Forward pre-hook and hook pair of :func:`install_masked_norms`: opens
    :func:`masked_norms` around every forward of the module (closed even when it raises).
    Holds names and masks only, so a deep copy of the module keeps working."""

    def __init__(self, keeps: Mapping[str, torch.Tensor]):
        super().__init__()
        self.keeps = {name: torch.as_tensor(keep, dtype=torch.bool) for name, keep in keeps.items()}

    def context(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return masked_norms(module, self.keeps)

    def __deepcopy__(self, memo: dict) -> _MaskedNormHook:
        copied = _MaskedNormHook({name: keep.clone() for name, keep in self.keeps.items()})
        memo[id(self)] = copied  # the pre-hook and the hook of the copy share it
        return copied


def install_masked_norms(module: nn.Module, keeps: Mapping[str, object], by_hand: Iterable[str] = ()) -> nn.Module:
    """Make ``module`` compute the masked norm (:func:`masked_layer_norm`,
    :func:`masked_rms_norm`) for every norm whose weight is named in ``keeps`` (parameter
    name -> bool per channel, True where kept), on every call; the norms whose weights are
    named in ``by_hand`` compute ``x.pow(2).mean(-1)`` by hand in their module, whose mean
    over the last dim then counts the kept channels only. Returns ``module``; nothing is
    installed when ``keeps`` is empty. Raises ``KeyError`` for a name that is not a
    parameter of ``module``."""
    if not keeps:
        return module
    params = dict(module.named_parameters(remove_duplicate=False))
    for name in keeps:
        if name not in params:
            raise KeyError(f"install_masked_norms: {name!r} is not a parameter of {type(module).__name__}")
    for name in set(by_hand) & set(keeps):
        owner = module.get_submodule(name.rpartition(".")[0])
        mean_hook = _MaskedMeanHook(keeps[name])
        owner.register_forward_pre_hook(mean_hook.enter)
        owner.register_forward_hook(mean_hook.exit, always_call=True)
    hook = _MaskedNormHook(keeps)
    module.register_forward_pre_hook(hook.enter)
    module.register_forward_hook(hook.exit, always_call=True)
    return module
