"""The options of :func:`spruce.prune` and ``spruce prune``, a validated config object that
imports no torch (``spruce prune --help`` reads its defaults from here without paying for
torch; the registries it validates against are imported when a value is checked)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from ..passes.config import Config, check_choice

__all__ = ["PruneConfig"]


class PruneConfig(Config):
    """The options of :func:`~spruce.api.prune.prune` and ``spruce prune``: the fraction of each
    group's channels removed, the channel criterion (:data:`~spruce.passes.importance.IMPORTANCE`),
    and the multiple kept counts are rounded up to, what grouped-query attention prunes
    (:data:`~spruce.passes.spaces.GQA_MODES`), and whether the widths LayerNorm / RMSNorm
    normalise over prune (``normalised_widths``; the masked model then computes those norms
    over the kept channels, which changes the function: ``PruneResult.errors``)."""

    owner: ClassVar[str] = "prune"

    ratio: float = Field(0.5, ge=0, lt=1)
    importance: str = "l1"
    round_to: int | None = Field(None, ge=1)
    gqa: str = "query_heads"
    normalised_widths: bool = Field(False, strict=True)

    @field_validator("importance")
    @classmethod
    def _importance(cls, value: str) -> str:
        from ..passes.importance import IMPORTANCE

        return check_choice("importance", value, IMPORTANCE)

    @field_validator("gqa")
    @classmethod
    def _gqa(cls, value: str) -> str:
        from ..passes.spaces import GQA_MODES

        return check_choice("gqa", value, GQA_MODES)
