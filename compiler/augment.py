"""Augmentation of ``images:DIR`` recovery images: what a small unlabeled folder needs to
teach a pruned model the dense one's outputs beyond the few pictures it holds.

The field's recipe for detectors (scale jitter, random crops, photometric jitter, pasting
one picture into another): every recovery sample is drawn afresh from one of the folder's
images, each epoch, by :class:`AugmentedImages`:

1. ``paste`` (probability): a random window of another recovery image (one whose file name
   matches ``paste_from``, e.g. ``page_*``: the text-bearing ones), rescaled by a random
   factor in ``scale``, is pasted at a random place; so content the folder shows on one
   background is also seen on others;
2. ``text`` (probability): 1-6 random words (letters and digits) are drawn with Pillow's
   built-in scalable font (``ImageFont.load_default(size)``, sizes 10-40 px) in a dark or
   light shade at random places: more text for a text detector than the folder holds;
3. the image is rescaled by a random factor in ``scale`` (log-uniform; 1 = fitted into the
   sample's height x width keeping its aspect ratio) and a random window of the sample's
   size is cut from it (the whole image where it is smaller);
4. photometric jitter of strength ``photometric``: brightness and contrast by up to that
   fraction, gamma by up to that power of 2; grey with probability ``grey``; a Gaussian blur
   (radius 0.5-1.5 px) with probability ``blur``;
5. ``shade`` (probability): uneven lighting at low contrast, as a photographed page shows it:
   contrast lowered to 0.4-0.9 of itself about the mean, then the image multiplied by a
   linear gradient in a random direction, from 1 on one side to 0.35-0.85 on the other;
6. ``invert`` (probability): the colours negated (255 - value), so dark-on-light content
   (a page's text) is also seen light-on-dark (captions, signs, screens);
7. the user's ``prepare`` (or the default cover-resize) turns it into the input tensor.

``size`` (H, W): the recovery samples' height and width when smaller inputs than the
example's are wanted (a fully convolutional model trains several times faster on 128 x 192
windows than on 256 x 384 images; default: the example's). ``copies`` samples are drawn per
recovery image per epoch. The random stream is seeded (``seed`` of the recipe).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Annotated, ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator

from ..passes.config import Config, ConfigError

__all__ = ["Augment", "AugmentError", "AugmentedImages"]

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
Probability = Annotated[float, Field(ge=0, le=1)]


class AugmentError(ConfigError):
    """The ``augment`` options are malformed."""


class Augment(Config):
    """Options of :class:`AugmentedImages` (see the module docstring)."""

    owner: ClassVar[str] = "augment"
    error_type: ClassVar[type[ConfigError]] = AugmentError

    copies: int = Field(4, ge=1)
    scale: Annotated[tuple[float, float], Field(strict=False)] = (0.5, 2.0)
    photometric: float = Field(0.3, ge=0, le=1)
    grey: Probability = 0.2
    blur: Probability = 0.2
    paste: Probability = 0.0
    paste_from: str = "*"
    text: Probability = 0.0
    shade: Probability = 0.0
    invert: Probability = 0.0
    size: Annotated[tuple[int, int] | None, Field(strict=False)] = None

    @model_validator(mode="after")
    def _check(self) -> Augment:
        low, high = self.scale
        if not 0 < low <= high:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        if self.size is not None and min(self.size) < 1:
            raise ValueError(f"size must be [H, W] of positive integers, got {list(self.size)}")
        return self


class AugmentedImages(torch.utils.data.Dataset):
    """``copies`` x len(``images``) samples, each a fresh augmentation of one image
    (H x W x 3 uint8) turned into a tensor by ``prepare(image, size)``. ``names`` (file names)
    select the paste sources by ``augment.paste_from``; raises ``ValueError`` when
    ``paste`` > 0 and no name matches."""

    def __init__(self, images: Sequence[np.ndarray], names: Sequence[str], augment: Augment,
                 prepare: Callable[[np.ndarray, tuple[int, int]], torch.Tensor], size: tuple[int, int], seed: int = 0):
        self.images, self.augment, self.prepare, self.size = list(images), augment, prepare, tuple(size)
        self.sources = [image for image, name in zip(images, names) if fnmatch.fnmatchcase(name, augment.paste_from)]
        if augment.paste > 0 and not self.sources:
            raise ValueError(f"augment.paste_from {augment.paste_from!r} matches none of the recovery images "
                             f"({', '.join(list(names)[:5])}{', ...' if len(names) > 5 else ''})")
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's random stream from ``seed`` (the draws a fresh dataset
        seeded ``seed`` makes)."""
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.augment.copies * len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.prepare(self.sample(index), self.size)

    def sample(self, index: int) -> np.ndarray:
        """The augmented image (H x W x 3 uint8, at most ``size``) for ``index``."""
        from PIL import Image

        rng, options = self.rng, self.augment
        picture = Image.fromarray(self.images[index % len(self.images)])
        if rng.uniform() < options.paste:
            picture = self._paste(picture)
        if rng.uniform() < options.text:
            picture = self._words(picture)
        picture = self._scale_crop(picture)
        array = self._photometric(picture)
        # new options draw only when asked, so a recipe without them keeps its random stream
        if options.shade and rng.uniform() < options.shade:
            array = self._shade(array)
        if options.invert and rng.uniform() < options.invert:
            array = 255 - array
        return array

    def _factor(self) -> float:
        low, high = self.augment.scale
        return math.exp(self.rng.uniform(math.log(low), math.log(high)))

    def _paste(self, picture):
        from PIL import Image

        rng = self.rng
        source = Image.fromarray(self.sources[int(rng.integers(len(self.sources)))])
        width = int(rng.integers(max(1, source.width // 3), source.width + 1))
        height = int(rng.integers(max(1, source.height // 3), source.height + 1))
        left, top = int(rng.integers(0, source.width - width + 1)), int(rng.integers(0, source.height - height + 1))
        piece = source.crop((left, top, left + width, top + height))
        factor = min(self._factor(), picture.width / piece.width, picture.height / piece.height)  # it fits
        piece = piece.resize((max(1, round(piece.width * factor)), max(1, round(piece.height * factor))),
                             Image.BILINEAR)
        picture = picture.copy()
        picture.paste(piece, (int(rng.integers(0, max(1, picture.width - piece.width + 1))),
                              int(rng.integers(0, max(1, picture.height - piece.height + 1)))))
        return picture

    def _words(self, picture):
        from PIL import ImageDraw, ImageFont

        rng = self.rng
        picture = picture.copy()
        draw = ImageDraw.Draw(picture)
        grey = np.asarray(picture.convert("L"), dtype=np.float32)
        for _ in range(int(rng.integers(1, 7))):
            word = "".join(_LETTERS[i] for i in rng.integers(0, len(_LETTERS), int(rng.integers(2, 10))))
            font = ImageFont.load_default(size=int(rng.integers(10, 41)))
            x, y = int(rng.integers(0, max(1, picture.width - 20))), int(rng.integers(0, max(1, picture.height - 10)))
            under = grey[y:y + 20, x:x + 40]
            bright = (under.mean() if under.size else 128.0) > 110
            shade = int(rng.integers(0, 60)) if bright else int(rng.integers(200, 256))
            draw.text((x, y), word, fill=(shade, shade, shade), font=font)
        return picture

    def _scale_crop(self, picture):
        from PIL import Image

        rng = self.rng
        height, width = self.size
        factor = min(height / picture.height, width / picture.width) * self._factor()
        picture = picture.resize((max(1, round(picture.width * factor)), max(1, round(picture.height * factor))),
                                 Image.BILINEAR)
        left = int(rng.integers(0, max(0, picture.width - width) + 1))
        top = int(rng.integers(0, max(0, picture.height - height) + 1))
        return picture.crop((left, top, min(picture.width, left + width), min(picture.height, top + height)))

    def _photometric(self, picture) -> np.ndarray:
        from PIL import ImageFilter

        rng, options = self.rng, self.augment
        if rng.uniform() < options.blur:
            picture = picture.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
        array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
        strength = options.photometric
        if strength > 0:
            array = array ** (2.0 ** rng.uniform(-strength, strength))
            mean = array.mean()
            contrast, brightness = rng.uniform(-strength, strength, size=2)
            array = (array - mean) * (1 + contrast) + mean + brightness / 2
        if rng.uniform() < options.grey:
            array = np.repeat(array.mean(axis=2, keepdims=True), 3, axis=2)
        return np.ascontiguousarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))

    def _shade(self, array: np.ndarray) -> np.ndarray:
        rng = self.rng
        image = array.astype(np.float32)
        mean = image.mean()
        image = (image - mean) * rng.uniform(0.4, 0.9) + mean
        height, width = image.shape[:2]
        angle = rng.uniform(0, 2 * math.pi)
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        along = rows * math.sin(angle) + cols * math.cos(angle)
        span = max(float(along.max() - along.min()), 1.0)
        darkest = rng.uniform(0.35, 0.85)
        light = 1.0 - (1.0 - darkest) * (along - along.min()) / span
        return np.ascontiguousarray(np.clip(image * light[:, :, None] + 0.5, 0, 255).astype(np.uint8))
