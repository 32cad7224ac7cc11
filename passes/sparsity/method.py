"""What a sparse-training method is: a config object that selects its handler.

A method is its :class:`MethodConfig` subclass (``IEEConfig(h=150)``): the config's
fields are the method's options, validated once when the config is built; its class
variables declare what it supports (``structures``, ``budgeted``, the schedule inputs it
``needs``) and :meth:`MethodConfig.for_run` scales its step defaults to a run length.
The handler (a :class:`Method` subclass, registered with :func:`register_method`) owns the
method's state during training: the SparseModel calls ``initialize`` once with a frozen
:class:`~spruce.passes.sparsity.context.MethodContext`, ``attach`` with the optimizer,
``on_step`` / ``wants_dense_grad`` / ``is_update`` / ``update`` around every optimizer
step, and ``state_dict`` / ``load_state_dict`` for checkpoints.

Adding a method is one module in ``spruce/passes/sparsity/methods/`` (found and imported
by that package) holding the config and the handler with its ``@register_method(Config)``
line; a method defined elsewhere registers when its module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import Field

from ..config import Config
from .context import MethodContext

__all__ = ["METHODS", "Method", "MethodConfig", "RunLength", "register_method"]

M = TypeVar("M", bound="type[Method]")

# name -> handler class; filled by @register_method (spruce.passes.sparsity.registry looks names up)
METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class RunLength:
    """What a run tells a method config to scale its defaults by (see :meth:`MethodConfig.for_run`)."""

    total_steps: int
    steps_per_epoch: int | None = None
    structure: str = "unstructured"
    # the run exists for the method's mask updates (``spruce compile``'s recovery with a method
    # re-selecting channels): defaults that would leave no update in a run this short are raised
    updates_required: bool = False
    # kept channel counts default to widths the target's kernels like (multiples of 8): what
    # ``spruce compile`` does, which builds for a target; ``sparsify`` from the user's own loop
    # scales only the step counts (False), so round_to stays 1 unless the user sets it
    kernel_widths: bool = True


class MethodConfig(Config):
    """Options of one method; its type selects the method's handler.

    Capabilities (class variables): ``structures`` it supports (``unstructured``,
    ``n:m``, ``channel``), whether it is ``budgeted`` (takes ``budget=`` with
    ``structure="channel"``), and the schedule inputs it ``needs`` (``total_steps``;
    ``steps_per_epoch`` for OptG, a config field)."""

    name: ClassVar[str] = ""
    handler: ClassVar[type[Method] | None] = None  # set by @register_method
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "n:m")
    budgeted: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ("total_steps",)

    seed: int = Field(0, ge=0)

    @classmethod
    def label(cls) -> str:
        return cls.name or cls.__name__

    @classmethod
    def scheduled(cls) -> bool:
        """Does the method need ``total_steps``?"""
        return "total_steps" in cls.needs

    def for_run(self, run: RunLength) -> MethodConfig:
        """This config with the defaults a run of ``run.total_steps`` steps should use for
        every option the user did not set; the paper defaults assume far longer runs.
        ``spruce compile`` and ``sparsify(..., total_steps=)`` both call it. Options set
        explicitly are kept: "set" is pydantic's ``model_fields_set``, the fields given to the
        constructor (a config object's keyword arguments, a recipe mapping's keys, a method
        name's keyword options); :meth:`Config.replace` keeps them set, so calling this
        twice gives the same config."""
        return self

    def check_fits(self, run: RunLength) -> None:
        """Raise ``ValueError`` naming the option when this config (already scaled by
        :meth:`for_run`) cannot do its work in a run of ``run.total_steps`` steps; called by
        ``sparsify`` (and so by ``spruce compile``) before any graph work. Default: fits."""

    def with_defaults(self, defaults: dict[str, Any]) -> MethodConfig:
        """This config with ``defaults`` for the options that were not set explicitly."""
        unset = {k: v for k, v in defaults.items() if k not in self.model_fields_set}
        return self.replace(**unset) if unset else self

    def check_run(self, total_steps: int | None) -> None:
        """Raise ``ValueError`` when a schedule input the method needs is missing."""
        if self.scheduled() and (total_steps is None or isinstance(total_steps, bool)
                                 or not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"method {self.name!r} is scheduled: pass total_steps (a positive integer), "
                             f"got {total_steps!r}")

    def to_record(self) -> dict[str, Any]:
        """``{"name": ..., option: value, ...}``: what recipes and checkpoints store."""
        return {"name": self.name, **self.model_dump()}

    def build(self) -> Method:
        """A fresh handler for this config."""
        if self.handler is None:
            raise TypeError(f"{type(self).__name__} has no registered method (decorate its handler with "
                            f"@register_method({type(self).__name__}))")
        return self.handler(self)


def register_method(config: type[MethodConfig]):
    """Class decorator: ``handler`` runs the method whose options are ``config`` (which names it)."""
    if not config.name:
        raise ValueError(f"{config.__name__} has no name: set `name: ClassVar[str] = ...`")

    def register(handler: M) -> M:
        handler.Config = config
        handler.name = config.name
        config.handler = handler
        METHODS[config.name] = handler
        return handler

    return register


class Method:
    """A method's handler: its state during training. The base keeps a random mask fixed."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    keeps_pruned_weights: ClassVar[bool] = False  # dense weights behind an STE (not zeroed)
    resets_optimizer_state: ClassVar[bool] = True  # zero optimizer state of weights whose mask flipped

    def __init__(self, config: MethodConfig):
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.ctx: MethodContext | None = None

    def initialize(self, ctx: MethodContext) -> None:
        """Receive the frozen context (kept as ``self.ctx``) and set the initial masks."""
        self.ctx = ctx
        self.set_initial_masks()

    def set_initial_masks(self) -> None:
        """The masks training starts from (default: random at each layer's density)."""
        for layer in self.ctx.layers:
            self.ctx.set_mask(layer, self.ctx.random_mask(layer, layer.density, self.generator))

    def attach(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The optimizer the user attached to the SparseModel (for methods that read its state)."""

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """The run's epoch length, when the user gives it after ``sparsify`` (``sm.attach``);
        methods without epochs ignore it."""

    def on_epoch_end(self, step: int) -> bool:
        """The user's loop finished an epoch after optimizer step ``step`` (``sm.end_epoch()``);
        True when a mask update is due now. Methods without epochs ignore it."""
        return False

    def is_update(self, step: int) -> bool:
        """Does the method update masks after optimizer step ``step`` (1-based)?"""
        return False

    def wants_dense_grad(self, step: int) -> bool:
        return False

    def update(self, step: int) -> bool:
        """Change masks after optimizer step ``step``; True when they changed."""
        return False

    def completes_update(self, step: int) -> bool:
        """Does the update at ``step`` finish a prune-grow update (recorded in metrics)?"""
        return True

    def on_step(self, step: int) -> None:
        """Called after every optimizer step, before any mask update."""

    def activity(self) -> dict[str, int]:
        """Counts of what the method did so far, for reports (a channel method: its knapsack
        ``selections`` after the initial one and its ``importance_fallbacks``, selections
        scored without a gradient signal); empty by default."""
        return {}

    def state_dict(self) -> dict:
        return {"config": self.config.model_dump(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
