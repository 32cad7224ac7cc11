"""Depth pruning (spruce.prune_depth, block_importance, choose_blocks, remove_blocks): whole
residual blocks removed exactly (compact == the model with the blocks' branches zeroed) from
torchvision's ResNet and tiny transformers decoders; the importance oracles (a near-identity
layer is ranked last and removed first; skip-one scores equal the loss of the model with the
layer deleted, exhaustively); and write-back after a *middle* layer was removed (with and
without a pruned hidden width): num_hidden_layers, layer_types, max_window_layers and
layer_idx renumbered, cached generate equal to the compact model's greedy tokens, and a
reload in a fresh process without spruce within 1e-5."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import spruce
import torch
from helpers import randomize
from spruce.api.depth import choose_blocks, prune_depth, remove_blocks
from spruce.api.transformers import to_transformers
from spruce.capture.capture import capture
from spruce.passes.depth import residual_blocks

T = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

VOCAB = 64
SEQ = {"input_ids": {1: torch.export.Dim("seq", min=2, max=64)}}


def test_resnet_identity_blocks_are_found_and_removed_exactly():
    torch.manual_seed(0)
    model = randomize(torchvision.models.resnet18(num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    blocks = residual_blocks(capture(model, x).eval)
    # the first block of stages 2-4 has a projection shortcut (downsample): no residual block
    assert [b.path for b in blocks] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert blocks[1].zeroed == ("layer1.1.bn2.weight", "layer1.1.bn2.bias")
    result = prune_depth(model, x, ratio=0.4)
    assert len(result.removed) == 2
    assert not any(n.startswith(tuple(p + "." for p in result.removed)) for n, _ in result.model.named_parameters())
    other = torch.randn(3, 3, 40, 40)
    for mode in (False, True):  # the training graph (batch statistics) too
        result.model.train(mode)
        result.masked.train(mode)
        with torch.no_grad():
            compact, masked, dense = result.model(other), result.masked(other), model.train(mode)(other)
        assert torch.allclose(compact, masked, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(compact, dense, atol=1e-3)  # the blocks did matter
    model.eval()


def _decoder(config_cls=None, layers: int = 4, seed: int = 0, **fields):
    config_cls = config_cls or T.LlamaConfig
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                        eos_token_id=None, pad_token_id=None, **fields)
    model = getattr(T, config_cls.__name__.replace("Config", "ForCausalLM"))(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights N(0, 0.2), norm weights U(0.5, 1.5): every layer matters
        for name, param in model.named_parameters():
            param.copy_(torch.rand(param.shape, generator=gen) + 0.5 if "norm" in name
                        else torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out.logits


def test_near_identity_layer_is_ranked_last_and_removed_first():
    model = _decoder()
    with torch.no_grad():  # layer 2 is near the identity: its output projections are ~0
        for proj in (model.model.layers[2].self_attn.o_proj, model.model.layers[2].mlp.down_proj):
            proj.weight.mul_(1e-4)
    example = {"input_ids": _ids(2, 8)}
    result = spruce.prune_depth(model, example, ratio=0.25, dynamic_shapes=SEQ)
    scores = result.scores
    assert list(scores) == [f"model.layers.{i}" for i in range(4)]
    assert min(scores, key=scores.get) == "model.layers.2"
    assert scores["model.layers.2"] < 1e-3 < min(v for k, v in scores.items() if k != "model.layers.2")
    assert result.removed == ["model.layers.2"]
    assert not any(".layers.2." in n for n in result.model.state_dict())
    for batch, seq in ((1, 5), (3, 11)):  # compact == masked at two batch sizes and two lengths
        ids = _ids(batch, seq, seed=seq)
        with torch.no_grad():
            compact, masked = _logits(result.model(input_ids=ids)), _logits(result.masked(input_ids=ids))
        assert torch.allclose(compact, masked, atol=1e-5), (compact - masked).abs().max()


def _without_layer(model, index: int):
    """``model`` with decoder layer ``index`` deleted by hand (the exhaustive oracle)."""
    short = copy.deepcopy(model)
    del short.model.layers[index]
    for i, layer in enumerate(short.model.layers):
        layer.self_attn.layer_idx = i
    short.config.num_hidden_layers -= 1
    return short


def test_skip_scores_equal_the_loss_of_each_layer_deleted_exhaustively():
    model = _decoder(seed=3)
    ids = _ids(2, 8, seed=4)
    batch = {"input_ids": ids, "labels": ids}
    scores = spruce.block_importance(model, [batch], criterion="skip", dynamic_shapes={**SEQ, "labels": SEQ[
        "input_ids"]})
    with torch.no_grad():
        base = float(model(**batch).loss)
        exhaustive = {f"model.layers.{i}": float(_without_layer(model, i)(**batch).loss) - base for i in range(4)}
    assert min(scores, key=scores.get) == min(exhaustive, key=exhaustive.get)
    for name in scores:
        assert scores[name] == pytest.approx(exhaustive[name], abs=1e-4)


def test_choose_blocks_by_ratio_and_budget():
    scores = {"a": 0.3, "b": 0.1, "c": 0.2, "d": 0.1}
    assert choose_blocks(scores, ratio=0.5) == ["b", "d"]  # ties keep the earlier block first
    assert choose_blocks(scores, ratio=0.99) == ["b", "d", "c"]  # one block always stays
    costs = {"a": 4, "b": 1, "c": 5, "d": 2}
    assert choose_blocks(scores, budget=9, costs=costs) == ["b", "d"]
    assert choose_blocks(scores, budget=12, costs=costs) == []
    with pytest.raises(ValueError, match="not reachable"):
        choose_blocks(scores, budget=3, costs=costs)
    with pytest.raises(ValueError, match="either ratio or budget"):
        choose_blocks(scores)


def _greedy(model, ids, steps: int):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, _logits(model(input_ids=ids))[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


RELOAD = textwrap.dedent("""
    import json, sys, torch, transformers
    for folder in sys.argv[1:]:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        checks = torch.load(folder + "/checks.pt")
        with torch.no_grad():
            logits = model(input_ids=checks["ids"]).logits
            tokens = model.generate(checks["prompt"], max_new_tokens=10, do_sample=False, use_cache=True)
        layer_idx = [layer.self_attn.layer_idx for layer in model.model.layers]
        types = getattr(model.config, "layer_types", None)
        torch.save({"logits": logits, "tokens": tokens, "layer_idx": layer_idx, "layer_types": types},
                   folder + "/reloaded.pt")
    print(json.dumps({"spruce_imported": any(m.split(".")[0] == "spruce" for m in sys.modules)}))
""")

# name -> (model, prune keywords or None for depth only, the middle layer removed)
WRITE_BACK = {
    "qwen2_sliding": (lambda: _decoder(T.Qwen2Config, use_sliding_window=True, max_window_layers=2,
                                       sliding_window=4), None, "model.layers.1"),
    "llama_hidden": (lambda: _decoder(T.LlamaConfig, layers=3, attention_bias=True), {"normalised_widths": True},
                     "model.layers.1"),
}


def test_write_back_after_a_middle_layer_was_removed(tmp_path):
    folders, expected = [], {}
    for name, (build, options, middle) in WRITE_BACK.items():
        source = build()
        example = {"input_ids": _ids(2, 8)}
        if options is None:
            compact = spruce.prune_depth(source, example, ratio=0.0, dynamic_shapes=SEQ).model
        else:
            compact = spruce.prune(source, example, ratio=0.5, dynamic_shapes=SEQ, **options).model
        compact = remove_blocks(compact, [middle])
        own = to_transformers(compact, source)
        layers = source.config.num_hidden_layers
        assert own.config.num_hidden_layers == layers - 1
        assert [layer.self_attn.layer_idx for layer in own.model.layers] == list(range(layers - 1))
        if name == "qwen2_sliding":
            assert own.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
            assert own.config.max_window_layers == 1
        else:
            assert own.config.hidden_size == 16
        ids, prompt = _ids(2, 9, seed=7), _ids(1, 5, seed=8)
        with torch.no_grad():
            assert torch.allclose(_logits(own(input_ids=ids)), _logits(compact(input_ids=ids)), atol=1e-5)
            tokens = own.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        assert torch.equal(tokens, _greedy(compact, prompt, 10))  # 15 tokens: past the sliding window of 4
        folder = tmp_path / name
        own.save_pretrained(folder)
        torch.save({"ids": ids, "prompt": prompt}, folder / "checks.pt")
        folders.append(str(folder))
        with torch.no_grad():
            expected[name] = (_logits(compact(input_ids=ids)), tokens, getattr(own.config, "layer_types", None))
    run = subprocess.run([sys.executable, "-c", RELOAD, *folders], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"spruce_imported": False}
    for name, folder in zip(WRITE_BACK, folders):
        reloaded = torch.load(f"{folder}/reloaded.pt")
        logits, tokens, layer_types = expected[name]
        assert (reloaded["logits"] - logits).abs().max() <= 1e-5
        assert torch.equal(reloaded["tokens"], tokens)
        assert reloaded["layer_idx"] == list(range(len(reloaded["layer_idx"])))
        assert reloaded["layer_types"] == layer_types


def test_remove_blocks_refuses_a_model_in_pieces_and_unknown_blocks():
    with pytest.raises(ValueError, match="is no graph"):
        remove_blocks(torch.nn.Linear(2, 2), ["x"])


def test_gpt2_written_back_without_a_layer_keeps_its_tied_embeddings():
    config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
                          eos_token_id=None)
    torch.manual_seed(0)
    source = randomize(T.GPT2LMHeadModel(config)).eval()
    compact = spruce.prune_depth(source, {"input_ids": _ids(2, 8)}, ratio=0.0, dynamic_shapes=SEQ).model
    compact = remove_blocks(compact, ["transformer.h.1"])
    own = to_transformers(compact, source)
    assert own.config.n_layer == 2 and [h.attn.layer_idx for h in own.transformer.h] == [0, 1]
    assert own.lm_head.weight is own.transformer.wte.weight
    prompt = _ids(1, 5, seed=8)
    with torch.no_grad():
        ids = _ids(2, 9, seed=7)
        assert torch.allclose(own(input_ids=ids).logits, _logits(compact(input_ids=ids)), atol=1e-5)
        tokens = own.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(tokens, _greedy(compact, prompt, 8))
