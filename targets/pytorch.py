"""The torch target: eager (or ``torch.compile``) execution on the CPU or CUDA.

Artifact = a ``torch.export`` program (``.pt2``) with a dynamic batch axis,
loadable without the model's Python source.

On CUDA in fp16/bf16, Linear layers whose weights follow the 2:4 pattern run
on semi-structured sparse kernels (``torch.sparse.to_sparse_semi_structured``)
where their shapes allow. A ``.pt2`` file cannot hold semi-structured tensors,
so the artifact stores dense (zero-holding) weights plus the plan (which
layers to convert, which were skipped and why); :meth:`TorchTarget.load`
converts the planned layers.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import model_validator
from torch import nn

from .base import Artifact, ArtifactError, Runner, Target, TargetOptions, register_target
from .files import atomic_path

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register_target
class TorchTarget(Target):
    """torch on ``device`` ("cpu" or "cuda"), in ``dtype``, optionally through ``torch.compile``."""

    name = "torch"
    precisions = ("fp32", "fp16", "bf16")  # the dtype option: float32, float16, bfloat16
    suffix = ".pt2"

    class Options(TargetOptions):
        owner = "torch target"
        device: Literal["cpu", "cuda"] = "cpu"
        dtype: Literal["float32", "float16", "bfloat16"] = "float32"
        compile: bool = False  # torch.compile the loaded program
        semi_structured: bool | None = None  # None: 2:4 kernels wherever they exist (CUDA, half precision)

        @model_validator(mode="after")
        def _kernels_exist(self):
            if self.semi_structured and not (self.device == "cuda" and self.dtype in ("float16", "bfloat16")):
                raise ValueError("semi_structured=True needs device='cuda' and dtype float16 or bfloat16 "
                                 f"(got device={self.device!r}, dtype={self.dtype!r})")
            return self

    def __init__(self, device: str = "cpu", dtype: str = "float32", compile: bool = False,
                 semi_structured: bool | None = None):
        self.Options(device=device, dtype=dtype, compile=compile, semi_structured=semi_structured)
        half = dtype in ("float16", "bfloat16")
        self.device = device
        self.dtype = dtype
        self.compile = bool(compile)
        # Default: use 2:4 kernels wherever they exist (CUDA, half precision).
        self.semi_structured = (device == "cuda" and half) if semi_structured is None else bool(semi_structured)

    def unavailable_reason(self) -> str | None:
        if self.device == "cuda" and not torch.cuda.is_available():
            return "device 'cuda' was asked for but torch finds no CUDA device"
        return None

    def fingerprint(self) -> dict[str, str]:
        record = {**super().fingerprint(), "device": self.device, "dtype": self.dtype, "compile": str(self.compile)}
        if self.device == "cuda" and torch.cuda.is_available():
            record["gpu"] = torch.cuda.get_device_name()
            record["cuda"] = str(torch.version.cuda)
        return record

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def build(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike) -> Artifact:
        """Export ``model`` (dynamic batch axis) to ``path`` atomically; plan 2:4 conversions when enabled."""
        path = Path(path)
        model = model.eval()
        program = _export_dynamic_batch(model, tuple(example_inputs))
        with atomic_path(path, suffix=".tmp.pt2") as temp, open(temp, "wb") as stream:
            torch.export.save(program, stream)  # a full disk then raises OSError
        info: dict[str, Any] = {"device": self.device, "dtype": self.dtype, "compile": self.compile,
                                "semi_structured": self.semi_structured}
        if self.semi_structured:
            plan = semi_structured_plan(model, _DTYPES[self.dtype])
            info["converted"] = [d.name for d in plan if d.convert]
            info["skipped"] = {d.name: d.reason for d in plan if not d.convert}
        artifact = Artifact(path=path, target=self.name,
                            input_shapes=tuple(tuple(t.shape) for t in example_inputs),
                            input_dtype=str(example_inputs[0].dtype).removeprefix("torch."), info=info)
        artifact.write_manifest()
        return artifact

    def load(self, artifact: Artifact) -> Runner:
        if artifact.target != self.name:
            raise ArtifactError(f"artifact {artifact.path} was built for target {artifact.target!r}, not {self.name!r}")
        self.require()
        module = torch.export.load(artifact.path).module()
        if artifact.info.get("semi_structured") and artifact.info.get("converted"):
            if not (self.device == "cuda" and self.dtype in ("float16", "bfloat16")):
                raise ArtifactError(f"artifact {artifact.path} plans 2:4 semi-structured layers, which need "
                                    f"device 'cuda' and float16/bfloat16, not {self.device!r}/{self.dtype!r}")
            module = module.to(device=self.device, dtype=_DTYPES[self.dtype])
            convert_semi_structured(module, artifact.info["converted"])
        return self.runner(module)

    def runner(self, module: nn.Module) -> Runner:
        """A runner of ``module`` on this target's device and dtype, without gradients."""
        if not _has_semi_structured(module):  # converted modules are already placed (and cannot be cast)
            module = module.to(device=self.device, dtype=_DTYPES[self.dtype])
        if self.compile:
            module = torch.compile(module)

        @torch.inference_mode()
        def run(inputs: Sequence[Any]) -> Any:
            return module(*inputs)

        return run

    def prepare_inputs(self, artifact: Artifact, example_inputs: Sequence[torch.Tensor]) -> list[Any]:
        return [torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t)
                .to(device=self.device, dtype=_DTYPES[self.dtype]) for t in example_inputs]

    def model_runner(self, model: nn.Module, example_inputs: Sequence[torch.Tensor],
                     stem: Path) -> tuple[Runner, list[Any]]:
        """A runner of ``model`` run directly (no export round trip; ``stem`` is unused)."""
        runner = self.runner(copy.deepcopy(model).eval())  # moving to the device must not touch the caller's model
        inputs = [t.to(device=self.device, dtype=_DTYPES[self.dtype]) for t in example_inputs]
        return runner, inputs


# --- 2:4 semi-structured Linear layers ----------------------------------------------------------


@dataclass(frozen=True)
class SemiStructuredDecision:
    """Whether one Linear layer runs on 2:4 kernels, and why (not)."""

    name: str
    shape: tuple[int, int]
    convert: bool
    reason: str


def semi_structured_constraints(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, cols) the weight's shape must be a positive multiple of for torch's 2:4 kernels in ``dtype``.

    Read from the backend torch will use (cuSPARSELt, or CUTLASS when forced), so the rule follows
    the installed torch rather than a copy of its table.
    """
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    backend = (SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
               else SparseSemiStructuredTensorCUSPARSELT)
    constraints = backend._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if constraints is None:
        raise ValueError(f"torch's 2:4 kernels do not take dtype {dtype}")
    return constraints.sparse_min_rows, constraints.sparse_min_cols


def has_2_4_pattern(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive input channels (last axis) of every row holds at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach().reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def semi_structured_plan(model: nn.Module, dtype: torch.dtype) -> list[SemiStructuredDecision]:
    """For each Linear layer of ``model``: convert it to 2:4 kernels in ``dtype``, or keep it dense and say why.

    A layer converts when its weight follows 2:4 and its shape (out, in) is a positive multiple
    of :func:`semi_structured_constraints`; works on the CPU (it only reads weights).
    """
    rows, cols = semi_structured_constraints(dtype)
    decisions = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        out_features, in_features = module.weight.shape
        shape = (int(out_features), int(in_features))
        if not has_2_4_pattern(module.weight):
            decision = SemiStructuredDecision(name, shape, False, "weights do not follow the 2:4 pattern")
        elif out_features % rows or in_features % cols:
            decision = SemiStructuredDecision(name, shape, False, f"shape {shape[0]}x{shape[1]} is not a multiple "
                                              f"of {rows}x{cols} (torch's 2:4 kernels in {dtype})")
        else:
            decision = SemiStructuredDecision(name, shape, True, "2:4")
        decisions.append(decision)
    return decisions


def convert_semi_structured(module: nn.Module, names: Sequence[str]) -> None:
    """Replace the weight of each named Linear (already on CUDA in fp16/bf16) by its 2:4 compressed form."""
    from torch.sparse import to_sparse_semi_structured

    for name in names:
        try:
            layer = module.get_submodule(name)
        except AttributeError as exc:
            raise ArtifactError(f"2:4 plan names layer {name!r}, which the loaded program does not have") from exc
        weight = layer.weight.detach().contiguous()
        layer.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)


def _has_semi_structured(module: nn.Module) -> bool:
    from torch.sparse import SparseSemiStructuredTensor

    return any(isinstance(p.data, SparseSemiStructuredTensor) or isinstance(p, SparseSemiStructuredTensor)
               for p in module.parameters())


def _export_dynamic_batch(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` with a symbolic batch axis on every input; static shapes when that fails.

    torch specialises size-1 axes, so a batch of one is traced as a batch of two copies.
    """
    traced = tuple(t.expand(2, *t.shape[1:]).contiguous() if t.dim() and t.shape[0] == 1 else t for t in inputs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        return torch.export.export(model, traced, dynamic_shapes=tuple({0: batch} for _ in traced))
    except Exception:  # a model whose code fixes the batch size: keep the example's shapes
        return torch.export.export(model, inputs)
