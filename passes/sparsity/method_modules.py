"""Imports every method module so that each registers itself in ``METHODS``.

Adding a method is adding its module here (one line) and its file."""

from spruce.passes.sparsity import (
    dst_ee,  # noqa: F401
    feather,  # noqa: F401
    halp,  # noqa: F401
    methods,  # noqa: F401
    optg,  # noqa: F401
)
