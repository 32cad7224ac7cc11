"""Hugging Face transformers models: what capture needs from them (handing a pruned model
back as the user's own transformers class is :func:`spruce.to_transformers`, in
:mod:`spruce.api.transformers`).

Mixture-of-experts layers (:data:`MOE_BLOCKS`, one entry per transformers block class) are
captured as one ``spruce::routed_experts`` operator (:mod:`spruce.passes.rules.experts`), so
whole experts and the experts' intermediate width prune; :func:`mask_experts` gives a masked
model the ``-inf`` router logits of its removed experts.

transformers is imported only when a model is one of its ``PreTrainedModel``\\ s.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..moved import moved_name
from ..passes.rules.experts import ACTIVATIONS, routed_experts

__all__ = ["MOE_BLOCKS", "NEUTRAL_INPUTS", "SEQUENCE_INPUTS", "MoeBlock", "cache_configs", "cache_settings_kept",
           "capture_settings", "is_transformers_model",
           "mask_experts", "moe_blocks", "sequence_dims"]


@dataclass(frozen=True)
class MoeBlock:
    """What capture knows of one transformers mixture-of-experts block class: ``renorm(block)``,
    do the top-k routing weights sum to one (Mixtral always; Qwen-MoE where
    ``norm_topk_prob``). The block holds its router as ``gate`` (``weight`` (E, H), ``top_k``)
    and its experts as ``experts`` (``gate_up_proj`` (E, 2 * I, H), ``down_proj`` (E, H, I));
    a ``shared_expert`` MLP, scaled by ``sigmoid(shared_expert_gate(x))`` where the block has
    that gate, is added (Qwen2-MoE)."""

    renorm: Callable[[nn.Module], bool]


MOE_BLOCKS: dict[str, MoeBlock] = {
    "MixtralSparseMoeBlock": MoeBlock(lambda block: True),
    "Qwen2MoeSparseMoeBlock": MoeBlock(lambda block: bool(block.gate.norm_topk_prob)),
    "Qwen3MoeSparseMoeBlock": MoeBlock(lambda block: bool(block.gate.norm_topk_prob)),
}


def _activation(experts: nn.Module) -> str | None:
    config = getattr(experts, "config", None)
    act = getattr(config, "hidden_act", None)
    return act if act in ACTIVATIONS else None


def _supported(block: nn.Module) -> MoeBlock | None:
    """The :data:`MOE_BLOCKS` entry of ``block`` where its experts have the layout the operator
    computes (gated, concatenated gate/up, not transposed, no biases, no post-expert norm)."""
    spec = MOE_BLOCKS.get(type(block).__name__)
    experts = getattr(block, "experts", None)
    if spec is None or experts is None or _activation(experts) is None:
        return None
    layout = (getattr(experts, "has_gate", True), getattr(experts, "is_concatenated", True),
              getattr(experts, "is_transposed", False), getattr(experts, "has_bias", False),
              getattr(experts, "has_post_expert_norm", False))
    if layout != (True, True, False, False, False) or getattr(experts, "gate_up_proj", None) is None:
        return None
    return spec


def moe_blocks(model: nn.Module) -> dict[str, MoeBlock]:
    """Module name -> entry of every supported mixture-of-experts block of ``model``."""
    found = {}
    for name, module in model.named_modules():
        spec = _supported(module)
        if spec is not None:
            found[name] = spec
    return found


def _moe_forward(block: nn.Module, spec: MoeBlock, hidden_states: torch.Tensor,
                 expert_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The block's forward with its routed experts as one operator."""
    batch, seq, width = hidden_states.shape
    flat = hidden_states.reshape(-1, width)
    experts = block.experts
    out = routed_experts(flat, block.gate.weight, experts.gate_up_proj, experts.down_proj, int(block.gate.top_k),
                         spec.renorm(block), _activation(experts), expert_bias)
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        shared_out = shared(flat)
        shared_gate = getattr(block, "shared_expert_gate", None)
        if shared_gate is not None:
            shared_out = torch.sigmoid(shared_gate(flat)) * shared_out
        out = out + shared_out
    return out.reshape(batch, seq, width)


@contextlib.contextmanager
def _experts_as_one_operator(model: nn.Module) -> Iterator[None]:
    blocks = [(model.get_submodule(name), spec) for name, spec in moe_blocks(model).items()]
    for block, spec in blocks:
        block.forward = functools.partial(_moe_forward, block, spec)
    try:
        yield
    finally:
        for block, _ in blocks:
            del block.forward


def mask_experts(masked: nn.Module, expert_keeps: Mapping[str, np.ndarray]) -> nn.Module:
    """Give ``masked`` (a masked copy of a transformers model) the routing of its removed experts:
    every supported mixture-of-experts block computes with the operator the compact graph runs,
    and the router logit of an expert removed (``expert_keeps``: router weight name -> bool per
    expert, False where removed) is ``-inf``, so it is never picked and takes no share of the
    softmax. Returns ``masked``, changed in place."""
    for name, spec in moe_blocks(masked).items():
        block = masked.get_submodule(name)
        keep = expert_keeps.get(f"{name}.gate.weight" if name else "gate.weight")
        bias = None
        if keep is not None and not np.all(keep):
            weight = block.gate.weight
            bias = torch.zeros(len(keep), dtype=weight.dtype, device=weight.device)
            bias[torch.as_tensor(~np.asarray(keep, dtype=bool))] = float("-inf")
        block.forward = functools.partial(_moe_forward, block, spec, expert_bias=bias)
    return masked


# keyword input -> the name of its sequence length (dim 1): inputs sharing a name share the length
SEQUENCE_INPUTS: dict[str, str] = {
    "input_ids": "seq", "attention_mask": "seq", "token_type_ids": "seq", "position_ids": "seq",
    "labels": "seq", "decoder_input_ids": "decoder_seq", "decoder_attention_mask": "decoder_seq",
}

# keyword input -> (the input it is shaped like, the expression giving the value that computes
# what leaving it out computes): a compact model captured with it runs without it
NEUTRAL_INPUTS: dict[str, tuple[str, str]] = {
    "attention_mask": ("input_ids", "torch.ones_like({like}, dtype={dtype})"),
    "decoder_attention_mask": ("decoder_input_ids", "torch.ones_like({like}, dtype={dtype})"),
    "token_type_ids": ("input_ids", "torch.zeros_like({like}, dtype={dtype})"),
}


def is_transformers_model(model: nn.Module) -> bool:
    """Is ``model`` a transformers ``PreTrainedModel`` (without importing transformers)?"""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def sequence_dims(model: nn.Module, example: object) -> dict | None:
    """torch.export ``dynamic_shapes`` keeping the sequence length (dim 1 of each 2-D input of
    :data:`SEQUENCE_INPUTS`) of a transformers model's keyword ``example`` dynamic, from 2 to the
    model's ``max_position_embeddings`` (else 4096); ``None`` for any other model or input."""
    if not is_transformers_model(model) or not isinstance(example, dict):
        return None
    longest = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 4096)
    made: dict[str, object] = {}
    dims: dict[str, dict[int, object]] = {}
    for name, value in example.items():
        seq = SEQUENCE_INPUTS.get(name)
        if seq is not None and isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] >= 2:
            if seq not in made:
                made[seq] = torch.export.Dim(seq, min=2, max=max(longest, int(value.shape[1])))
            dims[name] = {1: made[seq]}
    return dims or None


@contextlib.contextmanager
def capture_settings(model: nn.Module) -> Iterator[None]:
    """While capturing a transformers model: no key/value cache (a ``DynamicCache`` in the
    output is not a tensor structure export can return, and a graph has no use for it: the
    compact model computes every position); each supported mixture-of-experts block calls its
    routed experts as one operator. The config and the blocks are restored afterwards."""
    config = getattr(model, "config", None) if is_transformers_model(model) else None
    if config is None:
        yield
        return
    with _experts_as_one_operator(model), _no_cache(model, config):
        yield


def cache_configs(model: nn.Module, config: object = None) -> list[Any]:
    """``config`` (when it has ``use_cache``) and every other distinct config with ``use_cache``
    among ``model``'s modules (submodules may hold their own copies: T5's decoder stack)."""
    configs = {id(config): config} if hasattr(config, "use_cache") else {}
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and hasattr(sub, "use_cache"):
            configs.setdefault(id(sub), sub)
    return list(configs.values())


@contextlib.contextmanager
def cache_settings_kept(model: nn.Module | None, config: object = None) -> Iterator[None]:
    """Give every ``config.use_cache`` of ``model`` (and ``config``'s) back the value it had on
    entry, however the block ends (``spruce compile`` switches the cache off on the live model it
    is given)."""
    saved = [(c, c.use_cache) for c in cache_configs(model, config)] if model is not None else []
    try:
        yield
    finally:
        for c, value in saved:
            c.use_cache = value


@contextlib.contextmanager
def _no_cache(model: nn.Module, config: object) -> Iterator[None]:
    if not hasattr(config, "use_cache"):
        yield
        return
    with cache_settings_kept(model, config):
        for c in cache_configs(model, config):
            c.use_cache = False
        yield


def __getattr__(name: str) -> Any:
    raise moved_name(__name__, name)  # to_transformers: an ImportError naming spruce.to_transformers
