"""Evaluation harness on the real bundled model and the bundled evaluation text (small slices:
a few windows of 128 tokens, so the whole file runs in about a minute on two cores)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval import (ReferenceLogprobs, eval_windows, evaluate, evaluate_reference, greedy_generate,
                         kl_divergence, measure_speed, model_memory_bytes, parse_metrics, perplexity,
                         reference_logprobs, size_report)
from lowbit.eval.kl import KLAccumulator, reference_cache_key, reference_cache_path

SEQ = 128


@pytest.fixture(scope="module")
def windows(smollm2):
    return eval_windows(smollm2.tokenizer, "wiki-evaluation", SEQ, 3 * SEQ)


@pytest.fixture(scope="module")
def reference(smollm2, windows):
    return reference_logprobs(smollm2.model, windows[:2], cache=False, progress=False)


@pytest.fixture(scope="module")
def rtn_models(smollm2):
    out = {}
    for name in ("w8-rtn", "w3g128-rtn"):
        m = copy.deepcopy(smollm2.model)
        out[name] = (m, api.quantize(m, name, progress=False))
    return out


@pytest.mark.model
def test_perplexity_of_real_model_is_sane_deterministic_and_counts_tokens(smollm2):
    m, tok = smollm2.model, smollm2.tokenizer
    a = perplexity(m, tok, seq_len=SEQ, max_tokens=2 * SEQ, progress=False)
    b = perplexity(m, tok, seq_len=SEQ, max_tokens=2 * SEQ + 50, progress=False)  # tail dropped
    assert a.ppl == b.ppl and a.nll_mean == b.nll_mean  # bit-for-bit the same
    assert a.windows == 2 and a.tokens_scored == 2 * (SEQ - 1)
    # SmolLM2-135M-Instruct on Wikipedia at 128-token windows: measured 16.7 (3 windows) / 13.1 (2)
    assert 8 < a.ppl < 40, a.ppl
    assert math.isclose(a.ppl, math.exp(a.nll_mean))
    assert "stride 128" in a.method and "float64" in a.method
    half = perplexity(m, tok, seq_len=SEQ, max_tokens=2 * SEQ, score="second-half", progress=False)
    assert half.tokens_scored == 2 * (SEQ - 1 - SEQ // 2)   # llama.cpp: n_ctx - 1 - n_ctx/2 per chunk
    assert "llama.cpp" in half.method and half.ppl != a.ppl
    with pytest.raises(LowbitError, match="score"):
        perplexity(m, tok, seq_len=SEQ, max_tokens=SEQ, score="middle")
    with pytest.raises(LowbitError, match="max_tokens"):
        perplexity(m, tok, seq_len=SEQ, max_tokens=SEQ - 1)


@pytest.mark.model
def test_kl_of_model_against_itself_is_exactly_zero(smollm2, reference):
    r = kl_divergence(smollm2.model, reference, progress=False)
    assert r.mean == 0.0 and r.max == 0.0 and r.p99 == 0.0
    assert r.top1_agreement == 1.0
    assert r.tokens == 2 * (SEQ - 1) and r.windows == 2


@pytest.mark.model
def test_rtn8_kl_far_below_rtn3_and_rides_on_the_perplexity_pass(smollm2, reference, rtn_models):
    q8, _ = rtn_models["w8-rtn"]
    q3, _ = rtn_models["w3g128-rtn"]
    k8 = kl_divergence(q8, reference, progress=False)
    k3 = kl_divergence(q3, reference, progress=False)
    # measured on these 254 tokens: w8 per-channel ~0.0024 nats, w3g128 ~0.3
    assert 0 < k8.mean < 0.02, k8.mean
    assert k3.mean > 20 * k8.mean, (k8.mean, k3.mean)
    assert k8.top1_agreement > 0.9 > k3.top1_agreement
    assert k8.p99 >= k8.median >= 0
    # the same KL computed inside evaluate(), on the perplexity pass, is the same number
    rec = evaluate(q8, smollm2.tokenizer, metrics="ppl,kl", reference=reference, seq_len=SEQ,
                   max_tokens=2 * SEQ, kl_max_tokens=2 * SEQ, progress=False)
    assert rec["kl"]["mean"] == k8.mean and rec["kl"]["top1_agreement"] == k8.top1_agreement
    assert rec["ppl"]["tokens_scored"] == 2 * (SEQ - 1)


@pytest.mark.model
def test_reference_cache_is_keyed_atomic_and_checked(smollm2, windows, tmp_path):
    m = smollm2.model
    ref = reference_logprobs(m, windows[:1], cache=True, cache_root=tmp_path, progress=False)
    path = reference_cache_path(ref.cache_key(), tmp_path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left
    back = ReferenceLogprobs.load(path)
    assert torch.equal(back.logprobs, ref.logprobs) and torch.equal(back.windows, ref.windows)
    assert back.logprobs.dtype == torch.float16 and back.logprobs.shape == (1, SEQ - 1, 49152)
    again = reference_logprobs(m, windows[:1], cache=True, cache_root=tmp_path, progress=False)
    assert torch.equal(again.logprobs, ref.logprobs)
    # different windows or score mode -> a different key
    assert reference_cache_key(ref.fingerprint, windows[1:2], "all") != ref.cache_key()
    assert reference_cache_key(ref.fingerprint, windows[:1], "second-half") != ref.cache_key()
    path.write_bytes(path.read_bytes()[:1000])  # truncated by a crash elsewhere
    with pytest.raises(LowbitError, match="unreadable"):
        ReferenceLogprobs.load(path)
    acc = KLAccumulator(ref)   # fed log-probs of other tokens than the reference's: refused
    with pytest.raises(LowbitError, match="does not match"):
        acc(0, ref.logprobs[0].float(), windows[1, 1:])


@pytest.mark.model
def test_size_accounting_matches_the_layout(smollm2, rtn_models):
    fp = size_report(smollm2.model, path=smollm2.path)
    assert fp["parameters"] == 134_515_008 and fp["quantized_weights"] == 0
    assert fp["bytes_per_param"] == 4.0 and fp["linear_bits_per_weight"] == 32.0
    assert fp["disk_bytes"] > fp["packed_bytes"] * 0.99
    m3, _ = rtn_models["w3g128-rtn"]
    s3 = size_report(m3)
    # golden, from the shapes: each row stores cols 3-bit codes and ceil(cols/128) groups of
    # (fp16 scale + 3-bit zero); q,k,v,o,gate,up read 576 columns (5 groups, the last of 64), down 1536
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    bits = sum(r * (c * 3 + -(-c // 128) * (16 + 3)) for r, c in shapes)
    assert s3["quantized_bits_per_weight"] == pytest.approx(bits / sum(r * c for r, c in shapes), rel=1e-12)
    assert s3["linear_bits_per_weight"] == s3["quantized_bits_per_weight"]
    assert s3["parameters"] == fp["parameters"]
    embed = 49152 * 576  # tied embedding/lm_head stays fp32, counted once
    assert s3["float_parameters"] == fp["parameters"] - s3["quantized_weights"]
    assert s3["packed_bytes"] == pytest.approx(30 * bits / 8 + s3["float_parameters"] * 4, abs=1)
    assert s3["float_parameters"] > embed
    assert model_memory_bytes(smollm2.model) == pytest.approx(134_515_008 * 4, rel=1e-3)
    assert model_memory_bytes(m3) < 0.5 * model_memory_bytes(smollm2.model)


@pytest.mark.model
def test_greedy_kv_cache_decoding_matches_transformers_generate(smollm2, windows):
    m, tok = smollm2.model, smollm2.tokenizer
    prompt = windows[0, :16]
    g = greedy_generate(m, prompt, 6)
    with torch.no_grad():
        ref = m.generate(prompt.view(1, -1), attention_mask=torch.ones(1, 16, dtype=torch.long),
                         max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert g.tokens == ref[0, 16:].tolist()
    assert g.decode_steps == 5 and g.prefill_seconds > 0 and g.decode_seconds > 0
    s = measure_speed(m, prompt, new_tokens=3, runs=2, warmup=1, progress=False)
    assert s.prompt_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert s.completion == g.tokens[:3] and len(s.prefill_seconds) == 2
    assert "median of 2 runs" in s.method and s.threads == torch.get_num_threads()


@pytest.mark.model
def test_evaluate_record_and_metric_selection(smollm2):
    m, tok = smollm2.model, smollm2.tokenizer
    rec, ref = evaluate_reference(m, tok, metrics="ppl,kl,size,memory", seq_len=SEQ, max_tokens=2 * SEQ,
                                  kl_max_tokens=SEQ, progress=False)
    assert rec["kl"]["mean"] == 0.0 and ref.n_windows == 1 and ref.tokens == SEQ - 1
    assert rec["ppl"]["tokens_scored"] == 2 * (SEQ - 1) and rec["memory"]["peak_rss_bytes"] > 0
    assert rec["settings"]["seq_len"] == SEQ and rec["env"]["threads"] == torch.get_num_threads()
    json.dumps(rec)
    with pytest.raises(LowbitError, match="needs a reference"):
        evaluate(m, tok, metrics="kl", seq_len=SEQ, max_tokens=SEQ, progress=False)
    with pytest.raises(LowbitError, match="subset of"):
        parse_metrics("ppl,bleu")


@pytest.mark.model
def test_cli_eval_against_itself_prints_table_and_writes_json(smollm2, tmp_path, capsys):
    out = tmp_path / "rec.json"
    rc = main(["eval", "smollm2-135m", "--ref", "smollm2-135m", "--seq-len", str(SEQ), "--max-tokens",
               str(SEQ), "--kl-tokens", str(SEQ), "--metrics", "ppl,kl,size", "--no-cache",
               "--no-progress", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "KL mean" in text and "top-1 agreement" in text and "method:" in text
    rec = json.loads(out.read_text())
    assert rec["ppl"]["tokens_scored"] == SEQ - 1 and rec["kl"]["tokens"] == SEQ - 1
    assert rec["kl"]["mean"] == 0.0 and rec["kl"]["top1_agreement"] == 1.0
    assert rec["size"]["source_bytes"] > 0 and rec["size"]["disk_bytes"] > 0
    # the CLI's perplexity is the library's, to the bit
    assert rec["ppl"]["ppl"] == perplexity(smollm2.model, smollm2.tokenizer, seq_len=SEQ, max_tokens=SEQ,
                                           progress=False).ppl


@pytest.mark.slow
@pytest.mark.model
def test_cli_eval_recipe_quantizes_in_process_and_measures_kl(smollm2, rtn_models, tmp_path, capsys):
    out = tmp_path / "rec.json"
    rc = main(["eval", "smollm2-135m", "--recipe", "w8-rtn", "--seq-len", str(SEQ), "--max-tokens",
               str(SEQ), "--kl-tokens", str(SEQ), "--metrics", "ppl,kl,size", "--no-cache",
               "--no-progress", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["recipe"]["name"] == "w8-rtn" and rec["model"]["quant_linears"] == 210
    assert 0 < rec["kl"]["mean"] < 0.02
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    w8_bits = sum(r * (c * 8 + 16) for r, c in shapes) / sum(r * c for r, c in shapes)  # + fp16 scale/row
    assert rec["size"]["linear_bits_per_weight"] == pytest.approx(w8_bits, rel=1e-12)
    q8, _ = rtn_models["w8-rtn"]   # same recipe, deterministic: the same weights
    assert rec["ppl"]["ppl"] == perplexity(q8, smollm2.tokenizer, seq_len=SEQ, max_tokens=SEQ,
                                           progress=False).ppl


def test_cli_eval_missing_or_corrupt_model_gives_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    assert main(["eval", str(tmp_path / "nope.gguf"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lowbit eval: error:" in err and "no such built-in name, file or directory" in err
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    assert main(["eval", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not be read as a GGUF" in err and "broken.gguf" in err
    (tmp_path / "hf").mkdir()
    assert main(["eval", str(tmp_path / "hf"), "--no-progress"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["eval", "smollm2-135m", "--metrics", "kl", "--no-progress"]) == 2
    assert "needs a reference" in capsys.readouterr().err
