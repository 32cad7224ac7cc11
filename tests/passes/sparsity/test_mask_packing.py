"""Bit-packed masks: exact round trips, assignment semantics, state_dict format and size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from helpers import sparsify
from hypothesis import given, settings
from hypothesis import strategies as st
from spruce.passes.sparsity.masking import MaskedWeight, pack_bits, unpack_bits


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), density=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(shape, density, seed):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_assignment_packs_in_place_and_reads_back():
    masked = MaskedWeight(torch.ones(6, 5, dtype=torch.bool))
    buffer = masked.packed_mask
    new = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) < 0.3
    masked.mask = new  # through set_mask: the same buffer object (DDP keeps references to buffers)
    assert masked.packed_mask is buffer and dict(masked.named_buffers())["mask"] is buffer
    assert masked.mask.dtype == torch.bool and torch.equal(masked.mask, new)
    masked.set_mask(new.float())  # any dtype, non-zero = active
    assert torch.equal(masked.mask, new)
    with pytest.raises(ValueError, match=r"shape \(5, 6\)"):
        masked.mask = torch.ones(5, 6)


def test_effective_weight_and_gradient_follow_the_mask():
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(2)) < 0.5
    masked = MaskedWeight(mask)
    weight = torch.randn(4, 3, requires_grad=True)
    effective = masked(weight)
    assert torch.equal(effective, weight.detach() * mask)
    effective.sum().backward()
    assert torch.equal(weight.grad, mask.float())


def test_state_dict_holds_packed_masks_and_loads_old_bool_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    sm = sparsify(model, torch.randn(1, 3, 6, 6), sparsity=0.8)
    state = sm.state_dict()
    masks = {key: value.clone() for key, value in state.items() if key.endswith(".mask")}
    assert [v.numel() for v in masks.values()] == [math.ceil(layer.module.weight.numel() / 8) for layer in sm.layers]
    assert all(v.dtype == torch.uint8 for v in masks.values())
    # a state_dict written when masks were bool tensors still loads
    old = dict(state)
    for key, layer in zip(masks, sm.layers):
        old[key] = ~layer.masked.mask
    sm.load_state_dict(old)
    assert all(torch.equal(layer.masked.mask, ~unpack_bits(masks[key], layer.masked.mask_shape))
               for key, layer in zip(masks, sm.layers))
