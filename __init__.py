"""spruce: a model-compression compiler for PyTorch.

The public API is small on purpose:

- :func:`trace` turns a model into a ``torch.fx.GraphModule`` with shape/dtype meta.
- :func:`channel_groups` finds every set of coupled channels.
- :func:`prune` removes channels one-shot and returns a compact model equal to its masked model.
- :func:`sparsify` inserts mask nodes and drives prune-grow sparse training from the user's loop.
- :func:`profile` times every prunable layer on a target into a :class:`LatencyTable` that predicts
  the latency of any channel configuration.
- :func:`bench` times a built artifact (median/p90/p99, images/s), optionally against its dense twin.
- :func:`compile` runs the whole pipeline (train sparse, export, build for a target, time vs dense).
- :func:`save` / :func:`load` checkpoint a sparse model atomically, validated before anything is loaded.
"""

from spruce.compiler.api import channel_groups, profile, sparsify
from spruce.compiler.checkpoint import CheckpointError, load, save
from spruce.compiler.pipeline import CompileReport, compile
from spruce.compiler.prune import PruneResult, prune
from spruce.compiler.recipes import Recipe
from spruce.compiler.trace import TraceError, trace
from spruce.passes.analysis import ChannelGroup, Member
from spruce.passes.export import CompactModelError
from spruce.passes.sparsity.model import SparseModel
from spruce.runtime.bench import BenchReport, bench
from spruce.runtime.profile import LatencyTable, LayerEntry

__all__ = [
    "BenchReport",
    "CompileReport",
    "Recipe",
    "bench",
    "compile",
    "ChannelGroup",
    "LatencyTable",
    "LayerEntry",
    "CheckpointError",
    "CompactModelError",
    "Member",
    "PruneResult",
    "SparseModel",
    "TraceError",
    "channel_groups",
    "load",
    "profile",
    "prune",
    "save",
    "sparsify",
    "trace",
]
__version__ = "0.1.0"
