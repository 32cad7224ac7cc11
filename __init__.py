"""spruce: a model-compression compiler for PyTorch.

The public API is small on purpose:

- :func:`trace` turns a model into a ``torch.fx.GraphModule`` with shape/dtype meta.
- :func:`channel_groups` finds every set of coupled channels.
- :func:`prune` removes channels one-shot and returns a compact model equal to its masked model.
- :func:`sparsify` inserts mask nodes and drives prune-grow sparse training from the user's loop;
  the method is a config object (``IEEConfig(h=150)``, ``RigLConfig(delta_t=100)``, ...) or its name.
- :func:`profile` times every prunable layer on a target into a :class:`LatencyTable` that predicts
  the latency of any channel configuration.
- :func:`build` builds a model into a deployable artifact for a target (ONNX Runtime, torch,
  TensorRT) with the manifest that pins its bytes.
- :func:`bench` times a built artifact (median/p90/p99, images/s), optionally against its dense twin.
- :func:`compile` compiles a trained model (measured budget, recovery, build, time and evaluate vs dense).
- :func:`prune_depth` removes whole residual blocks (decoder layers), least important first.
- :func:`to_transformers` writes a pruned transformers model back as the user's own class.
- :func:`save` / :func:`load` checkpoint a sparse model atomically, validated before anything is loaded.

Names are imported on first use (PEP 562), so ``import spruce.passes`` loads the passes
and nothing of the compiler.
"""

from __future__ import annotations

import importlib
from typing import Any

from .moved import install as _install_moved_paths

__version__ = "0.1.0"

_install_moved_paths()  # an old module path (spruce.compiler.hf, ...) raises an ImportError naming its new place

# public name -> the module (relative to this package) that defines it
_EXPORTS = {
    "BenchReport": ".runtime.bench",
    "bench": ".runtime.bench",
    "build": ".api.build",
    "to_transformers": ".api.transformers",
    "LatencyTable": ".runtime.table",
    "LayerEntry": ".runtime.table",
    "ChannelGroup": ".passes.analysis",
    "Member": ".passes.analysis",
    "CompactModelError": ".passes.export",
    "SparseModel": ".passes.sparsity.model",
    "SparseLightningCallback": ".api.lightning",
    "SparseTrainerCallback": ".api.hf_trainer",
    "MethodConfig": ".passes.sparsity.method",
    "StaticConfig": ".passes.sparsity.methods.baselines",
    "GMPConfig": ".passes.sparsity.methods.baselines",
    "RigLConfig": ".passes.sparsity.methods.baselines",
    "SETConfig": ".passes.sparsity.methods.baselines",
    "IEEConfig": ".passes.sparsity.methods.iee",
    "HALPConfig": ".passes.sparsity.methods.halp",
    "DSTEEConfig": ".passes.sparsity.methods.dst_ee",
    "FeatherConfig": ".passes.sparsity.methods.feather",
    "OptGConfig": ".passes.sparsity.methods.optg",
    "channel_groups": ".api.verbs",
    "profile": ".api.verbs",
    "sparsify": ".api.verbs",
    "CheckpointError": ".api.checkpoint",
    "load": ".api.checkpoint",
    "save": ".api.checkpoint",
    "CompileReport": ".compiler.pipeline",
    "FidelityFloorError": ".compiler.pipeline",
    "compile": ".compiler.pipeline",
    "BudgetCheck": ".api.budget",
    "InfeasibleBudget": ".passes.sparsity.knapsack",
    "meet_budget": ".api.budget",
    "PruneResult": ".api.prune",
    "prune": ".api.prune",
    "DepthResult": ".api.depth",
    "block_importance": ".api.depth",
    "choose_blocks": ".api.depth",
    "prune_depth": ".api.depth",
    "remove_blocks": ".api.depth",
    "Recipe": ".compiler.recipes",
    "TraceError": ".capture.trace",
    "trace": ".capture.trace",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
