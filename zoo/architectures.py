"""The public acceptance set of capture: architectures users bring, built with random
weights and no download, each with its example input and (for detectors) training
targets. The tests (``tests/api/test_prune_models.py``) and the coverage bench
(``bench/coverage.py``) use the same builders.

ultralytics and torchvision are imported only by the builders that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EXAMPLES", "Example", "GroupedLiteralConv", "ShapeBranching", "build"]


@dataclass
class Example:
    """A model at an example input. ``targets(n)`` builds training targets for a batch of
    ``n`` (detectors: a train-mode forward with targets returns the loss dict); ``inputs(n)``
    the inputs at batch size ``n`` (fresh random data)."""

    name: str
    model: nn.Module
    example: object
    inputs: Callable[[int], object]
    targets: Callable[[int], object] | None = None
    notes: list[str] = field(default_factory=list)


class _ShapeBranchingBlock(nn.Module):
    """A timm-style block whose code branches on ``x.shape`` (odd sizes padded, a residual
    only when the widths agree), on its dtype and device, and iterates over chunks."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 2 * c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:  # odd width: pad to even, as timm's "same" padding helpers do
            x = F.pad(x, (0, 1, 0, 1))
        if x.dtype == torch.float16 and x.device.type == "cpu":  # a dtype and device branch
            x = x.float()
        gate, value = F.relu(self.bn1(self.conv1(x))).chunk(2, dim=1)  # unpacking chunks: iteration
        y = self.bn2(self.conv2(value * torch.sigmoid(gate)))
        for size in y.shape[2:]:  # iteration over a shape
            if size < 2:
                return y
        if x.shape[1] == y.shape[1]:  # a residual only where the widths agree
            y = y + x
        return F.relu(y)


class ShapeBranching(nn.Module):
    """Stem, two shape-branching blocks and a classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.block1 = _ShapeBranchingBlock(16, 16)
        self.block2 = _ShapeBranchingBlock(16, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


class _BlurPool(nn.Module):
    """TResNet's anti-aliased downsampling: a fixed depthwise filter called through
    ``F.conv2d(..., groups=self.channels)``, a literal channel count in the call."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        taps = torch.tensor([1.0, 2.0, 1.0])
        filt = taps[:, None] * taps[None, :]
        self.register_buffer("filt", (filt / filt.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.channels)


class GroupedLiteralConv(nn.Module):
    """Convs around a BlurPool and a GroupNorm (whole groups prune, num_groups rewritten)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, 32)
        self.blur = _BlurPool(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blur(F.relu(self.norm1(self.conv1(x))))
        x = F.relu(self.norm2(self.conv2(x)))
        return self.head(F.group_norm(x, 4).mean((2, 3)))


def _images(n: int, size: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=gen) for _ in range(n)]


def _detection_targets(n: int, size: int) -> list[dict[str, torch.Tensor]]:
    scale = size / 128.0
    boxes = torch.tensor([[10.0, 20.0, 60.0, 80.0], [30.0, 30.0, 90.0, 100.0]]) * scale
    return [{"boxes": boxes.clone(), "labels": torch.tensor([1, 5])} for _ in range(n)]


def _tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _yolov8n() -> Example:
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", verbose=False)
    return Example("yolov8n", model, _tensor((1, 3, 64, 64), 0), lambda n: _tensor((n, 3, 64, 64), n))


def _torchvision_detector(name: str, size: int, **options) -> Callable[[], Example]:
    def make() -> Example:
        from torchvision.models import detection

        model = getattr(detection, name)(weights=None, weights_backbone=None, **options)
        return Example(name, model, (_images(1, size, 0),), lambda n: (_images(n, size, n),),
                       lambda n: _detection_targets(n, size))

    return make


def _raft_small() -> Example:
    from torchvision.models.optical_flow import raft_small

    model = raft_small(weights=None)

    def inputs(n: int) -> dict:
        return {"image1": _tensor((n, 3, 128, 128), n), "image2": _tensor((n, 3, 128, 128), n + 100),
                "num_flow_updates": 2}

    return Example("raft_small", model, inputs(1), inputs,
                   notes=["num_flow_updates=2 is a Python int: captured as a constant"])


def _shape_branching() -> Example:
    torch.manual_seed(0)
    return Example("shape_branching_block", ShapeBranching(), _tensor((1, 3, 33, 33), 0),
                   lambda n: _tensor((n, 3, 33, 33), n))


def _grouped_literal_conv() -> Example:
    torch.manual_seed(0)
    return Example("grouped_literal_conv", GroupedLiteralConv(), _tensor((1, 3, 16, 16), 0),
                   lambda n: _tensor((n, 3, 16, 16), n))


# name -> builder; detectors at small input sizes (their transforms resize to min_size)
EXAMPLES: dict[str, Callable[[], Example]] = {
    "yolov8n": _yolov8n,
    "fasterrcnn_mobilenet_v3_large_fpn": _torchvision_detector(
        "fasterrcnn_mobilenet_v3_large_fpn", 128, min_size=128, max_size=128),
    "retinanet_resnet50_fpn": _torchvision_detector("retinanet_resnet50_fpn", 128, min_size=128, max_size=128),
    "ssdlite320_mobilenet_v3_large": _torchvision_detector("ssdlite320_mobilenet_v3_large", 160),
    "raft_small": _raft_small,
    "shape_branching_block": _shape_branching,
    "grouped_literal_conv": _grouped_literal_conv,
}


def build(name: str, seed: int = 0) -> Example:
    """Build example ``name`` with non-degenerate random weights (eval mode)."""
    from ..api.checks import make_nondegenerate

    torch.manual_seed(seed)
    example = EXAMPLES[name]()
    make_nondegenerate(example.model, example.example, seed=seed)
    return example
