"""The compile recipe's defaults of the options ``spruce compile --help`` shows, in a module
that imports no torch (so the help answers at once); :class:`spruce.compiler.recipes.Recipe`
takes its field defaults from here."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from ..passes.sparsity.defaults import COMPILE_DEFAULT
from .specs import DEFAULT_TARGET

__all__ = ["RECIPE_DEFAULTS"]

# field -> default (the method by name; a budget as {kind: fraction of dense})
RECIPE_DEFAULTS: MappingProxyType[str, Any] = MappingProxyType({
    "data": "digits",
    "target": DEFAULT_TARGET,
    "method": COMPILE_DEFAULT,
    "structure": "channel",
    "budget": MappingProxyType({"latency": 0.5}),
    "distribution": "uniform",
    "selection_cost": "latency",
    "epochs": 10,
    "recover_lr": 1e-3,
})
