"""Method lookup: from a name, a config object or a ``{name: ..., option: ...}`` mapping.

Importing this module imports every built-in method (the ``methods`` package finds its
modules); a method defined in another module is known once that module is imported, and
a package can declare its method modules as entry points of the ``spruce.methods`` group,
which are imported at the first lookup.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from ..config import ConfigError, check_choice, short_list
from . import methods as _builtin  # noqa: F401  (registers every built-in method)
from .defaults import COMPILE_DEFAULT, SPARSIFY_DEFAULT
from .method import METHODS, MethodConfig

__all__ = ["COMPILE_DEFAULT", "METHODS", "SPARSIFY_DEFAULT", "method_config", "method_names", "resolve_method"]



ENTRY_POINT_GROUP = "spruce.methods"
_loaded_entry_points: set[str] = set()


def load_entry_points() -> None:
    """Import the method modules other packages declare (group ``spruce.methods``), once each;
    one that fails to import is skipped with a warning naming it."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.value in _loaded_entry_points:
            continue
        _loaded_entry_points.add(entry.value)
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not break spruce
            warnings.warn(f"spruce: the method entry point {entry.name} = {entry.value} failed to import: "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)


def method_names() -> list[str]:
    """Every registered method's name, sorted."""
    load_entry_points()
    return sorted(METHODS)


def config_class(name: str) -> type[MethodConfig]:
    """The config class of the method called ``name``; ``ConfigError`` listing the valid ones."""
    if isinstance(name, str) and name not in METHODS:
        load_entry_points()
    check_choice("method", name, method_names(), error=ConfigError)
    return METHODS[name].Config


def method_config(name: str, **options: Any) -> MethodConfig:
    """The config of method ``name`` with ``options`` (validated: ``ConfigError`` names the field)."""
    return config_class(name)(**options)


def resolve_method(method: str | MethodConfig | Mapping[str, Any], options: Mapping[str, Any] | None = None,
                   ) -> MethodConfig:
    """A method config from a config object (returned as is), a name (the string shortcut,
    with ``options``) or a mapping ``{"name": ..., option: value, ...}`` (a recipe's form)."""
    options = dict(options or {})
    if isinstance(method, MethodConfig):
        if options:
            raise ConfigError(f"method options {short_list(sorted(map(str, options)))} were given next to a "
                              f"{type(method).__name__}: set them on the config object")
        return method
    if isinstance(method, Mapping):
        record = dict(method)
        name = record.pop("name", None)
        if name is None:
            raise ConfigError(f"a method mapping needs a 'name' (one of {', '.join(method_names())}), "
                              f"got keys {short_list(record) or 'none'}")
        clash = sorted(set(record) & set(options))
        if clash:
            raise ConfigError(f"method option(s) {short_list(clash)} given twice")
        return config_class(name).from_mapping({**record, **options}, owner=name)
    return config_class(method).from_mapping(options, owner=method)
