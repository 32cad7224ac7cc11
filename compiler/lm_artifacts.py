"""The artifacts of a compiled causal language model, beside the target's ``model.onnx``:

- the sequence length stays dynamic: the student is captured with its sequence dim declared
  (:func:`sequence_dims`: ``Dim("seq", min=2, max=max_position_embeddings)``), so the compact
  graph, ``model.onnx`` (axes ``batch`` and ``seq``) and ``model.pt2`` run at any length. The
  ONNX computes every position of its input: it has no key/value cache, so generating with it
  recomputes the prefix at every step (use the transformers folder to generate);
- ``model.pt2``: the compact graph as a ``torch.export`` program (dynamic batch and sequence);
- ``hf/``: the compact model written back into the user's own transformers class
  (:func:`spruce.to_transformers`: config with the pruned head counts and MLP width, weights,
  generation config) and the model folder's tokenizer, loadable by stock transformers
  (``AutoModelForCausalLM.from_pretrained`` + ``generate`` with its key/value cache) without
  spruce. Write-back needs the same counts in every layer (the ``uniform`` option, default for
  transformers models); when it refuses, the reason is recorded and the ``.pt2`` / ONNX remain.

Every failure of an extra artifact is recorded (``"not written: ..."``), never raised: the
target's artifacts and the report stand on their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api.deploy import parts, save_pt2
from ..api.transformers import to_transformers
from ..passes.graph import CapturedGraph

__all__ = ["HF_FOLDER", "lm_artifacts", "sequence_dims"]

HF_FOLDER = "hf"


def sequence_dims(model: nn.Module, example: torch.Tensor) -> tuple[dict[int, Any]]:
    """The example's dynamic dims besides the batch, in torch.export's format: its sequence dim
    (1), from 2 to the model's ``max_position_embeddings`` (or 8 x the example's length)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 8 * int(example.shape[1])
    return ({1: torch.export.Dim("seq", min=2, max=max(int(limit), int(example.shape[1])))},)


def _not_written(exc: Exception) -> str:
    return f"not written: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def lm_artifacts(compiled: nn.Module, dense: nn.Module, graph: CapturedGraph, out_dir: Path,
                 model_folder: str | None) -> dict[str, Any]:
    """Write ``model.pt2`` and the ``hf/`` folder (see the module doc) of the compact ``compiled``
    model (captured as ``graph``) of the transformers ``dense`` model into ``out_dir``; the
    tokenizer is copied from ``model_folder`` (None: the folder holds no tokenizer). Returns the
    record: each file's name, or ``"not written: why"``."""
    record: dict[str, Any] = {"onnx_prefix": "recomputed at every step (no key/value cache in the ONNX)"}
    try:
        pieces = parts(compiled, graph)
        if len(pieces) != 1:
            raise ValueError(f"the model was captured in {len(pieces)} pieces")
        record["pt2"] = save_pt2(pieces[0], out_dir / "model.pt2").name
    except Exception as exc:  # noqa: BLE001 - recorded in the report, the other artifacts stand
        record["pt2"] = _not_written(exc)
    folder = out_dir / HF_FOLDER
    try:
        model = to_transformers(compiled, dense)
        model.config.use_cache = True  # compile switched the cache off; generate wants it
        model.save_pretrained(folder)
        record["hf"] = HF_FOLDER
        record["hf_config"] = {k: getattr(model.config, k) for k in
                               ("num_attention_heads", "num_key_value_heads", "intermediate_size",
                                "hidden_size", "num_hidden_layers") if hasattr(model.config, k)}
    except Exception as exc:  # noqa: BLE001 - write-back refusals name their field; recorded
        record["hf"] = _not_written(exc)
        return record
    if model_folder is None:
        record["tokenizer"] = "not written: the model was not loaded from a folder with a tokenizer"
        return record
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_folder).save_pretrained(folder)
        record["tokenizer"] = HF_FOLDER
    except Exception as exc:  # noqa: BLE001 - a folder without a tokenizer still holds the model
        record["tokenizer"] = _not_written(exc)
    return record
