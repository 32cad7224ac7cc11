"""The sparse-training methods, one module each; importing this package imports them all.

Each module defines a method's config (a :class:`~spruce.passes.sparsity.method.MethodConfig`)
and its handler, registered with ``@register_method(Config)``. A module dropped into this
folder is found here: there is no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..method import METHODS, Method, MethodConfig, register_method

__all__ = ["METHODS", "Method", "MethodConfig", "register_method"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
