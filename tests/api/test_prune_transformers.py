"""The public acceptance set of transformers models (spruce.zoo.transformers: BERT,
DistilBERT, GPT-2, ViT, T5, Llama and Qwen2 with grouped-query attention; tiny configs,
random weights, no download): prune(ratio=0.5) removes whole heads and MLP widths with head
counts that divide, equals the masked model at two batch sizes and two sequence lengths
(the sequence length declared dynamic), trains, exports to ONNX matching ONNX Runtime and
reloads from .pt2 in a fresh process. The two LLMs generate the same greedy tokens from the
compact and the masked model, and come back as their own transformers class
(save_pretrained / from_pretrained, generate with the key/value cache).

Each model is built and pruned once per test session."""

from __future__ import annotations

import functools

import pytest
import spruce
import torch
from helpers import assert_pt2_reloads_in_a_fresh_process
from spruce.api import checks, deploy
from spruce.api.transformers import to_transformers
from spruce.zoo import transformers as hf_examples
from torch.utils import _pytree as pytree

pytest.importorskip("transformers")

NAMES = list(hf_examples.HF_EXAMPLES)


@functools.cache
def pruned(name: str, gqa: str = "query_heads"):
    example = hf_examples.build(name)
    result = spruce.prune(example.model, example.example, ratio=0.5, dynamic_shapes=example.dynamic_shapes, gqa=gqa)
    return example, result


# with normalised_widths the residual width (and the embedding widths) of these shrink
# (Llama's and Qwen2's RMSNorm computed by hand included); DistilBertModel returns its hidden
# states and T5ForConditionalGeneration its encoder's last hidden state (one residual width
# with the decoder's through the shared embedding): that width reaches the model's output
# and stays; they still prune heads and MLP widths exactly
NORMALISED = {"BertForSequenceClassification": "bert.embeddings.word_embeddings.weight",
              "GPT2LMHeadModel": "transformer.wte.weight",
              "ViTForImageClassification": "vit.embeddings.position_embeddings",
              "LlamaForCausalLM": "model.embed_tokens.weight",
              "Qwen2ForCausalLM": "model.embed_tokens.weight"}


@functools.cache
def pruned_normalised(name: str):
    example = hf_examples.build(name)
    result = spruce.prune(example.model, example.example, ratio=0.5, dynamic_shapes=example.dynamic_shapes,
                          normalised_widths=True)
    return example, result


def heads(example: hf_examples.HFExample, model: torch.nn.Module) -> list[tuple[int, int]]:
    """(query heads, key/value heads) per layer, read from the model's parameters."""
    state = {k.removeprefix("eval_graph."): v for k, v in model.state_dict().items()}  # a ModeSwitch's eval graph
    out = []
    for i in range(example.layers):
        q = state[example.query.format(i=i)].shape[example.heads_dim]
        k = state[example.key.format(i=i)].shape[example.heads_dim]
        if example.query == example.key:  # one fused projection (GPT-2's c_attn): q, k, v side by side
            q = k = q // 3
        out.append((q // example.head_dim, k // example.head_dim))
    return out


def logits(output: object) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output["logits"]


@pytest.mark.parametrize("name", NAMES)
def test_prunes_heads_and_mlp_widths_exactly(name):
    example, result = pruned(name)
    before, after = heads(example, example.model), heads(example, result.model)
    for (q0, _), (q1, k1) in zip(before, after):
        assert q1 < q0 and q1 % k1 == 0, (before, after)
        assert q1 >= 1
    widths = [g.size for g in result.groups if g.prunable and len(result.kept.get(g.id, ())) * 2 == g.size]
    assert len(widths) >= 2 * example.layers  # each layer: its heads and its MLP width, halved
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in example.model.parameters())
    captured = result.analysis.captured
    assert captured.whole
    for batch in (1, 3):
        for seq in (5, 11):
            inputs = example.inputs(batch, seq)
            assert checks.head_error(result.masked, result.model, captured, inputs) <= 1e-4, (batch, seq)
    # the check can fail: the original model differs from the masked one
    assert checks.head_error(example.model, result.masked, captured, example.inputs(1, 5)) > 1e-3


def test_grouped_query_attention_modes():
    """query_heads: the same query heads leave every key/value group; kv_groups: whole groups."""
    example, per_group = pruned("LlamaForCausalLM")
    assert heads(example, per_group.model) == [(4, 2), (4, 2)]
    example, whole = pruned("LlamaForCausalLM", "kv_groups")
    assert heads(example, whole.model) == [(4, 1), (4, 1)]
    for result in (per_group, whole):
        inputs = example.inputs(2, 7)
        assert checks.head_error(result.masked, result.model, result.analysis.captured, inputs) <= 1e-4
    with pytest.raises(ValueError, match="gqa"):
        spruce.prune(example.model, example.example, gqa="heads")


@pytest.mark.parametrize("name", NAMES)
def test_compact_model_trains(name):
    example, result = pruned(name)
    compact = result.model
    compact.train()
    compact.zero_grad()
    out = compact(**example.inputs(2, 6))
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    loss = sum(t.float().mean() for t in leaves)
    loss.backward()
    assert torch.isfinite(loss)
    assert checks.missing_gradients(compact, result.analysis.captured) == []
    compact.eval()


@pytest.mark.parametrize("name", NAMES)
def test_compact_model_exports_to_onnx(name, tmp_path):
    _, result = pruned(name)
    for part in deploy.parts(result.model, result.analysis.captured):
        path, error = deploy.save_onnx(part, tmp_path / f"{part.name}.onnx")
        assert path.exists() and error <= 1e-4, (part.name, error)


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "LlamaForCausalLM"])
def test_deployed_files_keep_the_declared_sequence_length_dynamic(name, tmp_path):
    """The sequence length declared dynamic at prune time stays dynamic in the deployed
    files: ONNX Runtime runs the ONNX file, and a fresh process the reloaded .pt2, at another
    batch and sequence length (3 x 13, 1 x 5) than the example's (2 x 8)."""
    import onnx
    from spruce.targets.onnxruntime import run_onnx

    example, result = pruned(name)
    (part,) = deploy.parts(result.model, result.analysis.captured)
    path, error = deploy.save_onnx(part, tmp_path / "model.onnx")
    assert error <= 1e-4, error
    axes = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(path).graph.input]
    assert axes == [["batch", "seq"]] * len(example.example), axes
    compact = result.model.eval()
    for batch, seq in [(3, 13), (1, 5)]:
        other = example.inputs(batch, seq)
        with torch.no_grad():
            want = logits(compact(**other))
        got = torch.as_tensor(run_onnx(path, deploy.FlatCall(compact, (), other).flat((), other))[0])
        assert got.shape == want.shape, (batch, seq, got.shape)
        assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max())), (batch, seq)
    program = deploy.save_pt2(part, tmp_path / "model.pt2")
    at_other = deploy.Part("model", compact, ((), example.inputs(3, 13)), ((), example.inputs(1, 5)))
    errors = deploy.check_pt2_in_fresh_process([(program, at_other)])
    assert errors[0] <= 1e-5, errors


def test_compact_models_reload_from_pt2_in_a_fresh_process(tmp_path):
    assert_pt2_reloads_in_a_fresh_process({name: pruned(name)[1] for name in NAMES}, tmp_path)


def greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the model runs on the whole sequence at every length."""
    with torch.no_grad():
        for _ in range(steps):
            nxt = logits(model(input_ids=ids))[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("name", hf_examples.LLMS)
def test_llm_greedy_tokens_match_at_every_length(name):
    example, result = pruned(name)
    prompt = example.inputs(2, 5)["input_ids"]
    assert torch.equal(greedy(result.model, prompt, 8), greedy(result.masked, prompt, 8))


@pytest.mark.parametrize("name", hf_examples.LLMS)
def test_llm_comes_back_as_its_own_class(name, tmp_path):
    example, result = pruned(name)
    own = to_transformers(result.model, example.model)
    assert type(own) is type(example.model)
    config = own.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.intermediate_size == 32 and config.head_dim == example.head_dim
    prompt = example.inputs(1, 5)["input_ids"]
    with torch.no_grad():
        assert checks.relative_error(logits(result.masked(input_ids=prompt)), logits(own(input_ids=prompt))) <= 1e-5
    want = greedy(result.model, prompt, 8)
    own.save_pretrained(tmp_path)
    back = type(example.model).from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in own.parameters())
    got = back.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(got, want)


def test_write_back_refuses_what_a_config_cannot_hold():
    example, result = pruned("LlamaForCausalLM")
    distilbert = hf_examples.build("DistilBertModel").model  # a family without write-back
    with pytest.raises(ValueError, match="model type 'distilbert'"):
        to_transformers(distilbert, distilbert)
    kept = dict(result.kept)
    first = min(g.id for g in result.groups if g.prunable and g.size == 4)  # layer 0's query heads
    kept[first] = kept[first][:1]
    uneven = spruce.api.prune.remove_channels(result.analysis, example.model, kept)
    with pytest.raises(ValueError, match="num_attention_heads differs across layers"):
        to_transformers(uneven, example.model)


def test_taylor_head_importance_drops_a_dead_head():
    """A query head whose weights are zero in every key/value group scores 0 under Taylor
    importance (|sum w * dL/dw| over its query and output entries) and is pruned first."""
    example = hf_examples.build("LlamaForCausalLM")
    model = example.model
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for group in range(2):  # query head 1 of each key/value group (4 query heads per group)
            head = group * 4 + 1
            attn.q_proj.weight[head * 4:(head + 1) * 4] = 0
            attn.o_proj.weight[:, head * 4:(head + 1) * 4] = 0
    ids = example.example["input_ids"]
    result = spruce.prune(model, example.example, ratio=0.5, dynamic_shapes=example.dynamic_shapes,
                          importance="taylor", calibration=[{"input_ids": ids, "labels": ids}])
    group = next(g for g in result.groups if g.prunable and any(
        m.name == "model.layers.0.self_attn.q_proj.weight" for m in g.members))
    assert group.size == 4 and 1 not in result.kept[group.id].tolist()
    assert checks.head_error(result.masked, result.model, result.analysis.captured, example.inputs(2, 6)) <= 1e-4
    assert all(p.grad is None for p in model.parameters())  # the calibration left no gradients behind
    with pytest.raises(ValueError, match="calibration"):
        spruce.prune(model, example.example, ratio=0.5, importance="taylor", calibration=[])


def test_tied_embeddings_stay_tied():
    """GPT-2's input embedding and output projection are one tensor before and after."""
    example, result = pruned("GPT2LMHeadModel")
    assert example.model.lm_head.weight is example.model.transformer.wte.weight
    params = dict(result.model.named_parameters(remove_duplicate=False))
    tied = [t for name, t in params.items() if name.endswith(("lm_head.weight", "transformer.wte.weight"))]
    assert len(tied) >= 2 and len({id(t) for t in tied}) == 1


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("eval_graph."): v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_normalised_widths_prune_exactly_and_train(name):
    """normalised_widths: heads divide, embedding widths shrink where the residual width is
    free, compact == masked at two batch sizes and two sequence lengths, forward + backward."""
    example, result = pruned_normalised(name)
    for (q0, _), (q1, k1) in zip(heads(example, example.model), heads(example, result.model)):
        assert 1 <= q1 < q0 and q1 % k1 == 0
    captured = result.analysis.captured
    for batch in (1, 3):
        for seq in (5, 11):
            assert checks.head_error(result.masked, result.model, captured, example.inputs(batch, seq)) <= 1e-4
    if name in NORMALISED:
        embedding = NORMALISED[name]
        before, after = _state(example.model)[embedding], _state(result.model)[embedding]
        assert after.shape[-1] < before.shape[-1], (embedding, tuple(after.shape))
        assert result.analysis.norm_keeps(result.kept)  # masked norms in the masked model
        _, plain = pruned(name)
        assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in plain.model.parameters())
    else:
        assert not result.analysis.norm_keeps(result.kept)
    compact = result.model.train()
    compact.zero_grad()
    out = compact(**example.inputs(2, 6))
    loss = sum(t.float().mean() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
               and t.is_floating_point())
    loss.backward()
    assert torch.isfinite(loss) and checks.missing_gradients(compact, captured) == []
    compact.eval()


@pytest.mark.parametrize("name", sorted(NORMALISED))
def test_normalised_widths_deploy(name, tmp_path):
    """ONNX matches ONNX Runtime, and the .pt2 reloads in a fresh process."""
    _, result = pruned_normalised(name)
    programs = []
    for part in deploy.parts(result.model, result.analysis.captured):
        path, error = deploy.save_onnx(part, tmp_path / f"{part.name}.onnx")
        assert path.exists() and error <= 1e-4, (part.name, error)
        programs.append((deploy.save_pt2(part, tmp_path / f"{part.name}.pt2"), part))
    errors = deploy.check_pt2_in_fresh_process(programs)
    assert len(errors) == len(programs) and max(errors) <= 1e-5, errors


@pytest.mark.parametrize("name", hf_examples.LLMS)
def test_normalised_widths_llm_greedy_tokens_match(name):
    example, result = pruned_normalised(name)
    prompt = example.inputs(2, 5)["input_ids"]
    assert torch.equal(greedy(result.model, prompt, 8), greedy(result.masked, prompt, 8))


def test_normalised_widths_keep_gpt2_embeddings_tied():
    example, result = pruned_normalised("GPT2LMHeadModel")
    params = dict(result.model.named_parameters(remove_duplicate=False))
    tied = [t for name, t in params.items() if name.endswith(("lm_head.weight", "transformer.wte.weight"))]
    assert len(tied) >= 2 and len({id(t) for t in tied}) == 1
    assert tied[0].shape[1] < example.model.transformer.wte.weight.shape[1]
