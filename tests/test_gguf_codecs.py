"""ggml block codecs: bit-exact against gguf-py and against llama.cpp's own encoder (golden vectors).

Tiers: golden bytes from ggml_quantize_chunk (tests/golden/README.md), gguf-py's numpy codecs
(the real package, installed as a lowbit dependency), and quality thresholds on small tensors.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lowbit.errors import LowbitError
from lowbit.numerics.ggml import QUANTIZED_TYPES, dequantize, ggml_type, quantize

GOLDEN = Path(__file__).parent / "golden" / "ggml_golden.npz"
CASES = ("smollm2_ffn_down", "synthetic")
GGUF_ENCODES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0")  # types gguf-py can quantize


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("t", QUANTIZED_TYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tag", ("ref", "imatrix"))
def test_encoder_bytes_equal_llama_cpp(golden, t, case, tag):
    """Our encoder gives ggml_quantize_chunk's exact bytes, without and with an imatrix."""
    x = golden[f"{case}/x"]
    imp = golden[f"{case}/imatrix"] if tag == "imatrix" else None
    ours = quantize(x, t, imatrix=imp).ravel()
    ref = golden[f"{case}/{t}/{tag}"]
    assert ours.shape == ref.shape
    if not np.array_equal(ours, ref):
        ts = ggml_type(t).type_size
        bad = np.flatnonzero((ours.reshape(-1, ts) != ref.reshape(-1, ts)).any(axis=1))
        pytest.fail(f"{t}/{tag}/{case}: {bad.size} of {ours.size // ts} blocks differ, first {bad[:5]}")


@pytest.mark.parametrize("t", QUANTIZED_TYPES)
@pytest.mark.parametrize("case", CASES)
def test_decoder_bit_exact_vs_gguf_and_ggml(golden, t, case):
    """Decoding llama.cpp's bytes: bit-identical to gguf.quants.dequantize and to ggml's to_float."""
    x = golden[f"{case}/x"]
    for tag in ("ref", "imatrix"):
        blob = golden[f"{case}/{t}/{tag}"]
        ours = dequantize(blob, t, x.shape)
        ref = gguf_dequantize(blob.reshape(x.shape[0], -1), GGMLQuantizationType[t])
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{t}/{tag}: differs from gguf"
        digest = hashlib.sha256(np.ascontiguousarray(ours).tobytes()).hexdigest()
        assert digest == str(golden[f"{case}/{t}/{tag}/decode_sha256"]), f"{t}/{tag}: differs from ggml to_float"


@pytest.mark.parametrize("t", GGUF_ENCODES)
def test_encoder_bytes_equal_gguf_quantize(t):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((48, 768)) * rng.uniform(1e-3, 2.0, (48, 1))).astype(np.float32)
    x[0, :32] = 0
    x[1, 7] = 50.0
    x[2] = np.abs(x[2])
    ref = gguf_quantize(x, GGMLQuantizationType[t])
    assert np.array_equal(quantize(x, t), ref)


@pytest.mark.parametrize("t", QUANTIZED_TYPES)
def test_round_trip_decoder_matches_gguf_on_random_bytes(t):
    """Any byte pattern (not only encoder output) decodes as gguf does, inf/NaN scales included."""
    gt = ggml_type(t)
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=(6, gt.row_bytes(512)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf_dequantize(raw, GGMLQuantizationType[t])
        ours = dequantize(raw, t, (6, 512))
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    assert same.all()


# quality floor per type on N(0,1) rows: SQNR (dB) well inside what the format gives
SQNR_FLOOR = {"Q4_0": 17.5, "Q4_1": 18.5, "Q5_0": 23.5, "Q5_1": 24.5, "Q8_0": 40.0, "Q2_K": 8.0,
              "Q3_K": 14.0, "Q4_K": 19.0, "Q5_K": 25.0, "Q6_K": 31.0, "TQ1_0": 1.0, "TQ2_0": 1.0}


@pytest.mark.parametrize("t", QUANTIZED_TYPES)
def test_quality_and_imatrix_weighting(t):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    err = dequantize(quantize(x, t), t, x.shape) - x
    sqnr = 10 * np.log10((x ** 2).sum() / (err ** 2).sum())
    assert sqnr > SQNR_FLOOR[t], f"{t}: SQNR {sqnr:.1f} dB"
    if t in ("Q8_0", "TQ1_0", "TQ2_0"):
        return  # ggml ignores the imatrix for these
    imp = np.ones(1024, dtype=np.float32)
    imp[::4] = 100.0                                  # every 4th column matters 100x
    err_w = dequantize(quantize(x, t, imatrix=imp), t, x.shape) - x
    weighted = lambda e: float((imp * e ** 2).sum())  # noqa: E731
    assert weighted(err_w) < weighted(err), f"{t}: imatrix did not lower the weighted error"


def test_deterministic_and_chunking_invariant(monkeypatch):
    import lowbit.numerics.ggml as g
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 512)).astype(np.float32)
    imp = rng.uniform(0.1, 3, 512).astype(np.float32)
    a = quantize(x, "Q4_K", imatrix=imp)
    monkeypatch.setattr(g, "CHUNK_WEIGHTS", 512 * 3)   # 3 rows per encoder call
    assert np.array_equal(quantize(x, "Q4_K", imatrix=imp), a)


def test_bad_input_is_refused():
    x = np.ones((4, 512), dtype=np.float32)
    with pytest.raises(LowbitError, match="multiple of Q4_K's block of 256"):
        quantize(np.ones((4, 576), np.float32), "Q4_K", name="blk.0.attn_q.weight")
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(LowbitError, match="NaN/inf"):
        quantize(bad, "Q8_0")
    with pytest.raises(LowbitError, match="one per column"):
        quantize(x, "Q4_K", imatrix=np.ones(10, np.float32))
    with pytest.raises(LowbitError, match="negative"):
        quantize(x, "Q4_K", imatrix=-np.ones(512, np.float32))
    with pytest.raises(LowbitError, match="unknown"):
        quantize(x, "Q7_K")
    with pytest.raises(LowbitError, match="must be"):
        dequantize(np.zeros(10, np.uint8), "Q4_0", (4, 512))


@pytest.mark.parametrize("t", ("Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
def test_refine_never_worse_per_block(golden, t):
    """lowbit's refinement starts from ggml's bytes and lowers (or keeps) every block's weighted
    error; the result is a valid block of the same type (gguf-py decodes it identically)."""
    from lowbit.methods.ggml_refine import importance, refine
    x = golden["smollm2_ffn_down/x"]
    imp = golden["smollm2_ffn_down/imatrix"] + np.float32(0.01)
    base = quantize(x, t, imatrix=imp)
    ref = refine(t, x, imp, base)
    w = importance(x, imp)
    bs = ggml_type(t).block_size
    def block_err(blob):
        d = dequantize(blob, t, x.shape) - x
        return (w * d * d).reshape(-1, bs).sum(1)
    e0, e1 = block_err(base), block_err(ref)
    assert (e1 <= e0 * (1 + 1e-6)).all()
    assert e1.sum() < e0.sum()
    ours = dequantize(ref, t, x.shape)
    assert np.array_equal(ours, gguf_dequantize(ref, GGMLQuantizationType[t]))
    assert np.array_equal(refine(t, x, None, base), base)          # no imatrix: ggml's bytes kept
