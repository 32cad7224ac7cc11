"""Torch-Pruning (1.6.1) as the anchor that spruce's speed is compared with.

For one model: time to build ``tp.DependencyGraph`` (its channel analysis) and
time to prune with ``tp.pruner.BasePruner`` (which rebuilds the graph itself, then
removes channels) at a uniform channel ratio with L1 ``MagnitudeImportance``,
leaving the final classifier alone (as spruce does). Torch-Pruning has no masked
model, so no equivalence is checked; the pruned model must run and keep the output
shape.

Torch-Pruning is only a bench dependency (``pip install -e .[bench]``).

Run directly: ``python bench/anchor_tp.py --models resnet18,mobilenet_v2``.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass
from typing import Any

import benchlib


@dataclass
class TPRun:
    """One Torch-Pruning analysis + prune of a model.

    ``analysis_s``: building the DependencyGraph; ``prune_s``: constructing the
    pruner (graph build included) plus ``step()``. ``runs`` says the pruned model
    ran in eval mode and gave the original output shape.
    """

    analysis_s: float
    prune_s: float
    params_before: int
    params_after: int
    runs: bool
    error: str | None = None


def build_graph(model: Any, example_inputs: Any) -> Any:
    """Torch-Pruning's dependency graph of ``model`` (its analysis step)."""
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


def prune_in_place(model: Any, example_inputs: Any, ratio: float) -> Any:
    """Prune ``model`` in place with Torch-Pruning at channel ``ratio``; returns the pruner.

    Uniform (local) pruning, L1 magnitude importance, classifier layers ignored.
    """
    import torch_pruning as tp

    pruner = tp.pruner.BasePruner(
        model,
        example_inputs,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=benchlib.classifier_layers(model),
    )
    pruner.step()
    return pruner


def run_tp(model: Any, example_inputs: Any, ratio: float = 0.5) -> TPRun:
    """Analyse and prune a copy of ``model`` with Torch-Pruning; ``model`` is unchanged."""
    import torch

    with torch.no_grad():
        expected_shape = tuple(benchlib.output_tensors(model(example_inputs))[0].shape)
    params_before = benchlib.count_params(model)
    _, analysis_s = benchlib.timed(lambda: build_graph(model, example_inputs))
    pruned = copy.deepcopy(model)
    _, prune_s = benchlib.timed(lambda: prune_in_place(pruned, example_inputs, ratio))
    error = benchlib.model_run_error(pruned, (example_inputs,), expected_shape)
    return TPRun(analysis_s, prune_s, params_before, benchlib.count_params(pruned),
                 error is None, error)


def main(argv: list[str] | None = None) -> None:
    """Run Torch-Pruning on each named model in this process and print one JSON per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        model, shape = benchlib.build_model(name)
        example = benchlib.random_input(shape, seed=0)
        try:
            record: dict[str, Any] = asdict(run_tp(model, example, args.ratio))
        except Exception as exc:  # noqa: BLE001 - report and go on to the next model
            record = {"error": benchlib.short_error(exc)}
        record["peak_rss_mb"] = round(benchlib.peak_rss_mb(), 1)
        print(json.dumps({"model": name, **record}))


if __name__ == "__main__":
    main()
