"""Channel groups on hand-built graphs: each coupling rule, and equivalence of the
compact model with its masked model for each construct."""

import numpy as np
import pytest
import spruce
import torch
import torch.nn.functional as F
from helpers import randomize, relative_error
from torch import nn


def group_of(groups, name, dim):
    matches = [g for g in groups for m in g.members if m.name == name and m.dim == dim]
    assert len(matches) == 1, f"{name} dim {dim} in {len(matches)} groups"
    return matches[0]


def members(group):
    return {(m.name, m.dim) for m in group.members}


def check_equivalent(model, x, ratio=0.5, **kw):
    randomize(model)
    model.eval()
    result = spruce.prune(model, x, ratio=ratio, **kw)
    with torch.no_grad():
        masked = result.masked(x)
        compact = result.model(x)
        original = model(x)
    assert result.kept, "nothing was pruned"
    assert relative_error(masked, compact) <= 1e-4
    assert relative_error(original, masked) > 1e-4  # pruning really changed the function
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in result.model.parameters())
    assert n_after < n_before
    return result


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.c2(F.relu(self.c1(x)))
        return self.head(x.mean((2, 3)))


def test_residual_add_couples_producers_and_consumers():
    groups = spruce.channel_groups(Residual(), torch.randn(1, 3, 8, 8))
    g = group_of(groups, "stem.weight", 0)
    assert members(g) >= {("stem.weight", 0), ("stem.bias", 0), ("bn.weight", 0), ("bn.running_mean", 0),
                          ("c1.weight", 1), ("c2.weight", 0), ("c2.bias", 0), ("head.weight", 1)}
    assert g.size == 8 and g.prunable
    inner = group_of(groups, "c1.weight", 0)
    assert members(inner) == {("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 1)}
    out = group_of(groups, "head.weight", 0)
    assert not out.prunable and "graph output" in out.reason
    inp = group_of(groups, "stem.weight", 1)
    assert not inp.prunable and "graph input" in inp.reason
    check_equivalent(Residual(), torch.randn(2, 3, 8, 8))


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4)
        return self.fc(torch.flatten(x, 1))


def test_flatten_into_linear_expands_indices():
    g = group_of(spruce.channel_groups(FlattenHead(), torch.randn(1, 3, 8, 8)), "conv.weight", 0)
    fc = g.member("fc.weight", 1)
    assert fc.index.shape == (6, 16)
    np.testing.assert_array_equal(fc.index[2], np.arange(32, 48))
    check_equivalent(FlattenHead(), torch.randn(2, 3, 8, 8))


class CatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(10, 10, 1)
        self.p = nn.Conv2d(3, 10, 1)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = self.mix(y)
        u, v = torch.split(y, [3, 7], dim=1)
        y = torch.cat([u.sigmoid(), v * 2], 1)
        y = y + self.p(x)
        return self.head(y.mean((2, 3)))


def test_cat_and_split_map_offsets():
    groups = spruce.channel_groups(CatSplit(), torch.randn(1, 3, 8, 8))
    a = group_of(groups, "a.weight", 0)
    np.testing.assert_array_equal(a.member("mix.weight", 1).index[:, 0], np.arange(0, 4))
    b = group_of(groups, "b.weight", 0)
    np.testing.assert_array_equal(b.member("mix.weight", 1).index[:, 0], np.arange(4, 10))
    mix = group_of(groups, "mix.weight", 0)
    assert ("p.weight", 0) in members(mix) and mix.size == 10
    check_equivalent(CatSplit(), torch.randn(2, 3, 8, 8))


class Depthwise(nn.Module):
    def __init__(self, groups=8, mult=1):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8 * mult, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(8 * mult)
        self.out = nn.Conv2d(8 * mult, 4, 1)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.dw(F.relu(self.pw(x)))))).mean((2, 3))


def test_depthwise_couples_input_and_output_channels():
    g = group_of(spruce.channel_groups(Depthwise(), torch.randn(1, 3, 8, 8)), "pw.weight", 0)
    assert members(g) >= {("dw.weight", 0), ("bn.weight", 0), ("out.weight", 1)}
    r = check_equivalent(Depthwise(), torch.randn(2, 3, 8, 8))
    dw = r.model.get_submodule("dw")
    assert dw.groups == dw.in_channels == dw.out_channels == 4


def test_depthwise_multiplier_keeps_channel_pairs_together():
    g = group_of(spruce.channel_groups(Depthwise(mult=2), torch.randn(1, 3, 8, 8)), "pw.weight", 0)
    assert g.member("dw.weight", 0).index.shape == (8, 2)
    check_equivalent(Depthwise(mult=2), torch.randn(2, 3, 8, 8))


def test_group_conv_prunes_uniformly_within_groups():
    g = group_of(spruce.channel_groups(Depthwise(groups=2), torch.randn(1, 3, 8, 8)), "pw.weight", 0)
    assert g.size == 4  # channel c of both groups goes together
    assert g.member("pw.weight", 0).index.shape == (4, 2)
    r = check_equivalent(Depthwise(groups=2), torch.randn(2, 3, 8, 8))
    assert r.model.get_submodule("dw").groups == 2


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = F.adaptive_avg_pool2d(x, 1)
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        x = x * self.scale  # layer scale read through get_attr
        return self.head(x.mean((2, 3)))


def test_squeeze_excitation_and_layer_scale():
    groups = spruce.channel_groups(SE(), torch.randn(1, 3, 8, 8))
    g = group_of(groups, "conv.weight", 0)
    assert members(g) >= {("fc1.weight", 1), ("fc2.weight", 0), ("fc2.bias", 0), ("scale", 0)}
    assert group_of(groups, "fc1.weight", 0).prunable
    check_equivalent(SE(), torch.randn(2, 3, 8, 8))


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block without LayerNorm: permute, Linear over channels, permute back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.down(F.gelu(self.up(y)))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_channels_last_blocks():
    groups = spruce.channel_groups(ChannelsLast(), torch.randn(1, 3, 8, 8))
    g = group_of(groups, "conv.weight", 0)
    assert members(g) >= {("dw.weight", 0), ("up.weight", 1), ("down.weight", 0), ("gamma", 0)}
    assert group_of(groups, "up.weight", 0).size == 16
    check_equivalent(ChannelsLast(), torch.randn(2, 3, 8, 8))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.c(F.relu(y)).mean((2, 3))


def test_channel_shuffle_is_handled_not_silently_wrong():
    groups = spruce.channel_groups(Shuffle(), torch.randn(1, 3, 8, 8))
    g = group_of(groups, "a.weight", 0)
    assert ("b.weight", 0) in members(g)  # channel j of both branches moves together
    c_cols = g.member("c.weight", 1).index
    np.testing.assert_array_equal(np.sort(c_cols, axis=1), np.stack([np.arange(0, 12, 2), np.arange(1, 12, 2)], 1))
    check_equivalent(Shuffle(), torch.randn(2, 3, 8, 8))


def test_channel_shuffle_module():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ChannelShuffle(2), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 64, 2)
    )
    check_equivalent(model, torch.randn(2, 3, 8, 8))


class Attention(nn.Module):
    """timm-style attention with scaled_dot_product_attention and computed reshape args."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.num_heads = heads
        self.embed = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, N, C)
        x = x + self.proj(y)
        return self.head(x.mean(1))


def test_sdpa_attention_prunes_whole_heads():
    groups = spruce.channel_groups(Attention(), torch.randn(1, 7, 5))
    heads = group_of(groups, "proj.weight", 1)
    assert heads.prunable and heads.size == 4
    assert heads.member("qkv.weight", 0).index.shape == (4, 12)  # q, k, v rows of one head
    r = check_equivalent(Attention(), torch.randn(2, 7, 5))
    assert r.model.get_submodule("qkv").out_features == 3 * 2 * 4
    assert r.model(torch.randn(3, 9, 5)).shape == (3, 3)  # other batch and sequence sizes


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head((x + y).mean(1))


def test_multihead_attention_heads_and_width():
    groups = spruce.channel_groups(MHA(), torch.randn(1, 7, 5))
    g = group_of(groups, "attn.in_proj_weight", 0)
    assert g.prunable and g.size == 4
    assert ("embed.weight", 0) in members(g)
    r = check_equivalent(MHA(), torch.randn(2, 7, 5))
    attn = r.model.get_submodule("attn")
    assert (attn.num_heads, attn.embed_dim, attn.head_dim) == (2, 8, 4)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.gn_conv = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.emb = nn.Embedding(10, 6)
        self.fc2 = nn.Linear(6, 8)

    def forward(self, x, img, ids):
        return self.ln(self.fc(x)) + self.gn(self.gn_conv(img)).mean((2, 3)) + self.fc2(self.emb(ids)).mean(1)


def test_normalisations_that_mix_channels_pin_them():
    inputs = (torch.randn(2, 4), torch.randn(2, 3, 4, 4), torch.randint(0, 10, (2, 5)))
    groups = spruce.channel_groups(Normed(), inputs)
    g = group_of(groups, "fc.weight", 0)
    assert not g.prunable
    emb = group_of(groups, "emb.weight", 1)
    assert emb.prunable and ("fc2.weight", 1) in members(emb)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.other = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.special.erfcx(self.conv(x))  # no rule for this op
        return self.out(F.relu(self.other(x)) + y).mean((2, 3))


def test_unknown_operator_makes_channels_unprunable_with_reason():
    groups = spruce.channel_groups(Unknown(), torch.randn(1, 3, 8, 8))
    g = group_of(groups, "conv.weight", 0)
    assert not g.prunable
    assert "unknown operator" in g.reason and "special_erfcx" in g.reason
    other = group_of(groups, "other.weight", 0)  # added to the unknown op's output
    assert not other.prunable and "unknown operator" in other.reason


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(4, 8)
            self.b.weight = self.a.weight
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(F.relu(self.a(x)) * torch.sigmoid(self.b(x + 1)))

    r = check_equivalent(Tied(), torch.randn(3, 4))
    assert r.model.get_submodule("a").weight is r.model.get_submodule("b").weight


def test_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.shared = nn.Conv2d(8, 8, 3, padding=1)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            x = F.relu(self.conv(x))
            x = self.shared(F.relu(self.shared(x)))
            return self.out(x.mean((2, 3)))

    groups = spruce.channel_groups(Twice(), torch.randn(1, 3, 8, 8))
    g = group_of(groups, "conv.weight", 0)
    assert ("shared.weight", 0) in members(g) and ("shared.weight", 1) in members(g)
    check_equivalent(Twice(), torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9])
def test_every_group_keeps_at_least_one_channel(ratio):
    result = spruce.prune(randomize(Residual()), torch.randn(1, 3, 8, 8), ratio=ratio)
    for g in result.groups:
        if g.id in result.kept:
            assert 1 <= len(result.kept[g.id]) < g.size
    if ratio == 0.0:
        assert result.kept == {}


@pytest.mark.parametrize(("channels", "groups"), [(8, 2), (16, 4), (4, 2), (9, 3)])
def test_channel_shuffle_with_square_factorisation_still_prunes(channels, groups):
    class Shuffled(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = groups
            self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
            self.conv2 = nn.Conv2d(channels, 8, 3, padding=1)

        def forward(self, x):
            x = self.conv1(x)
            b, c, h, w = x.size()
            x = x.view(b, self.g, c // self.g, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
            return self.conv2(x).mean((2, 3))

    g = group_of(spruce.channel_groups(Shuffled(), torch.randn(1, 3, 8, 8)), "conv1.weight", 0)
    assert g.prunable and g.size == channels // groups
    check_equivalent(Shuffled(), torch.randn(2, 3, 8, 8))
