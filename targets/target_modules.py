"""Imports every target module so that each registers itself in ``TARGETS``.

Adding a target is adding its module here (one line) and its file."""

from spruce.targets import (
    onnxruntime,  # noqa: F401
    pytorch,  # noqa: F401
)
