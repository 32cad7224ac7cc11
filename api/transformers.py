"""Handing a pruned transformers model back as the user's own transformers class:
:func:`to_transformers`, with one :data:`WRITE_BACK` entry (a :class:`Family`) per
``config.model_type``: the config fields a pruned model changes, where their widths are read,
and the constants the family derives from them.

transformers itself is never imported here: the source model's own class builds the result.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..capture.transformers import is_transformers_model
from ..passes.sparsity.count_rules import CountRule

__all__ = ["WRITE_BACK", "Family", "WidthField", "hidden_width_rule", "to_transformers"]


@dataclass(frozen=True)
class WidthField:
    """A config field read back from a pruned model: the width of ``param`` (``{i}`` is the
    layer; a name inside the base model, e.g. ``layers.{i}.mlp.up_proj.weight``) along
    ``dim``, in heads when ``per_head`` (divided by the head dim). A fused weight holding
    this field's width ``parts`` times after the width of the field ``less`` (Phi-3's
    ``qkv_proj``: query heads, then key and value heads) names both. ``also``: more
    parameters (same ``dim``) that must hold the same width (T5's decoder stack)."""

    param: str
    dim: int = 0
    per_head: bool = False
    less: str | None = None
    parts: int = 1
    also: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """What write-back knows of one ``config.model_type``.

    ``widths``: config field -> where its per-layer value is read, in order (a refusal names
    the first field whose layers differ). ``head_dim``: the config field holding the head
    dim, ``None`` where the family derives it as ``hidden_size // num_attention_heads``
    (pruned heads then cannot be written back). ``hidden``: where the residual width is
    read (``None``: a pruned residual width is refused). ``finish(model, source)`` rewrites
    what the family derives from the config on load (Gemma's ``embed_scale``) and raises
    ``ValueError`` when a reload cannot reproduce it. ``layers``: the config field counting
    the layers the widths are read over. ``blocks``: where layer ``{i}`` lives inside the base
    model (``None``: removed layers are refused); after layers were removed
    (:func:`spruce.prune_depth`) the kept ones are renumbered, ``layers`` is rewritten, each
    config field of ``per_layer`` (a list with one entry per layer: ``layer_types``) keeps the
    kept layers' entries, and each field of ``first_layers`` (a count of leading layers:
    Qwen2's ``max_window_layers``) counts the kept ones among them. ``read(config, state, source)``:
    for a family whose config is not one value per layer (Swin's per-stage lists and derived
    widths), sets the pruned fields from the compact model's tensors in place of ``widths`` and
    ``blocks``; returns the map from a tensor name to its written-back name (``None``: in a
    removed block) and the fields it wrote, and raises ``ValueError`` naming a field that cannot
    hold what the compact model has."""

    widths: Mapping[str, WidthField]
    head_dim: str | None = "head_dim"
    hidden: WidthField | None = None
    finish: Callable[[nn.Module, nn.Module], None] | None = None
    layers: str = "num_hidden_layers"
    blocks: str | None = "layers.{i}"
    per_layer: tuple[str, ...] = ("layer_types",)
    first_layers: tuple[str, ...] = ("max_window_layers",)
    read: Callable[[object, Mapping[str, torch.Tensor], nn.Module],
                   tuple[Callable[[str], str | None], tuple[str, ...]]] | None = None


_EMBED = WidthField("embed_tokens.weight", 1)
_LLAMA_LIKE = Family({
    "num_attention_heads": WidthField("layers.{i}.self_attn.q_proj.weight", 0, per_head=True),
    "num_key_value_heads": WidthField("layers.{i}.self_attn.k_proj.weight", 0, per_head=True),
    "intermediate_size": WidthField("layers.{i}.mlp.up_proj.weight", 0),
}, hidden=_EMBED)


def _gemma_embed_scale(model: nn.Module, source: nn.Module) -> None:
    """Gemma multiplies its embeddings by ``sqrt(hidden_size)``, a buffer rebuilt from the
    config on every load: a pruned residual width would change it. Untied embeddings absorb
    the ratio of the two scales; tied ones (the same matrix is the output head) cannot."""
    old, new = source.config.hidden_size, model.config.hidden_size
    embed = model.get_input_embeddings()
    if new == old:
        return
    if model.get_output_embeddings() is not None and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError(f"to_transformers: embed_scale: {type(source).__name__} rebuilds it as sqrt(hidden_size) "
                         f"on load (sqrt({new}), not the sqrt({old}) the compact model computes with), and its tied "
                         f"embeddings cannot absorb the ratio; keep the residual width or deploy the .pt2")
    with torch.no_grad():
        embed.weight = nn.Parameter(embed.weight * (old / new) ** 0.5, requires_grad=embed.weight.requires_grad)
    embed.scalar_embed_scale = new**0.5
    embed.embed_scale = torch.tensor(new**0.5, dtype=embed.embed_scale.dtype)


_SWIN_BLOCK = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.blocks\.(\d+)\.")


def _swin_kept_blocks(config, state: Mapping[str, torch.Tensor], name: str) -> Callable[[str], str | None]:
    """Renumber the blocks each Swin stage kept (:func:`spruce.prune_depth` removes some), rewriting
    ``depths``; returns the map from a source tensor name to its written-back name (``None``:
    removed). A block shifts its window when its position in its stage is odd, so the kept blocks
    must keep their positions' parity (trailing blocks or pairs removed); a stage keeps one at least."""
    found = [(int(m[1]), int(m[2])) for m in map(_SWIN_BLOCK.search, state) if m is not None]
    kept = [sorted({i for stage, i in found if stage == s}) for s in range(len(config.depths))]
    for s, blocks in enumerate(kept):
        if not blocks or any(old % 2 != new % 2 for new, old in enumerate(blocks)):
            raise ValueError(f"to_transformers: depths: stage {s} of {name} keeps blocks {blocks} of "
                             f"{config.depths[s]}; a block shifts its window when its position in its stage is odd, "
                             f"so only trailing blocks or pairs can go (and a stage keeps one) to be written back; "
                             f"deploy the .pt2")
    new_index = {(s, old): new for s, blocks in enumerate(kept) for new, old in enumerate(blocks)}
    config.depths = [len(blocks) for blocks in kept]

    def rename(tensor: str) -> str | None:
        m = _SWIN_BLOCK.search(tensor)
        if m is None:
            return tensor
        new = new_index.get((int(m[1]), int(m[2])))
        return None if new is None else f"{tensor[:m.start(2)]}{new}{tensor[m.end(2):]}"

    return rename


def _swin_stages(config, state: Mapping[str, torch.Tensor], source: nn.Module
                 ) -> tuple[Callable[[str], str | None], tuple[str, ...]]:
    """Swin's config from the compact model, stage by stage: stage ``s`` is ``embed_dim * 2**s``
    wide, its MLP ``int(mlp_ratio * width)``, and its attention has ``num_heads[s]`` heads of
    ``width // num_heads[s]`` (query/key/value/output project width -> width; the
    relative-position-bias table holds a column per head). So heads write back only where the
    stage width shrank with them (``normalised_widths`` at the heads' share), the residual width
    only as a new ``embed_dim`` that every stage doubles, the MLP width only as one ratio, removed
    blocks as ``depths`` (see :func:`_swin_kept_blocks`)."""
    name = type(source).__name__
    rename = _swin_kept_blocks(config, state, name)
    state = {rename(n): t for n, t in state.items()}
    stage_widths, heads, mlp = [], [], []
    for s, depth in enumerate(config.depths):
        block = f"encoder.layers.{s}.blocks.{{i}}."
        for i in range(depth):
            query = _width(state, source, WidthField(block + "attention.q_proj.weight", 0), i)
            width = _width(state, source, WidthField(block + "layernorm_before.weight", 0), i)
            table = _width(state, source, WidthField(
                block + "attention.relative_position_bias.relative_position_bias_table", 1), i)
            if query != width:
                raise ValueError(f"to_transformers: num_heads: {name} derives the head dim as the stage width // "
                                 f"num_heads and projects width -> width, so {table} heads of {query // table} in "
                                 f"the {width}-wide stage {s} cannot be written back; prune the residual width "
                                 f"alike (normalised_widths=True), ignore the attention, or deploy the .pt2")
            fc1 = _width(state, source, WidthField(block + "mlp.fc1.weight", 0), i)
            if i == 0:
                stage_widths.append(width)
                heads.append(table)
                mlp.append(fc1)
            elif (table, fc1) != (heads[s], mlp[s]):
                field = "num_heads" if table != heads[s] else "mlp_ratio"
                raise ValueError(f"to_transformers: {field} differs across the blocks of stage {s}; a {name} config "
                                 f"holds one value per stage: prune every block alike (one ratio) or deploy the .pt2")
    embed_dim = stage_widths[0]
    if stage_widths != [embed_dim * 2**s for s in range(len(stage_widths))]:
        raise ValueError(f"to_transformers: embed_dim: stage widths {stage_widths} are not embed_dim x 2**stage, "
                         f"which {name} builds; prune every stage's residual width by one share or deploy the .pt2")
    mlp_ratio = mlp[0] / embed_dim
    if [int(mlp_ratio * w) for w in stage_widths] != mlp:
        raise ValueError(f"to_transformers: mlp_ratio: MLP widths {mlp} are not int(mlp_ratio x stage width) for one "
                         f"mlp_ratio (stage widths {stage_widths}); prune every MLP by one share or deploy the .pt2")
    config.embed_dim, config.num_heads, config.mlp_ratio = embed_dim, heads, mlp_ratio
    config.hidden_size = stage_widths[-1]
    return rename, ("depths", "embed_dim", "num_heads", "mlp_ratio")


# config.model_type -> what write-back knows of the family (one entry per family)
WRITE_BACK: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,  # per-head q/k norms stay head_dim wide; head_dim is written explicitly
    "gemma": Family(_LLAMA_LIKE.widths, hidden=_EMBED, finish=_gemma_embed_scale),
    "mixtral": Family({  # 3-D expert weights: gate_up_proj (experts, 2 * width, hidden), down_proj (.., width)
        "num_attention_heads": _LLAMA_LIKE.widths["num_attention_heads"],
        "num_key_value_heads": _LLAMA_LIKE.widths["num_key_value_heads"],
        "num_local_experts": WidthField("layers.{i}.mlp.gate.weight", 0),
        "intermediate_size": WidthField("layers.{i}.mlp.experts.down_proj", 2),
    }, hidden=_EMBED),
    "phi3": Family({  # fused qkv_proj (query heads, then key and value heads) and gate_up_proj
        "num_attention_heads": WidthField("layers.{i}.self_attn.o_proj.weight", 1, per_head=True),
        "num_key_value_heads": WidthField("layers.{i}.self_attn.qkv_proj.weight", 0, per_head=True,
                                          less="num_attention_heads", parts=2),
        "intermediate_size": WidthField("layers.{i}.mlp.down_proj.weight", 1),
    }, hidden=_EMBED),
    "gpt2": Family({  # Conv1D weights are (in, out); the head dim is n_embd // n_head
        "num_attention_heads": WidthField("h.{i}.attn.c_proj.weight", 0, per_head=True),
        "n_inner": WidthField("h.{i}.mlp.c_fc.weight", 1),
    }, head_dim=None, blocks="h.{i}"),
    "bert": Family({
        "num_attention_heads": WidthField("encoder.layer.{i}.attention.self.query.weight", 0, per_head=True),
        "intermediate_size": WidthField("encoder.layer.{i}.intermediate.dense.weight", 0),
    }, head_dim=None, blocks="encoder.layer.{i}"),
    "vit": Family({
        "num_attention_heads": WidthField("layers.{i}.attention.q_proj.weight", 0, per_head=True),
        "intermediate_size": WidthField("layers.{i}.mlp.fc1.weight", 0),
    }, hidden=WidthField("embeddings.cls_token", 2)),
    "t5": Family({  # encoder and decoder stacks alike; the relative position bias follows the heads
        "num_attention_heads": WidthField("encoder.block.{i}.layer.0.SelfAttention.q.weight", 0, per_head=True, also=(
            "decoder.block.{i}.layer.0.SelfAttention.q.weight", "decoder.block.{i}.layer.1.EncDecAttention.q.weight")),
        "d_ff": WidthField("encoder.block.{i}.layer.1.DenseReluDense.wi.weight", 0,
                           also=("decoder.block.{i}.layer.2.DenseReluDense.wi.weight",)),
    }, head_dim="d_kv", blocks=None),
    "swin": Family({}, head_dim=None, blocks=None, read=_swin_stages),
}


def _head_dim(config, family: Family) -> int:
    return getattr(config, family.head_dim or "head_dim", None) or config.hidden_size // config.num_attention_heads


def _compact_state(compact: nn.Module) -> dict[str, torch.Tensor]:
    """The compact model's tensors under the source model's names (a compact model whose
    training graph differs keeps both graphs over the same tensors: the eval graph's)."""
    state = compact.state_dict()
    prefix = "eval_graph."
    if any(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


def _width(state: Mapping[str, torch.Tensor], source: nn.Module, width: WidthField, layer: int) -> int:
    name = width.param.format(i=layer)
    base = getattr(source, "base_model_prefix", "")
    for full in (f"{base}.{name}" if base else name, name):
        if full in state:
            return int(state[full].shape[width.dim])
    raise ValueError(f"to_transformers: the compact model has no parameter {name!r}")


def _kept_layers(state: Mapping[str, torch.Tensor], config, family: Family, source: nn.Module
                 ) -> Callable[[str], str | None]:
    """Renumber the layers the compact model kept (:func:`spruce.prune_depth` removes some):
    rewrite ``config``'s layer count and per-layer fields, and return the map from a source
    tensor name to its name in the written-back model (``None``: in a removed layer)."""
    count = getattr(config, family.layers)
    if family.blocks is None:
        return lambda name: name
    base = getattr(source, "base_model_prefix", "")
    prefixes = [family.blocks.format(i=i) + "." for i in range(count)]

    def layer_of(name: str) -> tuple[int, str, str] | None:
        for lead in (f"{base}." if base else "", ""):
            if name.startswith(lead):
                rest = name[len(lead):]
                for i, prefix in enumerate(prefixes):
                    if rest.startswith(prefix):
                        return i, lead, rest[len(prefix):]
        return None

    present = sorted({found[0] for found in map(layer_of, state) if found is not None})
    if present == list(range(count)) or not present:
        return lambda name: name
    new_index = {old: new for new, old in enumerate(present)}
    setattr(config, family.layers, len(present))
    for attr in family.per_layer:
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == count:
            setattr(config, attr, type(value)(value[i] for i in present))
    for attr in family.first_layers:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(config, attr, sum(1 for i in present if i < value))

    def rename(name: str) -> str | None:
        found = layer_of(name)
        if found is None:
            return name
        i, lead, rest = found
        return f"{lead}{family.blocks.format(i=new_index[i])}.{rest}" if i in new_index else None

    return rename


def _then(first: Callable[[str], str | None], second: Callable[[str], str | None]) -> Callable[[str], str | None]:
    return lambda name: None if first(name) is None else second(first(name))


def _write_widths(config, family: Family, state, source: nn.Module, head_dim: int) -> tuple[str, ...]:
    """Set ``config``'s pruned fields from the compact model's parameters, refusing the
    first field whose layers differ; returns the fields written."""
    for attr, width in family.widths.items():
        counts = []
        for i in range(getattr(config, family.layers)):
            for param in (width.param, *width.also):
                value = _width(state, source, replace(width, param=param), i)
                value = value // head_dim if width.per_head else value
                if width.less:
                    value = (value - getattr(config, width.less)) // width.parts
                counts.append(value)
        if len(set(counts)) != 1:
            where = "layers and stacks" if width.also else "layers"
            raise ValueError(f"to_transformers: {attr} differs across {where} ({counts}); a transformers config "
                             f"holds one value: prune every layer alike (one ratio) or deploy the .pt2")
        setattr(config, attr, counts[0])
    if family.hidden is None:
        return tuple(family.widths)
    config.hidden_size = _width(state, source, family.hidden, 0)
    return (*family.widths, "hidden_size")


def _check_heads(config, family: Family, source: nn.Module, head_dim: int) -> None:
    if "num_attention_heads" not in family.widths:
        return
    if family.head_dim is not None:
        setattr(config, family.head_dim, head_dim)
    elif config.hidden_size // config.num_attention_heads != head_dim:
        raise ValueError(f"to_transformers: num_attention_heads: {type(source).__name__} derives the head dim as "
                         f"hidden_size // num_attention_heads, so {config.num_attention_heads} heads of "
                         f"{head_dim} cannot be written back ({config.hidden_size} wide); prune its MLP only "
                         f"(ignore the attention modules) or deploy the .pt2")
    kv = getattr(config, "num_key_value_heads", None)
    if kv and config.num_attention_heads % kv:
        raise ValueError(f"to_transformers: {config.num_attention_heads} query heads do not divide into "
                         f"{kv} key/value groups")


def to_transformers(compact: nn.Module, source: nn.Module) -> nn.Module:
    """The compact model ``compact`` (``spruce.prune(source, ...).model``) written back into
    ``source``'s own transformers class, with a config whose head counts, MLP width, (for
    families that declare it) residual width and layers are the pruned ones (removed layers:
    the kept ones renumbered, so each attention's ``layer_idx``, which the key/value cache
    indexes by, and per-layer fields such as ``layer_types`` follow) (``head_dim`` stays, written
    explicitly where the family has the field). The result is a plain transformers model:
    ``save_pretrained`` / ``from_pretrained``, ``generate`` with the key/value cache; tied
    weights stay tied, derived constants (Gemma's ``embed_scale``) survive a reload.

    Families: the keys of :data:`WRITE_BACK`. Needs widths that are the same in every layer
    (``prune`` with one ``ratio`` gives them). Raises ``ValueError`` naming the model type,
    the config field or the parameter at fault; the ``.pt2`` of the compact graph
    (:func:`spruce.api.deploy.save_pt2`) stays the way to deploy other results."""
    if not is_transformers_model(source):
        raise ValueError(f"to_transformers needs a transformers model, got {type(source).__name__}")
    config = source.config
    family = WRITE_BACK.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"to_transformers: no write-back for model type {config.model_type!r} "
                         f"({type(source).__name__}); supported: {', '.join(sorted(WRITE_BACK))}")
    new_config = copy.deepcopy(config)
    rename = _kept_layers(_compact_state(compact), new_config, family, source)
    state = {rename(n): t for n, t in _compact_state(compact).items()}
    if family.read is not None:
        own_rename, written = family.read(new_config, state, source)
        state = {own_rename(n): t for n, t in state.items() if n is not None}
        rename = _then(rename, own_rename)
    else:
        head_dim = _head_dim(config, family)
        written = _write_widths(new_config, family, state, source, head_dim)
        _check_heads(new_config, family, source, head_dim)
    refusal = _config_refusal(new_config)
    if refusal is not None:
        raise ValueError(f"to_transformers: {type(config).__name__} refuses the pruned config ({refusal}); "
                         f"select widths it takes (compile and prune do: hidden_width_rule) or deploy the .pt2")
    with torch.device("meta"):
        model = type(source)(new_config)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"to_transformers: parameter {name!r} is {tuple(state[name].shape)} in the compact "
                             f"model but {tuple(tensor.shape)} in {type(source).__name__} with the pruned config "
                             f"(fields written back: {', '.join(written)})")
    missing = [n for n in expected if n not in state]
    if missing:
        raise ValueError(f"to_transformers: the compact model lacks {missing[:3]}")
    model.load_state_dict({n: state[n] for n in expected}, strict=True, assign=True)
    for old_name, buf in source.named_buffers():  # non-persistent buffers (rotary inv_freq) from the source
        name = rename(old_name)
        if name is not None and name not in expected:
            owner, _, leaf = name.rpartition(".")
            target = model.get_submodule(owner) if owner else model
            if getattr(target, leaf, None) is not None:
                target._buffers[leaf] = buf.clone()
    if getattr(source, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(source.generation_config)
    model.tie_weights()
    if family.finish is not None:
        family.finish(model, source)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"to_transformers: {type(source).__name__} has state the compact model does not "
                         f"carry: {left[:3]}")
    return model.train(source.training)


@dataclass(frozen=True)
class _Shape:
    """A tensor's shape where write-back's readers expect a tensor (``.shape``)."""

    shape: tuple[int, ...]


def _config_refusal(config) -> str | None:
    """Why ``config``'s own class validation (transformers' strict configs: ``validate``, which
    ``from_pretrained`` runs) refuses it; None when it takes it."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as exc:  # the strict-dataclass errors derive from Exception, not ValueError
        return " ".join(str(exc.__cause__ or exc).split())
    return None


def hidden_width_rule(source: nn.Module, groups: Sequence) -> CountRule | None:
    """The :class:`~spruce.passes.sparsity.count_rules.CountRule` that keeps a selection over
    ``groups`` (``ChannelGroup``s of ``source``'s analysis with ``normalised_widths``) writable
    by :func:`to_transformers`: the residual-width group (the one holding the family's
    ``hidden`` field, e.g. ``embed_tokens.weight`` dim 1) must keep a count at which the
    config write-back builds (its fields read as :func:`to_transformers` reads them, from the
    widths the kept counts give) passes the config class's own validation. A stock
    ``LlamaConfig`` takes ``hidden_size`` only as a multiple of ``num_attention_heads``, so a
    hidden width of 23 beside 2 kept heads moves to 22. Counts that write-back refuses for
    another reason (widths differing across layers) are left to its own error. ``None`` for a
    model that is no transformers model, a family without a residual-width field in
    :data:`WRITE_BACK` (or with its own reader: Swin), or no prunable residual-width group."""
    if not is_transformers_model(source):
        return None
    family = WRITE_BACK.get(getattr(source.config, "model_type", None))
    if family is None or family.hidden is None or family.read is not None:
        return None
    base = getattr(source, "base_model_prefix", "")
    field = family.hidden.param.format(i=0)
    names = {f"{base}.{field}" if base else field, field}
    hidden = next((g for g in groups if g.prunable and any(m.name in names and m.dim == family.hidden.dim
                                                           for m in g.members)), None)
    if hidden is None:
        return None
    dense = {name: tuple(t.shape) for name, t in (*source.named_parameters(), *source.named_buffers())}
    cuts = [(g.id, g.size, [(m.name, m.dim, int(m.index.shape[1])) for m in g.members if m.name in dense])
            for g in groups if g.prunable]
    head_dim = _head_dim(source.config, family)

    def holds(counts: Mapping[int, int]) -> bool:
        shapes = {name: list(shape) for name, shape in dense.items()}
        for gid, size, members in cuts:
            removed = size - int(counts.get(gid, size))
            for name, dim, per_channel in members if removed else ():
                shapes[name][dim] -= removed * per_channel
        config = copy.deepcopy(source.config)
        try:
            state = {name: _Shape(tuple(shape)) for name, shape in shapes.items()}
            _write_widths(config, family, state, source, head_dim)
            _check_heads(config, family, source, head_dim)
        except ValueError:
            return True  # write-back refuses for a reason no residual width fixes: its own error says which
        return _config_refusal(config) is None

    return CountRule(hidden.id, holds, f"{type(source.config).__name__}'s validation of hidden_size "
                                       f"against the kept heads (write-back)")
