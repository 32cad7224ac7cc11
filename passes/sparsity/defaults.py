"""The methods set up when none is named, in a module that imports no torch (the command line's
``--help`` shows them before torch is imported); :mod:`spruce.passes.sparsity.registry`
re-exports them."""

from __future__ import annotations

__all__ = ["COMPILE_DEFAULT", "SPARSIFY_DEFAULT"]

# the method ``sparsify`` sets up when none is named, and the one a compile recipe defaults to
# (the embedded example: latency-budgeted structured IEE); the compiler names no method itself
SPARSIFY_DEFAULT = "static"
COMPILE_DEFAULT = "iee"
