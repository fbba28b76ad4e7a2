"""Ternary ggml types TQ1_0 and TQ2_0 (BitNet b1.58 / TriLM weights; llama.cpp PR #8151).

Both store 256 weights as trits t in {0,1,2} (value (t - 1) * d) with one fp16 absmax scale d,
rounding x/d half away from zero (lroundf). The imatrix is ignored, as ggml does.

    TQ1_0  qs[48] | qh[4] | d       1.6875 bits/weight
           qs[m], m < 32:    trits of e = m + 32n,        n = 0..4 (n = 0 most significant)
           qs[32 + m], m<16: trits of e = 160 + m + 16n,  n = 0..4
           qh[j], j < 4:     trits of e = 240 + j + 4n,   n = 0..3, then x3 (a 5th, zero trit)
           a byte holding trits v = sum t_n 3^(4-n) is stored as ceil(v * 256 / 243), so that
           trit n reads back as ((byte * 3^n mod 256) * 3) >> 8
    TQ2_0  qs[64] | d               2.0625 bits/weight
           qs[32c + m] bits 2n: t of e = 128c + 32n + m
"""
from __future__ import annotations

import numpy as np

from lowbit.numerics.ggml.types import F32, QK_K, fp16_bytes, fp16_from_bytes, register_codec, round_away


def _trits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, n) -> (d (nb,), trits (nb, 256) uint16 in {0,1,2})."""
    X = x.reshape(-1, QK_K)
    d = np.abs(X).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    t = round_away(X * inv[:, None]).astype(np.int16) + 1
    return d, t.astype(np.uint16)


def _pack_base3(t: np.ndarray, n_trits: int) -> np.ndarray:
    """t (nb, n_trits, m) -> (nb, m) bytes: sum t_n 3^(4-n), then ceil(v*256/243)."""
    v = np.zeros((t.shape[0], t.shape[2]), dtype=np.uint16)
    for n in range(n_trits):
        v = v * 3 + t[:, n]
    if n_trits == 4:
        v = v * 3
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _encode_tq1_0(x, imatrix):
    del imatrix
    d, t = _trits(x)
    qs0 = _pack_base3(t[:, :160].reshape(-1, 5, 32), 5)
    qs1 = _pack_base3(t[:, 160:240].reshape(-1, 5, 16), 5)
    qh = _pack_base3(t[:, 240:].reshape(-1, 4, 4), 4)
    return np.concatenate([qs0, qs1, qh, fp16_bytes(d)], axis=1).reshape(x.shape[0], -1)


def _read_base3(b: np.ndarray, n_trits: int) -> np.ndarray:
    """bytes (nb, m) -> trits (nb, n_trits, m)."""
    pow3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)[:n_trits].reshape(1, -1, 1)
    q = (b[:, None, :].astype(np.uint16) * pow3) & 0xFF
    return (q * 3) >> 8


def _decode_tq1_0(data):
    b = np.ascontiguousarray(data).reshape(-1, 54)
    t = np.concatenate([_read_base3(b[:, :32], 5).reshape(-1, 160),
                        _read_base3(b[:, 32:48], 5).reshape(-1, 80),
                        _read_base3(b[:, 48:52], 4).reshape(-1, 16)], axis=1)
    d = fp16_from_bytes(b[:, 52:54])[:, None]
    return ((t.astype(F32) - F32(1)) * d).reshape(data.shape[0], -1)


def _encode_tq2_0(x, imatrix):
    del imatrix
    d, t = _trits(x)
    t = (t & 3).astype(np.uint8).reshape(-1, 2, 4, 32)
    qs = (t[:, :, 0] | t[:, :, 1] << 2 | t[:, :, 2] << 4 | t[:, :, 3] << 6).reshape(-1, 64)
    return np.concatenate([qs, fp16_bytes(d)], axis=1).reshape(x.shape[0], -1)


def _decode_tq2_0(data):
    b = np.ascontiguousarray(data).reshape(-1, 66)
    q = b[:, :64].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    d = fp16_from_bytes(b[:, 64:66])[:, None]
    return (((q & 3).reshape(-1, QK_K).astype(F32) - F32(1)) * d).reshape(data.shape[0], -1)


register_codec("TQ1_0")(lambda: (_encode_tq1_0, _decode_tq1_0))
register_codec("TQ2_0")(lambda: (_encode_tq2_0, _decode_tq2_0))
