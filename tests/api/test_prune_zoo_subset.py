"""A fast subset of the torchvision model-zoo sweep (the whole sweep is bench/zoo.py)."""

import pytest
import spruce
import torch
import torchvision
from helpers import first_output, randomize, relative_error

SUBSET = {
    "resnet18": 64,
    "mobilenet_v3_small": 64,
    "shufflenet_v2_x0_5": 64,
    "convnext_tiny": 64,
    "vit_b_16": 224,
    "densenet121": 64,
    "googlenet": 64,
}


@pytest.mark.parametrize("name", list(SUBSET))
def test_zoo_model_prunes_to_an_equivalent_compact_model(name):
    torch.manual_seed(0)
    model = randomize(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(2, 3, SUBSET[name], SUBSET[name])
    result = spruce.prune(model, x, ratio=0.5)
    assert result.kept
    with torch.no_grad():
        original = first_output(model(x))
        masked = first_output(result.masked(x))
        compact = first_output(result.model(x))
    assert relative_error(masked, compact) <= 1e-4
    assert relative_error(original, masked) > 1e-3  # the check can fail: pruning changed the function
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.model.parameters())
    assert after < 0.9 * before
    # training mode still runs (GoogLeNet returns its auxiliary heads there)
    result.model.train()
    out = result.model(x)
    if name == "googlenet":
        assert len(out) == 3 and all(t.shape == (2, 1000) for t in out)
    else:
        assert first_output(out).shape == (2, 1000)
    outputs = [out] if isinstance(out, torch.Tensor) else list(out)
    sum(t.sum() for t in outputs).backward()
    assert all(p.grad is not None for p in result.model.parameters() if p.requires_grad)
