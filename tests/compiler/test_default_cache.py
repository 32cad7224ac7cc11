"""The embedded default's trained weights are cached: a second identical training is a load that
leaves the model, its log and the random states exactly as training would; anything the weights
depend on changes the key; a damaged entry is trained again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spruce.compiler.datasets import default_model, load_data
from spruce.compiler.default_cache import CACHE_ENV, default_cache_dir, trained_default


def run(cache: Path, seed: int = 0, lr: float = 0.05):
    data = load_data("digits", seed=seed, batch_size=64)
    model = default_model(data, seed)
    log, cached = trained_default(model, data, seed, epochs=1, lr=lr, optimizer="sgd", quiet=True, cache_dir=cache)
    return model, log, cached, torch.get_rng_state(), data.train.generator.get_state()


def test_a_second_training_loads_what_the_first_left(tmp_path):
    model, log, cached, rng, loader_rng = run(tmp_path)
    assert not cached and len(list(tmp_path.iterdir())) == 1
    torch.manual_seed(1234)  # whatever the global state was, a hit leaves it as training did
    again, log_again, cached_again, rng_again, loader_rng_again = run(tmp_path)
    assert cached_again
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert log_again.loss == log.loss and log_again.accuracy == log.accuracy
    assert torch.equal(rng, rng_again) and torch.equal(loader_rng, loader_rng_again)


def test_the_key_follows_seed_and_training_options_and_a_damaged_entry_is_retrained(tmp_path):
    run(tmp_path)
    assert not run(tmp_path, seed=1)[2]
    assert not run(tmp_path, lr=0.02)[2]
    assert len(list(tmp_path.iterdir())) == 3
    for entry in tmp_path.iterdir():
        entry.write_bytes(entry.read_bytes()[:100])  # truncated
    model, _, cached, _, _ = run(tmp_path)
    assert not cached and run(tmp_path)[2]  # trained again, and the entry replaced


def test_the_cache_folder_honours_its_variable_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "spruce" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "spruce" / "models"


def test_an_unwritable_cache_costs_only_the_cache(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="could not be cached"):
        _, _, cached, _, _ = run(blocked / "cache")
    assert not cached
