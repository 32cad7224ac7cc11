"""Property tests: on random architectures, the compact model computes what the masked one does.

Architectures come from a small grammar (stem conv, then blocks: conv/bn/act, residual,
two-branch concat, split-and-cat, depthwise, group conv, squeeze-excitation, channels-last
linear, channel shuffle; then a pooled or flattened linear head). Each block is an
``nn.Module`` whose forward is plain torch code, so torch.fx traces it. Every parameter and
BatchNorm statistic is randomised before pruning, so a wrongly removed channel shows.
The generated ``Arch`` value (printed by hypothesis on failure) rebuilds the model:
``build(arch)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import spruce
import torch
import torch.nn.functional as F
from helpers import randomize, relative_error
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

WIDTHS = (4, 6, 8, 12, 16)
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish}
FUNCTIONAL = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish}
SPATIAL = 16
TOLERANCE = 1e-4

# ---- the grammar: one frozen spec per block kind ------------------------------------


@dataclass(frozen=True)
class Conv:
    """conv(k, stride) -> [bn] -> act (module activations)."""

    out: int
    k: int = 3
    stride: int = 1
    bn: bool = True
    act: str = "relu"


@dataclass(frozen=True)
class Residual:
    """act(bn(conv(act(bn(conv(x))))) + shortcut(x)); 1x1 projection when widths differ."""

    out: int
    act: str = "relu"


@dataclass(frozen=True)
class Concat:
    """cat([act(bn(conv3x3(x))), act(conv1x1(x))], dim=1)."""

    left: int
    right: int
    act: str = "relu"


@dataclass(frozen=True)
class Split:
    """Split x along channels into (first, rest): torch.chunk when ``first`` is None (two
    halves), else torch.split; the first part gets conv+act, the rest a depthwise conv;
    concatenated back (in swapped order when ``swap``)."""

    first: int | None
    out: int
    swap: bool = False


@dataclass(frozen=True)
class Depthwise:
    """Depthwise conv (groups = channels) -> bn -> act."""

    act: str = "relu"


@dataclass(frozen=True)
class GroupConv:
    """conv3x3 with ``groups`` groups -> bn -> act."""

    out: int
    groups: int = 2
    act: str = "relu"


@dataclass(frozen=True)
class SqueezeExcite:
    """x * sigmoid(conv1x1(relu(conv1x1(avgpool(x)))))."""

    hidden: int


@dataclass(frozen=True)
class ChannelsLast:
    """permute to NHWC -> [LayerNorm] -> Linear over channels -> permute back."""

    out: int
    norm: bool = False


@dataclass(frozen=True)
class NormResidual:
    """Channels-last pre-norm residual (a transformer's MLP block): permute to NHWC,
    y + fc2(act(fc1(norm(y)))), permute back; ``norm`` is an nn.LayerNorm ("layer"), an
    nn.RMSNorm ("rms") or F.layer_norm ("functional"). Under ``normalised_widths`` the
    residual width it normalises over prunes (a masked norm in the masked model)."""

    hidden: int
    norm: str = "layer"
    act: str = "gelu"


@dataclass(frozen=True)
class Shuffle:
    """ShuffleNet channel shuffle: view/transpose/view, or nn.ChannelShuffle."""

    groups: int = 2
    module: bool = False


@dataclass(frozen=True)
class Arch:
    """stem conv(3 -> stem) -> blocks -> head ('gap': pool to 1x1; 'flat': pool to
    ``flat_side`` x ``flat_side`` and flatten, so each channel owns many linear inputs)."""

    stem: int
    blocks: tuple
    head: str = "gap"
    flat_side: int = 4
    classes: int = 5
    batch: int = 1


# ---- modules built from the specs ---------------------------------------------------


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, spec: Conv):
        super().__init__()
        self.conv = nn.Conv2d(c_in, spec.out, spec.k, spec.stride, spec.k // 2, bias=not spec.bn)
        self.bn = nn.BatchNorm2d(spec.out) if spec.bn else None
        self.act = ACTIVATIONS[spec.act]()

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, spec: Residual):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, spec.out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.out)
        self.conv2 = nn.Conv2d(spec.out, spec.out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(spec.out)
        self.proj = nn.Conv2d(c_in, spec.out, 1, bias=False) if c_in != spec.out else None
        self.act = FUNCTIONAL[spec.act]

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        shortcut = x if self.proj is None else self.proj(x)
        return self.act(out + shortcut)


class ConcatBlock(nn.Module):
    def __init__(self, c_in: int, spec: Concat):
        super().__init__()
        self.conv_left = nn.Conv2d(c_in, spec.left, 3, padding=1, bias=False)
        self.bn_left = nn.BatchNorm2d(spec.left)
        self.conv_right = nn.Conv2d(c_in, spec.right, 1)
        self.act = FUNCTIONAL[spec.act]

    def forward(self, x):
        left = self.act(self.bn_left(self.conv_left(x)))
        right = self.act(self.conv_right(x))
        return torch.cat([left, right], dim=1)


class SplitBlock(nn.Module):
    def __init__(self, c_in: int, spec: Split):
        super().__init__()
        first = c_in // 2 if spec.first is None else spec.first
        self.sizes = [first, c_in - first]
        self.chunk = spec.first is None
        self.swap = spec.swap
        self.conv = nn.Conv2d(first, spec.out, 1)
        self.dw = nn.Conv2d(c_in - first, c_in - first, 3, padding=1, groups=c_in - first)

    def forward(self, x):
        if self.chunk:
            a, b = torch.chunk(x, 2, dim=1)
        else:
            parts = torch.split(x, self.sizes, dim=1)
            a, b = parts[0], parts[1]
        a = F.relu(self.conv(a))
        b = self.dw(b)
        return torch.cat([b, a], dim=1) if self.swap else torch.cat([a, b], dim=1)


class DepthwiseBlock(nn.Module):
    def __init__(self, c_in: int, spec: Depthwise):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.bn = nn.BatchNorm2d(c_in)
        self.act = ACTIVATIONS[spec.act]()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class GroupConvBlock(nn.Module):
    def __init__(self, c_in: int, spec: GroupConv):
        super().__init__()
        self.conv = nn.Conv2d(c_in, spec.out, 3, padding=1, groups=spec.groups, bias=False)
        self.bn = nn.BatchNorm2d(spec.out)
        self.act = ACTIVATIONS[spec.act]()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SqueezeExciteBlock(nn.Module):
    def __init__(self, c_in: int, spec: SqueezeExcite):
        super().__init__()
        self.fc1 = nn.Conv2d(c_in, spec.hidden, 1)
        self.fc2 = nn.Conv2d(spec.hidden, c_in, 1)

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class ChannelsLastBlock(nn.Module):
    def __init__(self, c_in: int, spec: ChannelsLast):
        super().__init__()
        self.norm = nn.LayerNorm(c_in) if spec.norm else None
        self.fc = nn.Linear(c_in, spec.out)

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        if self.norm is not None:
            y = self.norm(y)
        y = self.fc(y)
        return y.permute(0, 3, 1, 2)


class NormResidualBlock(nn.Module):
    def __init__(self, c_in: int, spec: NormResidual):
        super().__init__()
        self.kind = spec.norm
        self.norm = {"layer": nn.LayerNorm, "rms": nn.RMSNorm, "functional": nn.LayerNorm}[spec.norm](c_in)
        self.fc1 = nn.Linear(c_in, spec.hidden)
        self.act = ACTIVATIONS[spec.act]()
        self.fc2 = nn.Linear(spec.hidden, c_in)

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        if self.kind == "functional":
            z = F.layer_norm(y, (y.shape[-1],), self.norm.weight, self.norm.bias, 1e-5)
        else:
            z = self.norm(y)
        y = y + self.fc2(self.act(self.fc1(z)))
        return y.permute(0, 3, 1, 2)


class ShuffleBlock(nn.Module):
    def __init__(self, c_in: int, spec: Shuffle):
        super().__init__()
        self.groups = spec.groups
        self.shuffle = nn.ChannelShuffle(spec.groups) if spec.module else None

    def forward(self, x):
        if self.shuffle is not None:
            return self.shuffle(x)
        batch, channels, height, width = x.size()
        x = x.view(batch, self.groups, channels // self.groups, height, width)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(batch, channels, height, width)


BLOCKS = {
    Conv: ConvBlock,
    Residual: ResidualBlock,
    Concat: ConcatBlock,
    Split: SplitBlock,
    Depthwise: DepthwiseBlock,
    GroupConv: GroupConvBlock,
    SqueezeExcite: SqueezeExciteBlock,
    ChannelsLast: ChannelsLastBlock,
    NormResidual: NormResidualBlock,
    Shuffle: ShuffleBlock,
}


def out_width(c_in: int, spec: object) -> int:
    """Channels a block of ``spec`` produces from ``c_in`` channels."""
    if isinstance(spec, Concat):
        return spec.left + spec.right
    if isinstance(spec, Split):
        first = c_in // 2 if spec.first is None else spec.first
        return spec.out + c_in - first
    if isinstance(spec, (Depthwise, SqueezeExcite, Shuffle, NormResidual)):
        return c_in
    return spec.out


class Net(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.stem = nn.Conv2d(3, arch.stem, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(arch.stem)
        width = arch.stem
        blocks = []
        for spec in arch.blocks:
            blocks.append(BLOCKS[type(spec)](width, spec))
            width = out_width(width, spec)
        self.blocks = nn.ModuleList(blocks)
        self.flat = arch.head == "flat"
        side = arch.flat_side if self.flat else 1
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.fc = nn.Linear(width * side * side, arch.classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        if self.flat:
            return self.fc(torch.flatten(self.pool(x), 1))
        return self.fc(self.pool(x).flatten(1))


def build(arch: Arch, seed: int = 0) -> Net:
    """The model of ``arch`` in eval mode with randomised parameters and statistics."""
    torch.manual_seed(seed)
    return randomize(Net(arch), seed).eval()


# ---- strategies -----------------------------------------------------------------------

widths = st.sampled_from(WIDTHS)
activations = st.sampled_from(sorted(ACTIVATIONS))


@st.composite
def block_specs(draw, c_in: int, downsample_left: bool):
    kinds = ["conv", "residual", "concat", "depthwise", "se", "channels_last", "split", "norm_residual"]
    if c_in % 2 == 0:  # widths can turn odd after a split block
        kinds += ["group", "shuffle"]
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        stride = draw(st.sampled_from([1, 2])) if downsample_left else 1
        kernel = draw(st.sampled_from([1, 3]))
        return Conv(draw(widths), kernel, stride, draw(st.booleans()), draw(activations))
    if kind == "residual":
        return Residual(draw(widths), draw(activations))
    if kind == "concat":
        return Concat(draw(widths), draw(widths), draw(activations))
    if kind == "split":
        sizes = st.integers(1, c_in - 1)
        first = draw(st.one_of(st.none(), sizes) if c_in % 2 == 0 else sizes)
        return Split(first, draw(widths), draw(st.booleans()))
    if kind == "depthwise":
        return Depthwise(draw(activations))
    if kind == "norm_residual":
        return NormResidual(draw(widths), draw(st.sampled_from(["layer", "rms", "functional"])), draw(activations))
    if kind == "se":
        return SqueezeExcite(draw(st.sampled_from([2, 4, 8])))
    if kind == "channels_last":
        return ChannelsLast(draw(widths), draw(st.booleans()))
    if kind == "group":
        groups = draw(st.sampled_from([2, 4] if c_in % 4 == 0 else [2]))
        out = draw(st.sampled_from([w for w in WIDTHS if w % groups == 0]))
        return GroupConv(out, groups, draw(activations))
    groups = draw(st.sampled_from([g for g in (2, 4) if c_in % g == 0]))
    return Shuffle(groups, draw(st.booleans()))


@st.composite
def archs(draw, max_blocks: int = 4):
    stem = draw(widths)
    width, blocks, downsamples = stem, [], 0
    for _ in range(draw(st.integers(1, max_blocks))):
        spec = draw(block_specs(width, downsamples < 2))
        downsamples += getattr(spec, "stride", 1) == 2
        blocks.append(spec)
        width = out_width(width, spec)
    head = draw(st.sampled_from(["gap", "flat"]))
    flat_side = draw(st.sampled_from([2, 4])) if head == "flat" else 4
    classes, batch = draw(st.sampled_from([3, 5])), draw(st.sampled_from([1, 2]))
    return Arch(stem, tuple(blocks), head, flat_side, classes, batch)


ratios = st.sampled_from([0.25, 0.5, 0.75])
importances = st.sampled_from(["l1", "l2", "random"])
# derandomized: the same examples on every run, so CI never flakes; no example database
SETTINGS = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None
)

# ---- helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread():
    """Run on one intra-op thread: on tiny tensors, thread hand-offs cost 100x the conv
    itself when the cores are shared (35 ms instead of 0.1 ms per conv)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inputs(arch: Arch, seed: int, batch: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch or arch.batch, 3, SPATIAL, SPATIAL, generator=gen)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _check_groups(model: nn.Module, result: spruce.PruneResult) -> None:
    """Member index arrays address real entries; kept indices are valid, sorted, a strict subset."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    ids = [g.id for g in result.groups]
    assert len(set(ids)) == len(ids)
    for group in result.groups:
        assert group.size >= 1
        assert group.prunable or group.reason, f"group {group.id} unprunable without a reason"
        for m in group.members:
            assert m.name in tensors, f"group {group.id}: unknown tensor {m.name}"
            shape = tensors[m.name].shape
            assert 0 <= m.dim < len(shape), f"group {group.id}: {m.name} has no dim {m.dim}"
            assert m.index.ndim == 2 and m.index.shape[0] == group.size, (group.id, m)
            assert m.index.min() >= 0 and m.index.max() < shape[m.dim], (group.id, m, tuple(shape))
            assert len(np.unique(m.index)) == m.index.size, f"group {group.id}: {m} repeats entries"
    by_id = {g.id: g for g in result.groups}
    for gid, kept in result.kept.items():
        group = by_id[gid]
        assert group.prunable
        assert 0 < len(kept) < group.size
        assert np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] < group.size


def _expected_shapes(model: nn.Module, result: spruce.PruneResult) -> dict[str, tuple[int, ...]]:
    """Parameter shapes once every removed channel's entries are gone."""
    removed: dict[tuple[str, int], set[int]] = {}
    by_id = {g.id: g for g in result.groups}
    for gid, kept in result.kept.items():
        group = by_id[gid]
        dead = np.setdiff1d(np.arange(group.size), kept)
        for m in group.members:
            removed.setdefault((m.name, m.dim), set()).update(m.index[dead].ravel().tolist())
    shapes = {}
    for name, p in model.named_parameters():
        shapes[name] = tuple(s - len(removed.get((name, d), ())) for d, s in enumerate(p.shape))
    return shapes


# ---- properties ------------------------------------------------------------------------


# Every block kind at least once, whatever the generator happens to draw.
COVERAGE = [
    Arch(8, (ChannelsLast(12, norm=True), GroupConv(8, 4), Split(3, 6, True)), "flat", 4, 5, 2),
    Arch(12, (Split(None, 4), Shuffle(2, module=True), Residual(6, "gelu"), SqueezeExcite(4)),
         "flat", 2),
    Arch(6, (Concat(4, 8, "silu"), Shuffle(4), Depthwise("hardswish"), Conv(16, 1, 2, False))),
    Arch(16, (ChannelsLast(8), Residual(8), GroupConv(12, groups=2), Shuffle(2)), "gap", 4, 3, 2),
    Arch(8, (NormResidual(16, "layer"), NormResidual(8, "rms", "silu"), NormResidual(12, "functional"))),
]


@settings(max_examples=80, **SETTINGS)
@given(arch=archs(), ratio=ratios, importance=importances, seed=st.integers(0, 2**16))
@example(arch=COVERAGE[0], ratio=0.5, importance="l1", seed=0)
@example(arch=COVERAGE[1], ratio=0.75, importance="l2", seed=1)
@example(arch=COVERAGE[2], ratio=0.25, importance="random", seed=2)
@example(arch=COVERAGE[3], ratio=0.5, importance="l2", seed=3)
@example(arch=COVERAGE[4], ratio=0.5, importance="l1", seed=4)
def test_compact_equals_masked(arch: Arch, ratio: float, importance: str, seed: int) -> None:
    with _one_thread():
        _check_compact_equals_masked(arch, ratio, importance, seed)


def _check_compact_equals_masked(arch: Arch, ratio: float, importance: str, seed: int,
                                 normalised_widths: bool = False) -> None:
    model = build(arch, seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = _inputs(arch, seed)
    result = spruce.prune(model, (example,), ratio=ratio, importance=importance, seed=seed,
                          normalised_widths=normalised_widths)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"prune modified the original model's {k}"
    _check_groups(model, result)

    compact, masked = result.model.eval(), result.masked.eval()
    for x in (example, _inputs(arch, seed + 1, batch=3)):  # the example and an unseen batch size
        reference = _run(masked, x)
        out = _run(compact, x)
        assert out.shape == reference.shape
        err = relative_error(reference, out)
        assert err < TOLERANCE, f"compact differs from masked by {err:.2e} (relative)"

    if not result.kept:
        assert _n_params(compact) == _n_params(model)
        return
    assert _n_params(compact) < _n_params(model)
    compact_shapes = {k: tuple(p.shape) for k, p in compact.named_parameters()}
    for name, shape in _expected_shapes(model, result).items():
        if name in compact_shapes:
            assert compact_shapes[name] == shape, (name, compact_shapes[name], "expected", shape)
    # The oracle has teeth only if zeroing the removed channels changes the function. It
    # legitimately may not (a removed squeeze-excite channel whose ReLU input is negative on
    # this example is dead anyway): such examples are discarded, not failed.
    original = _run(model, example)
    assume(relative_error(original, _run(masked, example)) > 1e-6)


@st.composite
def norm_archs(draw, max_blocks: int = 3):
    """Architectures with at least one LayerNorm'd / RMSNorm'd residual block."""
    arch = draw(archs(max_blocks))
    at = draw(st.integers(0, len(arch.blocks)))
    norm = NormResidual(draw(widths), draw(st.sampled_from(["layer", "rms", "functional"])), draw(activations))
    return Arch(arch.stem, arch.blocks[:at] + (norm,) + arch.blocks[at:], arch.head, arch.flat_side, arch.classes,
                arch.batch)


@settings(max_examples=30, **SETTINGS)
@given(arch=norm_archs(), ratio=ratios, importance=importances, seed=st.integers(0, 2**16))
@example(arch=COVERAGE[4], ratio=0.5, importance="l1", seed=0)
def test_compact_equals_masked_with_normalised_widths(arch: Arch, ratio: float, importance: str, seed: int) -> None:
    """Under normalised_widths the norms' widths prune and the masked model computes masked
    norms: the compact model still equals it."""
    with _one_thread():
        _check_compact_equals_masked(arch, ratio, importance, seed, normalised_widths=True)


@settings(max_examples=20, **SETTINGS)
@given(arch=archs(max_blocks=3), ratio=ratios, seed=st.integers(0, 2**16))
def test_compact_trains(arch: Arch, ratio: float, seed: int) -> None:
    with _one_thread():
        _check_compact_trains(arch, ratio, seed)


def _check_compact_trains(arch: Arch, ratio: float, seed: int) -> None:
    model = build(arch, seed)
    result = spruce.prune(model, (_inputs(arch, seed),), ratio=ratio, seed=seed)
    compact = result.model.train()
    x = _inputs(arch, seed + 1, batch=2)
    out = compact(x)
    assert out.shape == (2, arch.classes)
    out.square().mean().backward()
    assert all(p.grad is not None for p in compact.parameters() if p.requires_grad)
    # training mode: BatchNorm uses batch statistics in both, so they still agree
    masked = result.masked.train()
    err = relative_error(masked(x).detach(), out.detach())
    assert err < TOLERANCE, f"train-mode compact differs from masked by {err:.2e}"
