"""normalised_widths: the widths LayerNorm / RMSNorm normalise over prune on request.

The masked model then computes those norms over the kept channels (a masked norm), so the
compact model (a smaller norm) equals it; sparsify(structure="channel") trains with the same
semantics. Real torchvision transformers (ViT, Swin, ConvNeXt; random weights, small inputs)
and a channels-last LayerNorm/RMSNorm residual model."""

from __future__ import annotations

import pytest
import spruce
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize
from spruce.api import checks
from spruce.passes.maskednorm import masked_layer_norm, masked_rms_norm
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer MLP block over the last dim."""

    def __init__(self, width: int, norm: type):
        super().__init__()
        self.norm = norm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.pos = nn.Parameter(torch.randn(1, 6, 16))
        self.blocks = nn.Sequential(Block(16, nn.LayerNorm), Block(16, nn.RMSNorm))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids) + self.pos)))


class TinyLinear(Tiny):
    """The same residual stream fed by a linear projection: every weight reaching the
    residual width is a Linear, so sparsify's channel masks reach all of them."""

    def __init__(self):
        super().__init__()
        del self.embed, self.pos
        self.inp = nn.Linear(8, 16)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.inp(x))))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return randomize(Tiny(), 0).eval()


def ids(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 20, (batch, 6), generator=torch.Generator().manual_seed(seed))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_masked_norms_equal_the_norm_of_the_kept_channels():
    x = torch.randn(3, 5, 10)
    keep = torch.tensor([True, False, True, True, False, True, True, False, True, True])
    w, b = torch.randn(10), torch.randn(10)
    got = masked_layer_norm(x, keep, w * keep, b * keep)
    want = F.layer_norm(x[..., keep], (int(keep.sum()),), w[keep], b[keep])
    assert torch.allclose(got[..., keep], want, atol=1e-6) and torch.all(got[..., ~keep] == 0)
    got = masked_rms_norm(x, keep, w * keep, 1e-6)
    want = F.rms_norm(x[..., keep], (int(keep.sum()),), w[keep], 1e-6)
    assert torch.allclose(got[..., keep], want, atol=1e-6) and torch.all(got[..., ~keep] == 0)
    # the check can fail: the plain norm over every channel differs
    assert not torch.allclose(F.layer_norm(x, (10,), w, b)[..., keep], want, atol=1e-3)


def test_residual_width_prunes_exactly_and_embeddings_shrink():
    model = tiny()
    result = spruce.prune(model, ids(2), ratio=0.5, normalised_widths=True)
    compact = result.model
    shapes = {name: tuple(p.shape) for name, p in compact.named_parameters()}
    assert shapes["embed.weight"] == (20, 8) and shapes["pos"] == (1, 6, 8)
    assert shapes["norm.weight"] == (8,) and shapes["blocks.1.norm.weight"] == (8,)
    for batch in (1, 3):
        errors = result.errors(ids(batch, batch))
        assert errors["masked"] <= 1e-4, (batch, errors)
        assert errors["dense"] > 1e-2  # the masked norm changes the function, and the report says so
    # the check can fail: the masked model without its masked norms is not the compact model
    masked = result.masked
    for hook in list(masked._forward_pre_hooks):
        del masked._forward_pre_hooks[hook]
    with torch.no_grad():
        assert checks.relative_error(masked(ids(3)), compact(ids(3))) > 1e-3


def test_option_off_changes_nothing():
    model = tiny()
    default = spruce.prune(model, ids(2), ratio=0.5)
    off = spruce.prune(model, ids(2), ratio=0.5, normalised_widths=False)
    assert {k: v.tolist() for k, v in default.kept.items()} == {k: v.tolist() for k, v in off.kept.items()}
    for result in (default, off):
        assert tuple(result.model.state_dict()["norm.weight"].shape) == (16,)
        assert not result.masked._forward_pre_hooks  # no masked norm installed
        assert result.errors()["masked"] == 0.0
        reasons = " ".join(g.reason or "" for g in result.groups if not g.prunable)
        assert "normalises over this dim" in reasons
    with torch.no_grad():
        assert torch.equal(default.model(ids(3)), off.model(ids(3)))


def test_bad_option_values_are_named():
    model = tiny()
    with pytest.raises(ValueError, match="normalised_widths"):
        spruce.prune(model, ids(2), ratio=0.5, normalised_widths="yes")
    with pytest.raises(ValueError, match="normalised_widths"):
        spruce.sparsify(model, ids(2), method="gmp", structure="unstructured", sparsity=0.5, total_steps=4,
                        normalised_widths=True)
    with pytest.raises(ValueError, match="normalised_widths"):
        spruce.sparsify(model, ids(2), method="gmp", structure="channel", distribution="uniform", sparsity=0.5,
                        total_steps=4, normalised_widths=1)


def test_channel_sparsify_trains_with_masked_norms():
    torch.manual_seed(0)
    model = randomize(TinyLinear(), 0)
    sm = spruce.sparsify(model, torch.randn(4, 6, 8), method="gmp", structure="channel", distribution="uniform",
                         sparsity=0.5, total_steps=12, normalised_widths=True)
    opt = torch.optim.SGD(sm.parameters(), lr=0.01)
    sm.attach(opt)
    for _ in range(12):
        loss = sm(torch.randn(4, 6, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
    keeps = sm.norm_keeps()
    assert set(keeps) >= {"norm.weight", "blocks.0.norm.weight", "blocks.1.norm.weight"}
    assert all(int(k.sum()) == 8 for k in keeps.values())
    sm.eval()
    compact = sm.compact().eval()
    assert tuple(compact.state_dict()["inp.weight"].shape) == (8, 8)
    x = torch.randn(3, 6, 8)
    with torch.no_grad():
        assert checks.relative_error(sm(x), compact(x)) <= 1e-4
        assert checks.relative_error(sm.fold().eval()(x), compact(x)) <= 1e-4
        # the check can fail: the same graph without its masked norms computes something else
        graph = sm.graph
        assert checks.relative_error(graph(x), compact(x)) > 1e-3


def _torchvision(name: str) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    if name == "vit":
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                  mlp_dim=128, num_classes=10)
        size = 32
    elif name == "swin":
        from torchvision.models.swin_transformer import SwinTransformer

        model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                                num_classes=10)
        size = 32
    else:
        model = torchvision.models.convnext_tiny()
        size = 64
    return randomize(model, 0).eval(), size


@pytest.mark.parametrize("name", ["vit", "swin", "convnext_tiny"])
def test_torchvision_transformers_prune_exactly(name):
    """Compact == masked at two batch sizes, and at most 0.35 of the parameters kept at ratio
    0.5 (ViT and Swin in small configurations; Swin's fx graph keeps torchvision's fx-wrapped
    attention opaque, so the model is captured by torch.export)."""
    model, size = _torchvision(name)
    gen = torch.Generator().manual_seed(1)
    example = torch.randn(1, 3, size, size, generator=gen)
    result = spruce.prune(model, example, ratio=0.5, normalised_widths=True)
    kept = n_params(result.model) / n_params(model)
    assert kept <= 0.35, kept
    assert n_params(result.model) < n_params(spruce.prune(model, example, ratio=0.5).model)
    if name == "swin":
        assert result.analysis.captured.method == "export"
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=gen)
        assert result.errors(x)["masked"] <= 1e-4, batch
    assert result.errors()["dense"] > 1e-3
