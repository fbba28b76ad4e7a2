"""Model loading (real bundled model) and the bundled text."""
from __future__ import annotations

import pytest
import torch

from lowbit.data import calibration_batches, load_text, token_windows, tokenize_text
from lowbit.errors import LowbitError
from lowbit.models import load_model, resolve_source


def test_calibration_and_evaluation_texts_are_disjoint():
    cal, ev = load_text("wiki-calibration"), load_text("wiki-evaluation")
    cal_titles = {ln for ln in cal.splitlines() if ln.startswith("= ")}
    ev_titles = {ln for ln in ev.splitlines() if ln.startswith("= ")}
    assert len(ev_titles) >= 15 and len(cal_titles) >= 60
    assert not cal_titles & ev_titles
    ev_paras = set(ev.split("\n\n"))
    assert not ev_paras & set(cal.split("\n\n"))


def test_text_sources_accept_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_text(tmp_path) == "first\n\nsecond"
    assert load_text(tmp_path / "a.txt") == "first"
    with pytest.raises(LowbitError, match="not a named text"):
        load_text(tmp_path / "missing.txt")


@pytest.mark.model
def test_bundled_model_loads_with_tied_head(smollm2):
    m = smollm2.model
    assert m.config.model_type == "llama" and m.config.hidden_size == 576
    assert len(m.model.layers) == 30
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert smollm2.source_sha256 and len(smollm2.source_sha256) == 64
    assert next(m.parameters()).dtype == torch.float32


@pytest.mark.model
def test_calibration_batches_are_seeded_and_checked(smollm2):
    tok = smollm2.tokenizer
    a = calibration_batches(tok, n_samples=8, seq_len=128, seed=1)
    b = calibration_batches(tok, n_samples=8, seq_len=128, seed=1)
    c = calibration_batches(tok, n_samples=8, seq_len=128, seed=2)
    assert a.shape == (8, 128) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(LowbitError, match="samples were requested"):
        calibration_batches(tok, n_samples=10**6, seq_len=2048)
    ids = tokenize_text(tok, load_text("wiki-evaluation"))
    assert ids.numel() > 50_000
    assert token_windows(ids, 512, max_windows=3).shape == (3, 512)


def test_missing_model_error_says_how_to_get_one(tmp_path):
    with pytest.raises(LowbitError, match="Built-in names"):
        resolve_source(tmp_path / "nope")
    with pytest.raises(LowbitError, match="config.json"):
        resolve_source(tmp_path)


def test_corrupt_gguf_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(LowbitError, match="could not be read as a GGUF"):
        load_model(bad)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
