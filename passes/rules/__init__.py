"""Per-operator knowledge: how channels flow through each op, one module per op family.

Each family module (:mod:`.convolution`, :mod:`.linear`, :mod:`.attention`,
:mod:`.normalisation`, :mod:`.recurrent`, :mod:`.elementwise`, :mod:`.reductions`, :mod:`.reshape`,
:mod:`.indexing`, :mod:`.experts`, :mod:`.shuffle`, :mod:`.spatial`, :mod:`.sizes`) holds its ops' torch-level
(fx) rules, their ATen rules (``torch.export`` graphs), the rewrites of their size arguments
and their meta-tensor shapes, registered in the tables of :mod:`.registry` (one table per
kind). :mod:`.dispatch` runs the rules over a graph, :mod:`.meta` runs a graph on meta
tensors with the shapes. An operator without a rule pins every dimension it touches (its
channels become unprunable, with a reason naming the node): never silently wrong.

Importing this package registers every family's rules.
"""

from __future__ import annotations

from . import (  # noqa: F401  (each family registers its rules on import)
    attention,
    convolution,
    elementwise,
    experts,
    indexing,
    linear,
    normalisation,
    recurrent,
    reductions,
    reshape,
    shuffle,
    sizes,
    spatial,
)
from .dispatch import apply_rules

__all__ = ["apply_rules"]
