"""Property: prune -> write back (spruce.to_transformers) -> save_pretrained -> from_pretrained
gives the compact model's logits, for drawn small Llama and Qwen3 configs (query heads, key/value
heads, head_dim, tied embeddings, biases, layers). Ten examples, tiny widths: seconds each."""

from __future__ import annotations

import tempfile

import pytest
import spruce
import torch
from helpers import randomise_transformer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spruce.api import checks
from spruce.api.transformers import to_transformers

T = pytest.importorskip("transformers")

VOCAB = 48


@st.composite
def configs(draw):
    family = draw(st.sampled_from(["llama", "qwen3"]))
    kv_heads = draw(st.integers(1, 2))
    fields = dict(vocab_size=VOCAB, hidden_size=draw(st.sampled_from([16, 24])), intermediate_size=32,
                  num_hidden_layers=draw(st.integers(1, 2)), num_key_value_heads=kv_heads,
                  num_attention_heads=kv_heads * draw(st.integers(1, 3)), head_dim=draw(st.sampled_from([4, 8])),
                  tie_word_embeddings=draw(st.booleans()), attention_bias=draw(st.booleans()),
                  max_position_embeddings=64, bos_token_id=0, eos_token_id=None, pad_token_id=None)
    if family == "llama":
        fields["mlp_bias"] = draw(st.booleans())
        return T.LlamaForCausalLM, T.LlamaConfig(**fields)
    return T.Qwen3ForCausalLM, T.Qwen3Config(**fields)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=configs(), seed=st.integers(0, 3))
def test_write_back_and_reload_equal_the_compact_model(drawn, seed):
    cls, config = drawn
    torch.manual_seed(seed)
    source = randomise_transformer(cls(config), seed=seed)
    example = {"input_ids": torch.randint(0, VOCAB, (2, 6))}
    result = spruce.prune(source, example, ratio=0.5, seed=seed)
    own = to_transformers(result.model, source)
    assert type(own) is cls
    ids = {"input_ids": torch.randint(0, VOCAB, (2, 6))}
    with torch.no_grad():
        want = result.model(**ids).logits
        assert checks.relative_error(want, own(**ids).logits) <= 1e-5
        with tempfile.TemporaryDirectory() as folder:
            own.save_pretrained(folder)
            back = cls.from_pretrained(folder).eval()
            assert checks.relative_error(want, back(**ids).logits) <= 1e-5
    assert back.config.num_attention_heads % back.config.num_key_value_heads == 0
    if config.tie_word_embeddings:
        assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    if config.num_attention_heads // config.num_key_value_heads > 1:  # heads to lose in each group
        assert back.config.num_attention_heads < config.num_attention_heads
    assert back.config.intermediate_size == 16
