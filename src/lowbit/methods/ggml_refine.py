"""lowbit's refinement of ggml blocks (opt-in: `write_gguf(..., refine=True)`, `lowbit export --refine`).

llama.cpp's imatrix searches stop early: a symmetric 32-block (Q4_0/Q5_0/Q8_0) keeps the best of
19 trial scales and never re-rounds its codes to the fp16 scale actually stored; a k-quant block
quantizes its sub-block scales to 4/6/8-bit codes against the super-block scale and only then
re-rounds the weights. Starting from ggml's exact bytes, this module does a local search that can
only lower the importance-weighted squared error of each block,

    E = sum_j w_j (x_j - x_hat_j)^2,   w_j = imatrix_j * sqrt(sigma2 + x_j^2)

(llama.cpp's own weighting, sigma2 = mean x^2 of the row), keeping ggml's result wherever the
search finds nothing better. The output is an ordinary GGUF tensor (same type, same layout):
llama.cpp reads it as it reads its own; only the chosen codes differ.

  Q4_0, Q5_0, Q8_0   31 trial scales d * (0.85 .. 1.15), each fp16-rounded, codes re-rounded,
                     then one weighted least-squares refit of d (codes re-rounded again)
  Q2_K .. Q6_K       each sub-block's scale code (and min code) moved by a few steps around
                     ggml's, codes re-rounded to the stored scales; super-block d / dmin kept
Without an imatrix the bytes are left exactly as ggml makes them.
"""
from __future__ import annotations

import numpy as np

from lowbit.numerics.ggml import blocks, kquants
from lowbit.numerics.ggml.types import F32, QK_K, fp16_bytes, fp16_from_bytes, fp16_round

REFINABLE = ("Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def importance(x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    sigma2 = (x.astype(np.float64) ** 2).mean(axis=1, keepdims=True).astype(F32)
    return imatrix.astype(F32)[None, :] * np.sqrt(sigma2 + x * x)


def refine(type_name: str, x: np.ndarray, imatrix: np.ndarray | None, data: np.ndarray) -> np.ndarray:
    """Improve encoded rows `data` (uint8 (rows, row_bytes)) of float rows x; never worse per block."""
    if imatrix is None or type_name not in REFINABLE:
        return data
    w = importance(x, imatrix)
    if type_name in ("Q4_0", "Q5_0", "Q8_0"):
        return _refine_sym32(type_name, x, w, data)
    return {"Q2_K": _refine_q2_k, "Q3_K": _refine_q3_k, "Q4_K": _refine_q4_k, "Q5_K": _refine_q5_k,
            "Q6_K": _refine_q6_k}[type_name](x, w, data)


def _err(x, w, xh, axis=-1):
    d = x - xh
    return (w * d * d).sum(axis=axis)


# ---- symmetric 32-blocks -------------------------------------------------------------------------
# signed code range and bytes per block; Q8_0 keeps ggml's [-127, 127] (its reference encoder never
# writes -128, and some int8 dot-product kernels assume it does not)
_SYM = {"Q4_0": (-8, 7, 18), "Q5_0": (-16, 15, 22), "Q8_0": (-127, 127, 34)}


def _codes(X, d, lo, hi):
    """Element-major X (32, nb), scale d (nb,) -> codes clip(rint(x/d), lo, hi) (0 where d == 0)."""
    ok = d != 0
    q = np.clip(np.rint(X / np.where(ok, d, F32(1))), lo, hi)
    return np.where(ok, q, F32(0)).astype(F32)


def _err0(X, W, d, q):
    r = X - d * q
    return (W * r * r).sum(axis=0)


def _refine_sym32(t, x, w, data, ratios=np.linspace(0.85, 1.15, 31, dtype=F32)):
    lo, hi, ts = _SYM[t]
    X, W = np.ascontiguousarray(x.reshape(-1, 32).T), np.ascontiguousarray(w.reshape(-1, 32).T)
    b = np.ascontiguousarray(data).reshape(-1, ts)
    d0 = fp16_from_bytes(b[:, :2])
    dec = {"Q4_0": blocks._decode_q4_0, "Q5_0": blocks._decode_q5_0, "Q8_0": blocks._decode_q8_0}[t]
    x0 = np.ascontiguousarray(dec(b).reshape(-1, 32).T)
    best_d, best_q = d0, np.rint(x0 / np.where(d0 != 0, d0, F32(1)))
    r0 = X - x0
    best = (W * r0 * r0).sum(axis=0)
    taken = np.zeros(d0.shape, dtype=bool)
    for r in ratios:
        d = fp16_round(d0 * r)
        q = _codes(X, d, lo, hi)
        # one weighted least-squares refit of d for these codes, re-rounded
        num, den = (W * X * q).sum(axis=0), (W * q * q).sum(axis=0)
        d2 = fp16_round(np.where(den > 0, num / np.where(den > 0, den, F32(1)), d))
        q2 = _codes(X, d2, lo, hi)
        e1, e2 = _err0(X, W, d, q), _err0(X, W, d2, q2)
        use2 = e2 < e1
        e = np.where(use2, e2, e1)
        take = e < best
        if take.any():
            best = np.where(take, e, best)
            best_d = np.where(take, np.where(use2, d2, d), best_d)
            best_q = np.where(take, np.where(use2, q2, q), best_q)
            taken |= take
    if not taken.any():
        return data
    best_q = np.ascontiguousarray(best_q.T)
    q = (best_q - lo).astype(np.uint8) if t != "Q8_0" else best_q.astype(np.int8).view(np.uint8)
    if t == "Q4_0":
        new = np.concatenate([fp16_bytes(best_d), blocks._pack_nibbles(q)], axis=1)
    elif t == "Q5_0":
        new = np.concatenate([fp16_bytes(best_d), blocks._pack_qh(q), blocks._pack_nibbles(q)], axis=1)
    else:
        new = np.concatenate([fp16_bytes(best_d), q], axis=1)
    return np.where(taken[:, None], new, b).reshape(data.shape)


# ---- k-quants: local search on the sub-block scale codes -----------------------------------------
def _search(X, W, d, dm, sc, m, sc_lim, m_lim, deltas, q_lim):
    """X, W (nb, S, n); d, dm (nb,) stored super-block scales (dm None: symmetric); sc, m (nb, S)
    codes. For each candidate (sc + ds, m + dm_) re-round codes and keep the best per sub-block.
    -> (sc, m, q) with q the integer codes (value = d*sc*q - dm*m)."""
    lo, hi = q_lim
    best = None
    out_sc, out_m, out_q = sc, m, None
    for ds, dmm in deltas:
        s2 = np.clip(sc + ds, *sc_lim)
        m2 = m if dm is None else np.clip(m + dmm, *m_lim)
        dl = d[:, None] * s2
        ml = F32(0) if dm is None else dm[:, None] * m2
        ok = dl != 0
        q = np.clip(np.rint((X + (ml[..., None] if dm is not None else 0)) /
                            np.where(ok, dl, F32(1))[..., None]), lo, hi)
        q = np.where(ok[..., None], q, F32(max(lo, 0)))
        xh = dl[..., None] * q - (ml[..., None] if dm is not None else F32(0))
        e = _err(X, W, xh)
        if best is None:
            best, out_q = e, q
            continue
        take = e < best
        best = np.where(take, e, best)
        out_sc = np.where(take, s2, out_sc)
        out_m = out_m if dm is None else np.where(take, m2, out_m)
        out_q = np.where(take[..., None], q, out_q)
    return out_sc, out_m, out_q


def _grid(r_sc, r_m):
    g = [(0, 0)] + [(a, b) for a in range(-r_sc, r_sc + 1) for b in range(-r_m, r_m + 1) if (a, b) != (0, 0)]
    return g


def _refine_q4_k(x, w, data, nmax=15, ts=144):
    b = np.ascontiguousarray(data).reshape(-1, ts)
    nb = b.shape[0]
    d, dmin = fp16_from_bytes(b[:, 0:2]), fp16_from_bytes(b[:, 2:4])
    sc, m = kquants._unpack_k4_scales(b[:, 4:16])
    X, W = x.reshape(nb, 8, 32), w.reshape(nb, 8, 32)
    sc, m, q = _search(X, W, d, dmin, sc, m, (0, 63), (0, 63), _grid(2, 2), (0, nmax))
    L = q.reshape(nb, QK_K).astype(np.uint8)
    head = np.concatenate([b[:, :4], kquants._pack_k4_scales(sc, m)], axis=1)
    if nmax == 15:
        return np.concatenate([head, kquants._pack_nibbles_k(L)], axis=1).reshape(data.shape)
    return np.concatenate([head, kquants.pack_q5_qh(L), kquants._pack_nibbles_k(L)], axis=1).reshape(data.shape)


def _refine_q5_k(x, w, data):
    return _refine_q4_k(x, w, data, nmax=31, ts=176)


def _refine_q2_k(x, w, data):
    b = np.ascontiguousarray(data).reshape(-1, 84)
    nb = b.shape[0]
    d, dmin = fp16_from_bytes(b[:, 80:82]), fp16_from_bytes(b[:, 82:84])
    sc, m = (b[:, :16] & 0xF).astype(F32), (b[:, :16] >> 4).astype(F32)
    X, W = x.reshape(nb, 16, 16), w.reshape(nb, 16, 16)
    sc, m, q = _search(X, W, d, dmin, sc, m, (0, 15), (0, 15), _grid(1, 1), (0, 3))
    scales = (sc.astype(np.uint8) | m.astype(np.uint8) << 4)
    L = q.reshape(nb, QK_K)
    return np.concatenate([scales, kquants._pack_2bit(L), b[:, 80:84]], axis=1).reshape(data.shape)


def _refine_q3_k(x, w, data):
    b = np.ascontiguousarray(data).reshape(-1, 110)
    nb = b.shape[0]
    d = fp16_from_bytes(b[:, 108:110])
    sc = kquants._unpack_q3_scales(b[:, 96:108])                 # signed, [-32, 31]
    X, W = x.reshape(nb, 16, 16), w.reshape(nb, 16, 16)
    sc, _, q = _search(X, W, d, None, sc, None, (-32, 31), None, _grid(2, 0), (-4, 3))
    hmask, qs = kquants.pack_q3_codes((q + 4).reshape(nb, QK_K))
    scales = kquants._pack_q3_scales(sc + 32)
    return np.concatenate([hmask, qs, scales, b[:, 108:110]], axis=1).reshape(data.shape)


def _refine_q6_k(x, w, data):
    b = np.ascontiguousarray(data).reshape(-1, 210)
    nb = b.shape[0]
    d = fp16_from_bytes(b[:, 208:210])
    sc = b[:, 192:208].view(np.int8).astype(F32)
    X, W = x.reshape(nb, 16, 16), w.reshape(nb, 16, 16)
    sc, _, q = _search(X, W, d, None, sc, None, (-128, 127), None, _grid(3, 0), (-32, 31))
    ql, qh = kquants.pack_q6_codes((q + 32).reshape(nb, QK_K))
    out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), b[:, 208:210]], axis=1)
    dead = d == 0
    out[dead] = b[dead]
    return out.reshape(data.shape)
