"""Keep a SparseModel's masks identical on every rank of a torch.distributed job.

Under DistributedDataParallel every rank sees a different shard of the batch. DDP
averages parameter gradients, but not what spruce captures itself (the dense gradient
behind a mask, OptG's mask-score gradient), and a method's decision must come out the
same everywhere. So, when a default process group with more than one rank is running:

- :func:`average_captured_grads` all-reduces (averages) the captured gradients after
  every optimizer step, before the method sees them: every rank then scores with the
  gradient of the global batch;
- :func:`sync_from_rank0` broadcasts rank 0's outcome after initialisation and after
  every mask update: the mask buffers (and any other buffer of the mask nodes), the
  sparse layers' weights, channel masks and the method state (generators included).
  Ranks compute the update from identical inputs anyway; the broadcast makes agreement
  exact by construction, so checkpoints taken on any rank are the same.

Without an initialised process group (or with one rank) every function is a no-op.
Every function here is a collective: all ranks must call it in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .layers import TRACKED, SparseLayer

__all__ = ["is_distributed", "average_captured_grads", "sync_from_rank0", "CAPTURED_GRADS"]

# gradients MaskedWeight holders capture outside autograd's parameter .grad (DDP does not reduce them)
CAPTURED_GRADS = ("dense_grad", "score_grad")


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo and the others take CPU tensors
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_(tensor: torch.Tensor) -> None:
    """Overwrite ``tensor`` in place with rank 0's value (bool sent as uint8)."""
    device = _comm_device()
    wire = tensor.detach()
    if wire.dtype == torch.bool:
        wire = wire.to(torch.uint8)
    wire = wire.to(device).contiguous()
    torch.distributed.broadcast(wire, src=0)
    with torch.no_grad():
        tensor.copy_(wire.to(tensor.device).to(tensor.dtype))


def _all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise mean over ranks of each tensor, one collective per dtype."""
    world = torch.distributed.get_world_size()
    device = _comm_device()
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        members = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1).to(device) for i in members])
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for i in members:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i]).to(tensors[i].device)
            offset += n
    return out  # type: ignore[return-value]


def _captured_zero(layer: SparseLayer, name: str) -> torch.Tensor:
    # what a rank whose backward missed this layer contributes: a zero gradient
    dtype = torch.float32 if name == "score_grad" else layer.module.weight.dtype
    return torch.zeros(layer.masked.mask_shape, dtype=dtype, device=layer.module.weight.device)


def average_captured_grads(layers: Sequence[SparseLayer]) -> None:
    """Replace every captured gradient (:data:`CAPTURED_GRADS`) by its mean over ranks.

    Which gradients exist is agreed first (a max over ranks), so a rank whose backward
    did not reach a layer contributes zeros instead of hanging the collective."""
    if not is_distributed() or not layers:
        return
    present = torch.tensor([[getattr(layer.masked, name, None) is not None for name in CAPTURED_GRADS]
                            for layer in layers], dtype=torch.int32, device=_comm_device())
    torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MAX)
    slots = [(layer, name) for row, layer in zip(present.tolist(), layers)
             for flag, name in zip(row, CAPTURED_GRADS) if flag]
    if not slots:
        return
    local = [getattr(layer.masked, name, None) for layer, name in slots]
    local = [value if value is not None else _captured_zero(layer, name) for value, (layer, name) in zip(local, slots)]
    for (layer, name), mean in zip(slots, _all_reduce_mean(local)):
        setattr(layer.masked, name, mean)


@dataclass(frozen=True)
class _Slot:
    """Where a tensor sat in a broadcast state: its index, shape and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _strip(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1, tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return {key: _strip(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_strip(item, tensors) for item in value)
    return value


def _fill(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _Slot):
        return tensors[value.index]
    if isinstance(value, dict):
        return {key: _fill(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(item, tensors) for item in value)
    return value


def broadcast_state(state: Any) -> Any:
    """Rank 0's ``state`` (nested dicts/lists of tensors and plain values) on every rank:
    the structure goes by pickle, the tensors by tensor broadcasts."""
    local: list[torch.Tensor] = []
    box = [_strip(state, local)]
    torch.distributed.broadcast_object_list(box, src=0)
    skeleton = box[0]
    slots: list[_Slot] = []
    _strip_slots(skeleton, slots)
    rank0 = torch.distributed.get_rank() == 0
    received = []
    for slot in sorted(slots, key=lambda s: s.index):
        # other ranks hold the same structure: receive on the device their own tensor is on
        device = local[slot.index].device if slot.index < len(local) else torch.device("cpu")
        tensor = local[slot.index].clone() if rank0 else torch.empty(slot.shape, dtype=slot.dtype, device=device)
        _broadcast_(tensor)
        received.append(tensor)
    return _fill(skeleton, received)


def _strip_slots(value: Any, found: list[_Slot]) -> None:
    if isinstance(value, _Slot):
        found.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _strip_slots(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _strip_slots(item, found)


def sync_from_rank0(layers: Sequence[SparseLayer], units: Sequence[Any], method: Any, changed: bool = True) -> bool:
    """Make every rank's masks, sparse weights, channel masks (``units``' ``mask``), ``method``
    state (its ``state_dict``) and per-layer metric records rank 0's; returns rank 0's
    ``changed`` (whether the update changed masks)."""
    if not is_distributed():
        return changed
    flag = torch.tensor([int(changed)], dtype=torch.int32)
    _broadcast_(flag)
    for layer in layers:
        for _, buffer in sorted(layer.masked.named_buffers(recurse=False)):
            _broadcast_(buffer)
        _broadcast_(layer.module.weight.data)
    for unit in units:
        _broadcast_(unit.mask)
    tracked = [{key: getattr(layer, key) for key in TRACKED} for layer in layers]
    state = broadcast_state({"method": method.state_dict(), "tracked": tracked})
    if torch.distributed.get_rank() != 0:
        method.load_state_dict(state["method"])
        for layer, values in zip(layers, state["tracked"]):
            for key, value in values.items():
                setattr(layer, key, value)
    return bool(flag.item())
