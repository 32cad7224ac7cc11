"""Imports every target module so that each registers itself in ``TARGETS``.

Adding a target is adding its module here (one line) and its file. No module may
import an optional runtime (tensorrt) at import time."""

from spruce.targets import (
    onnxruntime,  # noqa: F401
    pytorch,  # noqa: F401
    tensorrt,  # noqa: F401
)
