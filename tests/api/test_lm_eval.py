"""Language-model evaluation and decoding on tiny random-init transformers decoders (the zoo's
Llama and Qwen2) and spruce's compact twin of one: perplexity, agreement, greedy continuations
with a key/value cache, decode and prefill timing, the decode timer the budget loop takes."""

from __future__ import annotations

import math

import pytest
import spruce
import torch
from spruce.runtime.decode import (
    DecodeTimer,
    greedy_decode,
    left_pad,
    measure_decode,
    measure_prefill_artifacts,
)
from spruce.runtime.lm_eval import (
    continuation_agreement,
    evaluate_lm,
    footprint,
    next_token_agreement,
    perplexity,
    prompts_from_batches,
    removed_structures,
)
from spruce.zoo.transformers import VOCAB, build


@pytest.fixture(scope="module")
def example():
    return build("LlamaForCausalLM")


@pytest.fixture(scope="module")
def llama(example):
    return example.model.eval()


@pytest.fixture(scope="module")
def pruned(example, llama):
    """The compact twin (sequence length declared dynamic) and it written back to transformers."""
    compact = spruce.prune(llama, example.example, ratio=0.5, dynamic_shapes=example.dynamic_shapes).model.eval()
    return compact, spruce.to_transformers(compact, llama).eval()


def _ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _right_padded(seed: int = 0) -> dict:
    ids = _ids(3, 12, seed)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_perplexity_is_exp_of_the_models_own_loss_on_an_unpadded_batch(llama):
    ids = _ids(2, 16, 1)
    loss = llama(input_ids=ids, labels=ids, use_cache=False).loss.detach()
    measured = perplexity(llama, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}])
    assert measured.tokens == 2 * 15
    assert measured.value == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert perplexity(llama, [ids]).value == measured.value == perplexity(llama, [(ids, None)]).value  # bare ids


def test_perplexity_skips_pads_and_weights_tokens(llama):
    batch = _right_padded()
    measured = perplexity(llama, [batch])
    assert measured.tokens == 11 + 6 + 2
    # each row alone, unpadded: the same summed NLL (right padding changes no real position)
    nll = 0.0
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        real = row[mask.bool()][None]
        nll += float(llama(input_ids=real, labels=real, use_cache=False).loss.detach()) * (real.shape[1] - 1)
    assert measured.nll == pytest.approx(nll, rel=1e-5)
    # two batches count their tokens once each: the token-weighted mean, not the batches' mean
    other = {"input_ids": _ids(1, 5, 2), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "labels": _ids(1, 5, 2)}
    both = perplexity(llama, [batch, other])
    alone = perplexity(llama, [other])
    assert both.tokens == measured.tokens + alone.tokens
    assert both.value == pytest.approx(math.exp((measured.nll + alone.nll) / both.tokens), rel=1e-9)
    with pytest.raises(ValueError, match="no label"):
        perplexity(llama, [{"input_ids": _ids(1, 4, 0), "labels": torch.full((1, 4), -100)}])


def test_agreement_of_a_model_with_itself_is_one_and_with_another_below(llama, pruned):
    batches = [_right_padded(0), _right_padded(1)]
    assert next_token_agreement(llama, llama, batches) == 1.0
    other = build("LlamaForCausalLM", seed=5).model.eval()
    assert next_token_agreement(llama, other, batches) < 1.0
    prompts = prompts_from_batches(batches, prompt_tokens=6, count=4)
    same = continuation_agreement(llama, llama, prompts, new_tokens=6)
    assert (same.token_agreement, same.prefix_tokens, same.identical) == (1.0, 6.0, 1.0)
    differ = continuation_agreement(llama, other, prompts, new_tokens=6)
    assert differ.token_agreement < 1.0 and differ.prefix_tokens < 6.0


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_greedy_decode_with_the_cache_is_generate_and_left_padding_changes_nothing(name):
    model = build(name).model.eval()
    prompts = [_ids(1, n, n)[0] for n in (5, 9, 7, 12, 3, 8, 10, 6)]
    ids, mask = left_pad(prompts, pad_token_id=0)
    batch = greedy_decode(model, ids, mask, new_tokens=8)
    single = torch.cat([greedy_decode(model, p[None], new_tokens=8) for p in prompts])
    assert torch.equal(batch, single)
    generated = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                               pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(batch, generated)
    with pytest.raises(ValueError, match="left-padded"):
        greedy_decode(model, ids, mask.flip(1), new_tokens=2)


def test_the_compact_twin_and_its_transformers_model_agree(llama, pruned):
    compact, written = pruned
    batches = [_right_padded(3)]
    assert perplexity(compact, batches).value == pytest.approx(perplexity(written, batches).value, rel=1e-5)
    prompts = [_ids(1, n, n)[0] for n in (4, 7)]
    ids, mask = left_pad(prompts, 0)
    assert torch.equal(greedy_decode(compact, ids, mask, 5), greedy_decode(written, ids, mask, 5))
    removed = removed_structures(llama, written)
    assert removed["config"]["intermediate_size"] == [64, written.config.intermediate_size]
    assert removed["parameters"]["model.layers.0.mlp.up_proj.weight"][1][0] == written.config.intermediate_size
    small, big = footprint(written), footprint(llama)
    assert small.parameters < big.parameters and small.parameter_bytes == 4 * small.parameters
    config = llama.config
    assert big.kv_bytes_per_token == 2 * config.num_hidden_layers * config.num_key_value_heads * 4 * 4
    report = evaluate_lm(llama, written, batches, prompts, new_tokens=4).to_dict()
    assert report["perplexity_ratio"] == pytest.approx(report["compiled_perplexity"] / report["dense_perplexity"])
    assert 0.0 <= report["next_token_agreement"] <= 1.0 and report["continuations"]["new_tokens"] == 4


def test_decode_timing_rows_and_the_budget_timer(llama, pruned):
    _, written = pruned
    prompts = [_ids(1, n, n)[0] for n in (6, 9)]
    rows = measure_decode({"dense": llama, "compiled": written}, prompts, (1, 8), new_tokens=4, warmup=1, rounds=3)
    assert [(r.which, r.batch_size) for r in rows] == [("dense", 1), ("compiled", 1), ("dense", 8), ("compiled", 8)]
    assert all(r.ms_per_token > 0 and r.tokens_per_s == pytest.approx(r.batch_size * 1e3 / r.ms_per_token)
               for r in rows)
    with pytest.raises(ValueError, match="key/value cache"):
        measure_decode({"twin": pruned[0]}, prompts, (1,), new_tokens=4)
    timer = DecodeTimer(new_tokens=3)
    timings = timer.measure_models([(llama, (_ids(1, 8, 0),)), (written, (_ids(1, 8, 0),))], warmup=1, rounds=3)
    assert len(timings) == 2 and all(t.robust_ms() > 0 for t in timings)
    with pytest.raises(ValueError, match="token ids"):
        timer.measure_models([(llama, (torch.randn(1, 8),))])


def test_prefill_of_built_artifacts_at_several_lengths(tmp_path, pruned):
    from spruce.targets.base import get_target

    target = get_target("onnxruntime")
    compact, _ = pruned
    example = _ids(1, 8, 0)
    artifact = target.build(compact, (example,), tmp_path / "model.onnx")
    rows = measure_prefill_artifacts({"compiled": artifact}, target, (8,), vocab_size=VOCAB, warmup=1, rounds=3)
    assert [(r.which, r.length) for r in rows] == [("compiled", 8)] and rows[0].ms > 0
