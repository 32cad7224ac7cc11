"""Shared test helpers: non-trivial weights and the equivalence oracle."""

from __future__ import annotations

import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm statistic non-trivial values, so zero-initialised
    heads, unit BatchNorms or 1e-6 layer scales cannot hide a wrong channel removal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or float(p.std()) == 0.0:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model


def first_output(value):
    """The main tensor of a model output (logits of GoogLeNet/Inception named tuples)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return next(iter(value.values()))
    return value[0]


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |a - b| relative to the output scale (at least 1)."""
    reference, other = reference.detach(), other.detach()
    scale = max(1.0, float(reference.abs().max()))
    return float((reference - other).abs().max()) / scale


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's real 8x8 digits as (N, 1, 8, 8) floats in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(data.target)


def small_digits_cnn(seed: int = 0) -> nn.Module:
    """Two 3x3 convs and a linear classifier for 8x8 inputs (seeded)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 64, 10))


class SGDLoop:
    """A real SGD training loop around a SparseModel ``sm``: the optimizer given, or SGD (lr
    0.05, momentum 0.9, ``weight_decay``). Each step draws a batch of ``shape`` with labels in
    ``[0, classes)`` from ``gen`` or a generator seeded with ``seed`` (two loops with one seed
    see the same batches); ``step`` = backward, optimizer step, then ``sm.step()``."""

    def __init__(self, sm, shape: tuple[int, ...], classes: int, seed: int = 0, opt=None, train: bool = False,
                 weight_decay: float = 1e-3, gen: torch.Generator | None = None):
        self.sm, self.shape, self.classes = sm, shape, classes
        self.gen = gen if gen is not None else torch.Generator().manual_seed(seed)
        self.opt = opt if opt is not None else torch.optim.SGD(sm.parameters(), lr=0.05, momentum=0.9,
                                                               weight_decay=weight_decay)
        sm.attach(self.opt)
        if train:
            sm.train()

    def backward(self) -> None:
        x = torch.randn(*self.shape, generator=self.gen)
        y = torch.randint(0, self.classes, (self.shape[0],), generator=self.gen)
        loss = nn.functional.cross_entropy(self.sm(x), y)
        self.opt.zero_grad()
        loss.backward()

    def step(self) -> None:
        self.backward()
        self.opt.step()
        self.sm.step()
