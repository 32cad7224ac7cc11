"""The one registry of ``spruce`` subcommands: each is a module of this package exposing
``SUBCOMMAND`` (a :class:`~spruce.cli.common.Subcommand`), registered here by name.

Adding a subcommand is adding its module and one entry below. A subcommand module imports
nothing that imports torch at module level (``spruce --help`` lists every subcommand without
paying for torch); its ``check`` runs before torch is imported, its ``run`` imports what it uses.
"""

from __future__ import annotations

import importlib

from .common import Subcommand

__all__ = ["SUBCOMMANDS", "subcommand"]

# name -> module (relative to this package), in the order ``spruce --help`` lists them
SUBCOMMANDS: dict[str, str] = {
    "compile": ".compile",
    "analyze": ".analyze",
    "prune": ".prune",
    "profile": ".profile",
    "bench": ".bench",
}


def subcommand(name: str) -> Subcommand:
    """The subcommand registered under ``name`` (its module imported on first use); ``KeyError``
    for a name not registered."""
    return importlib.import_module(SUBCOMMANDS[name], __package__).SUBCOMMAND
