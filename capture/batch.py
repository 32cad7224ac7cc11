"""Input adapters: what "the batch" of a model family's example inputs is, and the example at
another batch size (capture traces and checks at a second batch size)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["INPUT_ADAPTERS", "InputAdapter", "adapter_for", "resized_batch", "second_batch"]


@dataclass(frozen=True)
class InputAdapter:
    """How to read and change the batch size of a model family's example inputs.

    ``batch_size(args, kwargs)`` returns the example's batch size (None: unknown);
    ``resize(args, kwargs, n)`` returns the inputs at batch size ``n``, repeating the
    example's samples cyclically."""

    batch_size: Callable[[tuple, dict], int | None]
    resize: Callable[[tuple, dict, int], tuple[tuple, dict]]


def _leading_batch(args: tuple, kwargs: dict) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _cycle(n: int, size: int) -> torch.Tensor:
    return torch.arange(n) % size


def _resize_leading(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    batch = _leading_batch(args, kwargs)

    def resize(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch:
            return leaf.index_select(0, _cycle(n, batch).to(leaf.device))
        return leaf

    return pytree.tree_map(resize, (args, kwargs))


def _image_list_batch(args: tuple, kwargs: dict) -> int | None:
    images = args[0] if args else kwargs.get("images")
    return len(images) if isinstance(images, (list, tuple)) else None


def _resize_image_list(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    """torchvision detectors take a list of images (and of targets in training)."""
    def cyc(seq):
        return [seq[i % len(seq)] for i in range(n)]

    args = tuple(cyc(a) if i in (0, 1) and isinstance(a, (list, tuple)) else a for i, a in enumerate(args))
    kwargs = {k: cyc(v) if k in ("images", "targets") and isinstance(v, (list, tuple)) else v
              for k, v in kwargs.items()}
    return args, kwargs


DEFAULT_ADAPTER = InputAdapter(_leading_batch, _resize_leading)
IMAGE_LIST_ADAPTER = InputAdapter(_image_list_batch, _resize_image_list)
# model class -> adapter (looked up along the MRO); families register here
INPUT_ADAPTERS: dict[type, InputAdapter] = {}


def _register_torchvision_adapters() -> None:
    try:
        from torchvision.models import detection
    except ImportError:  # torchvision is optional
        return
    for name in ("GeneralizedRCNN", "RetinaNet", "SSD", "FCOS"):
        cls = getattr(detection, name, None) or getattr(getattr(detection, name.lower(), None), name, None)
        if cls is None:
            for mod in (detection.generalized_rcnn, detection.retinanet, detection.ssd, detection.fcos):
                cls = getattr(mod, name, None) or cls
        if cls is not None:
            INPUT_ADAPTERS[cls] = IMAGE_LIST_ADAPTER


def adapter_for(model: nn.Module) -> InputAdapter:
    """The input adapter of ``model``'s family (default: dim 0 of every input tensor)."""
    if type(model).__module__.startswith("torchvision.") and not INPUT_ADAPTERS:
        _register_torchvision_adapters()
    for cls in type(model).__mro__:
        if cls in INPUT_ADAPTERS:
            return INPUT_ADAPTERS[cls]
    return DEFAULT_ADAPTER


def resized_batch(model: nn.Module, args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    """``(args, kwargs)`` at batch size ``n`` (samples repeated cyclically)."""
    return adapter_for(model).resize(args, kwargs, n)


def second_batch(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example at another batch size: 2 for a batch of one, else one more."""
    adapter = adapter_for(model)
    batch = adapter.batch_size(args, kwargs)
    if not batch:
        return None
    return adapter.resize(args, kwargs, 2 if batch == 1 else batch + 1)
