"""Imports every method module so that each registers itself in ``METHODS``.

Adding a method is adding its module here (one line) and its file."""

from spruce.passes.sparsity import (
    halp,  # noqa: F401
    methods,  # noqa: F401
    optg,  # noqa: F401
)
