"""spruce: a model-compression compiler for PyTorch.

The public API is small on purpose:

- :func:`trace` turns a model into a ``torch.fx.GraphModule`` with shape/dtype meta.
- :func:`channel_groups` finds every set of coupled channels.
- :func:`prune` removes channels one-shot and returns a compact model equal to its masked model.
- :func:`sparsify` inserts mask nodes and drives prune-grow sparse training from the user's loop.
"""

from spruce.compiler.prune import PruneResult, prune
from spruce.compiler.trace import TraceError, trace
from spruce.passes.analysis import ChannelGroup, Member, channel_groups
from spruce.passes.sparsity.model import SparseModel, sparsify

__all__ = [
    "ChannelGroup",
    "Member",
    "PruneResult",
    "SparseModel",
    "TraceError",
    "channel_groups",
    "prune",
    "sparsify",
    "trace",
]
__version__ = "0.1.0"
