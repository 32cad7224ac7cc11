"""Handing a pruned transformers model back as the user's own transformers class:
:func:`to_transformers`, with one :data:`WRITE_BACK` entry per ``config.model_type`` (the
config fields a pruned model changes, and where their widths are read).

transformers itself is never imported here: the source model's own class builds the result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..capture.transformers import is_transformers_model

__all__ = ["WRITE_BACK", "WidthField", "to_transformers"]


@dataclass(frozen=True)
class WidthField:
    """A config field read back from a pruned model: the width of ``param`` (``{i}`` is the
    layer) along ``dim``, in heads when ``per_head`` (divided by the head dim)."""

    param: str
    dim: int = 0
    per_head: bool = False


_LLAMA_LIKE = {
    "num_attention_heads": WidthField("model.layers.{i}.self_attn.q_proj.weight", 0, per_head=True),
    "num_key_value_heads": WidthField("model.layers.{i}.self_attn.k_proj.weight", 0, per_head=True),
    "intermediate_size": WidthField("model.layers.{i}.mlp.up_proj.weight", 0),
}

# config.model_type -> the config fields a pruned model changes (one entry per family)
WRITE_BACK: dict[str, dict[str, WidthField]] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def to_transformers(compact: nn.Module, source: nn.Module) -> nn.Module:
    """The compact model ``compact`` (``spruce.prune(source, ...).model``) written back into
    ``source``'s own transformers class, with a config whose head counts and MLP width are
    the pruned ones (``head_dim`` stays, written explicitly). The result is a plain
    transformers model: ``save_pretrained`` / ``from_pretrained``, ``generate`` with the
    key/value cache.

    Needs widths that are the same in every layer (``prune`` with one ``ratio`` gives them)
    and an unpruned hidden width. Raises ``ValueError`` naming the model type, the config
    field or the parameter at fault; the ``.pt2`` of the compact graph
    (:func:`spruce.api.deploy.save_pt2`) stays the way to deploy other results."""
    if not is_transformers_model(source):
        raise ValueError(f"to_transformers needs a transformers model, got {type(source).__name__}")
    config = source.config
    fields = WRITE_BACK.get(getattr(config, "model_type", None))
    if fields is None:
        raise ValueError(f"to_transformers: no write-back for model type {config.model_type!r} "
                         f"({type(source).__name__}); supported: {', '.join(sorted(WRITE_BACK))}")
    state = compact.state_dict()
    head_dim = _head_dim(config)
    new_config = copy.deepcopy(config)
    for attr, field in fields.items():
        widths = []
        for i in range(config.num_hidden_layers):
            name = field.param.format(i=i)
            if name not in state:
                raise ValueError(f"to_transformers: the compact model has no parameter {name!r}")
            widths.append(int(state[name].shape[field.dim]))
        counts = [w // head_dim if field.per_head else w for w in widths]
        if len(set(counts)) != 1:
            raise ValueError(f"to_transformers: {attr} differs across layers ({counts}); a transformers config "
                             f"holds one value: prune every layer alike (one ratio) or deploy the .pt2")
        setattr(new_config, attr, counts[0])
    if "num_attention_heads" in fields:
        new_config.head_dim = head_dim
        kv = getattr(new_config, "num_key_value_heads", None)
        if kv and new_config.num_attention_heads % kv:
            raise ValueError(f"to_transformers: {new_config.num_attention_heads} query heads do not divide into "
                             f"{kv} key/value groups")
    with torch.device("meta"):
        model = type(source)(new_config)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"to_transformers: parameter {name!r} is {tuple(state[name].shape)} in the compact "
                             f"model but {tuple(tensor.shape)} in {type(source).__name__} with the pruned config "
                             f"(only head counts and MLP widths are written back)")
    missing = [n for n in expected if n not in state]
    if missing:
        raise ValueError(f"to_transformers: the compact model lacks {missing[:3]}")
    model.load_state_dict({n: state[n] for n in expected}, strict=True, assign=True)
    for name, buf in source.named_buffers():  # non-persistent buffers (rotary inv_freq) from the source
        if name not in expected:
            owner, _, leaf = name.rpartition(".")
            target = model.get_submodule(owner) if owner else model
            if getattr(target, leaf, None) is not None:
                target._buffers[leaf] = buf.clone()
    if getattr(source, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(source.generation_config)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"to_transformers: {type(source).__name__} has state the compact model does not "
                         f"carry: {left[:3]}")
    return model.train(source.training)
