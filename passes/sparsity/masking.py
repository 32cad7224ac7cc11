"""The mask pass: weights of sparse layers go through a mask node in the fx graph.

``insert_masks`` rewrites each selected Conv/ConvTranspose/Linear call into its functional form
whose weight is ``MaskedWeight(weight)``: by default ``where(mask, weight, 0)`` (the
gradient of a pruned weight is then zero), or a registered straight-through estimator. Masks are stored
bit-packed (8 per byte: 1/32 of the fp32 weight bytes) and unpacked to bool on use. Mask
helpers build exact top-k and N:M masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MaskedWeight", "WEIGHT_FNS", "insert_masks", "topk_mask", "nm_groups", "nm_mask", "SPARSE_LAYER_TYPES",
           "input_channel_dim", "output_channel_index", "pack_bits", "unpack_bits", "nm_group_max",
           "global_topk_masks"]

SPARSE_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                      nn.Linear)
_FUNCTIONAL = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_FUNCTIONAL_TRANSPOSED = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
                          nn.ConvTranspose3d: F.conv_transpose3d}


def input_channel_dim(module: nn.Module) -> int:
    """The weight dimension that runs over a layer's input channels: 0 for transposed
    convolutions (weight ``(in, out / groups, *k)``), 1 for Conv/Linear (``(out, in / groups, *k)``)."""
    return 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1


def output_channel_index(module: nn.Module) -> torch.Tensor:
    """For every entry of ``module.weight`` (broadcast over the kernel dims), the output
    channel it produces: a long tensor of shape ``weight.shape[:2]`` then 1s, so
    ``scores[output_channel_index(m)]`` spreads per-output-channel scores over the weight."""
    weight = module.weight
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # (in, out / g, *k): out = group * out_per + j
        in_per = weight.shape[0] // module.groups
        out_per = weight.shape[1]
        index = (torch.arange(weight.shape[0]) // in_per)[:, None] * out_per + torch.arange(out_per)[None, :]
    else:
        index = torch.arange(weight.shape[0])[:, None].expand(weight.shape[0], weight.shape[1])
    return index.reshape(*index.shape, *([1] * (weight.dim() - 2))).to(weight.device)

WeightFn = Callable[["MaskedWeight", torch.Tensor], torch.Tensor]
# where() rather than w * mask: the same values and gradient (zero for pruned weights), and
# cheaper than a multiplication that promotes the bool mask to float
WEIGHT_FNS: dict[str, WeightFn] = {"mask": lambda mod, w: torch.where(mod.mask, w, 0.0)}


_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
# row b: the 8 bools byte b packs; unpacking is one index_select (4x faster than shifting)
_UNPACK_TABLE = torch.bitwise_and(torch.arange(256, dtype=torch.uint8).unsqueeze(1), _BIT_VALUES).ne(0)
_UNPACK_TABLES: dict[torch.device, torch.Tensor] = {torch.device("cpu"): _UNPACK_TABLE}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as a flat uint8 tensor of ceil(numel / 8) bytes, entry ``i`` in bit
    ``i % 8`` of byte ``i // 8`` (padding bits are 0)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_VALUES.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed into ``packed``."""
    table = _UNPACK_TABLES.get(packed.device)
    if table is None:
        table = _UNPACK_TABLES.setdefault(packed.device, _UNPACK_TABLE.to(packed.device))
    bits = table.index_select(0, packed.to(torch.int32))
    return bits.view(-1)[: math.prod(shape)].view(shape)


class MaskedWeight(nn.Module):
    """The weight a sparse layer really uses; ``kind`` picks the forward function from
    :data:`WEIGHT_FNS`. When ``capture_dense_grad`` is set, the gradient with respect to
    the effective weight (dense, before masking) is kept in ``dense_grad`` after the next
    backward.

    The mask is kept bit-packed in the ``mask`` buffer (uint8, what ``state_dict`` holds);
    the ``mask`` attribute reads it as a fresh bool tensor of ``mask_shape``, so writes
    must go through ``masked.mask = new`` or :meth:`set_mask` (an in-place write into what
    ``mask`` returned changes nothing)."""

    def __init__(self, mask: torch.Tensor, kind: str = "mask"):
        super().__init__()
        self.mask_shape = torch.Size(mask.shape)
        # registered by hand: the class attribute ``mask`` (a property) would make
        # register_buffer refuse the name
        self._buffers["mask"] = pack_bits(mask.to(torch.bool))
        self.kind = kind
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """The mask as a bool tensor of ``mask_shape`` (unpacked on every read)."""
        return unpack_bits(self._buffers["mask"], self.mask_shape)

    @property
    def packed_mask(self) -> torch.Tensor:
        """The stored bit-packed mask (the live buffer)."""
        return self._buffers["mask"]

    def set_mask(self, mask: torch.Tensor) -> None:
        """Store ``mask`` (any dtype; non-zero = active) in place of the current mask."""
        if tuple(mask.shape) != tuple(self.mask_shape):
            raise ValueError(f"mask of shape {tuple(mask.shape)} for a weight of shape {tuple(self.mask_shape)}")
        packed = self._buffers["mask"]
        packed.copy_(pack_bits(mask.to(device=packed.device, dtype=torch.bool)))

    def __setattr__(self, name: str, value) -> None:
        if name == "mask":  # nn.Module.__setattr__ would replace the packed buffer with a bool tensor
            self.set_mask(value)
            return
        super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "mask"
        saved = state_dict.get(key)
        if isinstance(saved, torch.Tensor) and saved.dtype == torch.bool:  # saved before masks were packed
            if tuple(saved.shape) != tuple(self.mask_shape):
                raise ValueError(f"{key}: saved mask of shape {tuple(saved.shape)}, the weight has shape "
                                 f"{tuple(self.mask_shape)}")
            state_dict[key] = pack_bits(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        effective = WEIGHT_FNS[self.kind](self, weight)
        if self.capture_dense_grad and effective.requires_grad:
            effective.register_hook(self._keep_grad)
        return effective

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self.dense_grad = grad.detach().clone() if self.dense_grad is None else self.dense_grad + grad.detach()


def mask_key(module_name: str) -> str:
    return module_name.replace(".", "__")


def insert_masks(gm: fx.GraphModule, masks: dict[str, MaskedWeight]) -> fx.GraphModule:
    """Route the weight of every call to a module named in ``masks`` through its
    :class:`MaskedWeight` (installed under ``gm.spruce_masks``). Returns ``gm``.

    Each module is called with its input only (a transposed convolution called with
    ``output_size`` cannot be rewritten: callers leave such layers out)."""
    holder = nn.ModuleDict({mask_key(name): m for name, m in masks.items()})
    gm.add_module("spruce_masks", holder)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in masks:
            continue
        module = gm.get_submodule(node.target)
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{node.target}.weight")
            effective = graph.call_module(f"spruce_masks.{mask_key(node.target)}", (weight,))
            bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            if isinstance(module, nn.Linear):
                call = graph.call_function(F.linear, (node.args[0], effective, bias))
            elif isinstance(module, nn.modules.conv._ConvTransposeNd):
                fn = next(f for t, f in _FUNCTIONAL_TRANSPOSED.items() if isinstance(module, t))
                args = (node.args[0], effective, bias, module.stride, module.padding, module.output_padding,
                        module.groups, module.dilation)
                call = graph.call_function(fn, args)
            else:
                fn = next(f for t, f in _FUNCTIONAL.items() if isinstance(module, t))
                args = (node.args[0], effective, bias, module.stride, module.padding, module.dilation, module.groups)
                call = graph.call_function(fn, args)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask with exactly ``k`` True entries at the largest ``scores`` (ties by index)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def nm_groups(weight_shape: tuple[int, ...], m: int, in_dim: int = 1) -> tuple[int, ...] | None:
    """The (groups, M) view of a weight for N:M along input channels (weight dim ``in_dim``:
    :func:`input_channel_dim`), or None when the input-channel count is not divisible by M."""
    if len(weight_shape) < 2 or weight_shape[in_dim] % m:
        return None
    return (-1, m)


def _to_groups(t: torch.Tensor, m: int, in_dim: int = 1) -> torch.Tensor:
    # (..., I at in_dim, ...) -> (..., I) -> (rest * I/M, M): M consecutive input channels
    return t.movedim(in_dim, -1).reshape(-1, m)


def _from_groups(g: torch.Tensor, shape: tuple[int, ...], in_dim: int = 1) -> torch.Tensor:
    moved = (*shape[:in_dim], *shape[in_dim + 1 :], shape[in_dim])
    return g.reshape(moved).movedim(-1, in_dim)


def nm_mask(scores: torch.Tensor, n: int, m: int, in_dim: int = 1) -> torch.Tensor:
    """Bool mask with exactly ``n`` True entries in every group of ``m`` consecutive input
    channels (weight dim ``in_dim``; for each output channel and kernel position): the 2:4
    layout of TensorRT and cuSPARSELt."""
    groups = _to_groups(scores, m, in_dim)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return _from_groups(keep, tuple(scores.shape), in_dim)


def nm_refill(active: torch.Tensor, scores: torch.Tensor, n: int, m: int, in_dim: int = 1) -> torch.Tensor:
    """The inactive entries to grow so every group of ``m`` holds exactly ``n`` active
    ones again: in each group, the best-scoring inactive entries, as many as missing."""
    act = _to_groups(active, m, in_dim)
    sc = _to_groups(torch.where(active, torch.full_like(scores, -math.inf), scores), m, in_dim)
    need = (n - act.sum(dim=1)).clamp(min=0)
    rank = torch.argsort(torch.argsort(sc, dim=1, descending=True), dim=1)
    grow = (rank < need[:, None]) & ~act
    return _from_groups(grow, tuple(active.shape), in_dim)


def nm_counts(mask: torch.Tensor, m: int, in_dim: int = 1) -> torch.Tensor:
    """Non-zeros per N:M group (for checks)."""
    return _to_groups(mask.to(torch.int32), m, in_dim).sum(dim=1)


def nm_group_max(values: torch.Tensor, m: int, in_dim: int = 1) -> torch.Tensor:
    """``values`` with every entry replaced by the largest value of its N:M group of ``m``
    consecutive input channels (weight dim ``in_dim``: :func:`input_channel_dim`)."""
    groups = _to_groups(values, m, in_dim)
    per_group = groups.max(dim=1, keepdim=True).values.expand_as(groups)
    return _from_groups(per_group.contiguous(), tuple(values.shape), in_dim)


def global_topk_masks(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks (one per tensor of ``scores``) keeping exactly ``k`` entries in all, the
    largest scores across tensors, except that every tensor keeps at least its own best
    entry (so no layer ends with no weight; needs ``k >= len(scores)``). Ties by index."""
    if k < len(scores):
        raise ValueError(f"cannot keep {k} weights over {len(scores)} layers with at least one each")
    flat = torch.cat([s.reshape(-1) for s in scores])
    sizes = [s.numel() for s in scores]
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    reserved = torch.tensor([off + int(torch.argmax(s.reshape(-1))) for off, s in zip(offsets, scores)],
                            dtype=torch.long, device=flat.device)
    rest = flat.clone()
    rest[reserved] = -math.inf
    keep = topk_mask(rest, k - len(scores))
    keep[reserved] = True
    return [chunk.view(s.shape) for chunk, s in zip(keep.split(sizes), scores)]
