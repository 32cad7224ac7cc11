"""The options of profiling and benchmarking, validated config objects that import no torch
(``spruce profile --help`` and ``spruce bench --help`` read their defaults from here without
paying for torch): :class:`ProfileConfig` (of :func:`spruce.runtime.profile.profile`),
:class:`BenchConfig` (of :func:`spruce.runtime.bench.bench`) and :class:`ProfileError`."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from ..passes.config import Config, ConfigError

__all__ = ["OUTLIER_RETRIES", "POINTS_PER_BATCH", "BenchConfig", "ProfileConfig", "ProfileError"]

# Points of one layer signature timed interleaved at once (bounds the sessions held in memory).
POINTS_PER_BATCH = 16
# How often a measured point slower than one with more channels is timed again (load bursts).
OUTLIER_RETRIES = 2


class ProfileError(ConfigError):
    """A model, option or table file that profiling cannot use."""


class ProfileConfig(Config):
    """Options of :func:`~spruce.runtime.profile.profile` and ``spruce profile`` (the one place
    they are validated and defaulted)."""

    owner: ClassVar[str] = "profile"
    error_type: ClassVar[type[ConfigError]] = ProfileError

    step: int = Field(8, ge=1)
    coarse: int = Field(6, ge=2)
    edges: bool = True
    warmup: int = Field(3, ge=0)
    repeats: int = Field(12, ge=1)
    calibration_random: int = Field(6, ge=0)
    retries: int = Field(OUTLIER_RETRIES, ge=0)
    model_warmup: int = Field(2, ge=0)
    model_repeats: int = Field(30, ge=1)
    seed: int = Field(0, ge=0)
    batch_points: int = Field(POINTS_PER_BATCH, ge=1)


class BenchConfig(Config):
    """How to time: batch sizes, untimed warm-up calls and timed calls per batch size (the
    defaults of :func:`~spruce.runtime.bench.bench` and ``spruce bench``)."""

    owner: ClassVar[str] = "bench"

    batch_sizes: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1, strict=False)] = (1, 8)
    warmup: int = Field(10, ge=0)
    iters: int = Field(50, ge=1)
