"""The torch target: eager (or ``torch.compile``) execution on the CPU or CUDA.

Artifact = a ``torch.export`` program (``.pt2``), loadable without the
model's Python source.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spruce.targets.base import Artifact, ArtifactError, Runner, Target, register_target, temp_path_next_to
from torch import nn

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register_target
class TorchTarget(Target):
    """torch on ``device`` ("cpu" or "cuda"), in ``dtype``, optionally through ``torch.compile``."""

    name = "torch"
    suffix = ".pt2"

    def __init__(self, device: str = "cpu", dtype: str = "float32", compile: bool = False):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"torch target: device must be 'cpu' or 'cuda', got {device!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"torch target: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.device = device
        self.dtype = dtype
        self.compile = bool(compile)

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
        path = Path(path)
        program = torch.export.export(model.eval(), tuple(example_inputs))
        temp = temp_path_next_to(path, suffix=".tmp.pt2")
        try:
            torch.export.save(program, temp)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        artifact = Artifact(path=path, target=self.name,
                            input_shapes=tuple(tuple(t.shape) for t in example_inputs),
                            input_dtype=str(example_inputs[0].dtype).removeprefix("torch."),
                            info={"device": self.device, "dtype": self.dtype, "compile": self.compile})
        artifact.write_manifest()
        return artifact

    def load(self, artifact: Artifact) -> Runner:
        if artifact.target != self.name:
            raise ArtifactError(f"artifact {artifact.path} was built for target {artifact.target!r}, not {self.name!r}")
        self.require()
        module = torch.export.load(artifact.path).module()
        return self.runner(module)

    def runner(self, module: nn.Module) -> Runner:
        """A runner of ``module`` on this target's device and dtype, without gradients."""
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

    def time_model(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], warmup: int = 10,
                   repeats: int = 50) -> np.ndarray:
        """Seconds per forward of ``model`` run directly (no export round trip)."""
        self.require()
        runner = self.runner(copy.deepcopy(model).eval())  # moving to the device must not touch the caller's model
        inputs = [t.to(device=self.device, dtype=_DTYPES[self.dtype]) for t in example_inputs]
        return self.time_runner(runner, inputs, warmup, repeats)
