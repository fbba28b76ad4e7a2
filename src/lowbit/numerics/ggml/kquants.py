"""k-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256 weights, ggml-quants.c).

A super-block holds 16 sub-blocks of 16 weights (Q2_K, Q3_K, Q6_K) or 8 of 32 (Q4_K, Q5_K).
Each sub-block has its own scale (and min), and those scales are themselves quantized against
one or two fp16 super-block scales d / dmin. Byte layouts (element e of the super-block):

    Q2_K  scales[16] | qs[64] | d | dmin
          scales[s] = sc(4 bit) | m(4 bit) << 4;   x = d*sc * q - dmin*m,  q in [0,4)
          qs[32h + l] bits 2k..2k+1 = code of e = 128h + 32k + l
    Q3_K  hmask[32] | qs[64] | scales[12] | d
          qs as Q2_K (low 2 bits); hmask[l] bit j = 3rd bit of e = 32j + l;  x = d*(sc-32) * (q-4)
          scales: 16 x 6 bit; byte j<8: low nibbles of s=j (bits 0-3) and s=j+8 (bits 4-7);
                  byte 8+m bits 2i..2i+1: high 2 bits of s = m + 4i
    Q4_K  d | dmin | scales[12] | qs[128]
          8 x (6-bit sc, 6-bit m):  byte j<4: sc[j] | hi2(sc[j+4]) << 6;  byte 4+j: m[j] | hi2(m[j+4]) << 6
                                    byte 8+j: lo4(sc[j+4]) | lo4(m[j+4]) << 4
          qs[32c + l]: low nibble = e = 64c + l, high nibble = e = 64c + 32 + l;  x = d*sc * q - dmin*m
    Q5_K  d | dmin | scales[12] | qh[32] | qs[128]   as Q4_K plus qh[l] bit 2c+h = 5th bit of e = 64c+32h+l
    Q6_K  ql[128] | qh[64] | scales[16] int8 | d      x = d*sc * (q - 32), q in [0,64)
          e = 128h + 32k + l:  ql[64h + 32(k%2) + l] nibble k//2,  qh[32h + l] bits 2k..2k+1

Encoders are ggml's: without an imatrix quantize_row_<t>_ref (ggml_quantize_chunk's choice),
with one quantize_row_<t>_impl; see ksearch.py for the searches.
"""
from __future__ import annotations

import numpy as np

from lowbit.numerics.ggml.types import (F32, GROUP_MAX_EPS, QK_K, as_u8, fp16_bytes, fp16_from_bytes,
                                    fp16_round, nearest_int, register_codec, seq_sum)
from lowbit.numerics.ggml.ksearch import make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants, signed_absmax


def _T(a: np.ndarray) -> np.ndarray:
    """(nb, n) <-> (n, nb): the searches run element-major."""
    return np.ascontiguousarray(a.T)


def _super(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, QK_K)


def _imatrix_like(x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """The per-column imatrix laid out like x's super-blocks: (rows*n/256, 256)."""
    return np.broadcast_to(imatrix.astype(F32)[None, :], x.shape).reshape(-1, QK_K)


def _requant(X: np.ndarray, L: np.ndarray, d_sub: np.ndarray, m_sub: np.ndarray | None,
             lo: int, hi: int, offset: int) -> np.ndarray:
    """ggml's last step: re-round every weight against the *stored* (quantized) sub-block scale.

    X (nb, S, n), d_sub / m_sub (nb, S); a sub-block whose scale is 0 keeps the search's codes.
    code = clip(nearest_int((x + m) / d), lo, hi) + offset."""
    ok = d_sub != 0
    num = X if m_sub is None else X + m_sub[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(nearest_int(num / np.where(ok, d_sub, F32(1))[..., None]), F32(lo), F32(hi))
    return np.where(ok[..., None], q + F32(offset), L)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """codes (nb, 256) in [0,4) -> (nb, 64): byte 32h + l holds e = 128h + 32k + l at bits 2k."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, QK_K)


def _max_pos(v: np.ndarray) -> np.ndarray:
    """C `float m = 0; if (v > m) m = v;` over the last axis."""
    return np.maximum(v.max(axis=1), F32(0))


# ---- Q2_K ------------------------------------------------------------------------------------------
def _encode_q2_k(x, imatrix):
    X = _super(x)
    nb = X.shape[0]
    xs = X.reshape(-1, 16)
    if imatrix is None:
        xt = _T(xs)
        sc, mn, L = make_qkx_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, use_mad=True)
        sc, mn, L = sc.reshape(nb, 16), mn.reshape(nb, 16), L.T
        max_sc, max_mn = _max_pos(sc), _max_pos(mn)
        has_sc, has_mn = max_sc > 0, max_mn > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = as_u8(nearest_int((F32(15) / max_sc)[:, None] * sc))
            lm = as_u8(nearest_int((F32(15) / max_mn)[:, None] * mn))
        ls = np.where(has_sc[:, None], ls, F32(0))
        scales = ls.astype(np.int64) | np.where(has_mn[:, None], lm, F32(0)).astype(np.int64) << 4
        d = np.where(has_sc, max_sc / F32(15), F32(0))
        dmin = np.where(has_mn, max_mn / F32(15), F32(0))
    else:
        sigma2 = (seq_sum(X * X, axis=1) / F32(QK_K))[:, None]
        wt = _T((_imatrix_like(x, imatrix) * np.sqrt(sigma2 + X * X)).reshape(-1, 16))
        sw = _T(seq_sum(wt).reshape(nb, 16))
        sc, mn, L = make_qkx_quants(_T(xs), wt, 3, -0.9, 0.05, 36, use_mad=False, flat_if_le=True)
        L = L.T
        d, Ls = make_qp_quants(_T(sc.reshape(nb, 16)), 15, sw)
        dmin, Lm = make_qp_quants(_T(mn.reshape(nb, 16)), 15, sw)
        scales = Ls.T.astype(np.int64) | Lm.T.astype(np.int64) << 4
    scales = (scales & 0xFF).astype(np.uint8)
    d_sub = fp16_round(d)[:, None] * (scales & 0xF).astype(F32)
    m_sub = fp16_round(dmin)[:, None] * (scales >> 4).astype(F32)
    L = _requant(X.reshape(nb, 16, 16), L.reshape(nb, 16, 16), d_sub, m_sub, 0, 3, 0)
    out = np.concatenate([scales, _pack_2bit(L.reshape(nb, QK_K)), fp16_bytes(d), fp16_bytes(dmin)], axis=1)
    return out.reshape(x.shape[0], -1)


def _decode_q2_k(data):
    b = np.ascontiguousarray(data).reshape(-1, 84)
    sc = b[:, :16]
    d, dmin = fp16_from_bytes(b[:, 80:82])[:, None], fp16_from_bytes(b[:, 82:84])[:, None]
    dl = (d * (sc & 0xF).astype(F32))[..., None]
    ml = (dmin * (sc >> 4).astype(F32))[..., None]
    q = _unpack_2bit(b[:, 16:80]).reshape(-1, 16, 16).astype(F32)
    return (dl * q - ml).reshape(data.shape[0], -1)


# ---- Q3_K ------------------------------------------------------------------------------------------
def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """(nb, 16) 6-bit codes -> the 12-byte Q3_K scale layout (module docstring)."""
    l6 = l6.astype(np.uint8)
    low = (l6[:, :8] & 0xF) | (l6[:, 8:] & 0xF) << 4
    hi = (l6 >> 4).reshape(-1, 4, 4)                  # [i, m] = s = 4i + m
    high = hi[:, 0] | hi[:, 1] << 2 | hi[:, 2] << 4 | hi[:, 3] << 6
    return np.concatenate([low, high], axis=1)


def _unpack_q3_scales(b: np.ndarray) -> np.ndarray:
    """12 bytes -> (nb, 16) signed scales (6-bit code - 32) as float32."""
    low = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1)
    hi = (b[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3
    return (low | hi.reshape(-1, 16) << 4).astype(F32) - F32(32)


def _encode_q3_k(x, imatrix):
    X = _super(x)
    nb = X.shape[0]
    xs = X.reshape(-1, 16)
    if imatrix is None:
        sc, L = make_q3_quants(_T(xs), 4)
        sc, L = sc.reshape(nb, 16), L.T
        _, max_sc = signed_absmax(_T(sc))
        has = max_sc != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-32) / np.where(has, max_sc, F32(1))
        l6 = np.clip(nearest_int(iscale[:, None] * sc), F32(-32), F32(31)) + F32(32)
        l6 = np.where(has[:, None], l6, F32(0))
        d = np.where(has, F32(1) / iscale, F32(0))
    else:
        sigma2 = (F32(2) * seq_sum(X * X, axis=1) / F32(QK_K))[:, None]
        wt = _T((_imatrix_like(x, imatrix) * np.sqrt(sigma2 + X * X)).reshape(-1, 16))
        sw = _T(seq_sum(wt).reshape(nb, 16))
        sc, L = make_qx_quants(_T(xs), 4, 1, wt)
        L = L.T
        d, l6 = make_qx_quants(_T(sc.reshape(nb, 16)), 32, 1, sw)
        l6 = l6.T
    scales = _pack_q3_scales(l6)
    d_sub = fp16_round(d)[:, None] * _unpack_q3_scales(scales)
    L = _requant(X.reshape(nb, 16, 16), L.reshape(nb, 16, 16), d_sub, None, -4, 3, 4).reshape(nb, QK_K)
    hmask, qs = pack_q3_codes(L)
    out = np.concatenate([hmask, qs, scales, fp16_bytes(d)], axis=1)
    return out.reshape(x.shape[0], -1)


def pack_q3_codes(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes (nb, 256) in [0,8) -> (hmask (nb, 32), qs (nb, 64)): 3rd bit of e = 32j + l in
    hmask[l] bit j, low 2 bits as Q2_K."""
    nb = L.shape[0]
    hbit = (L > 3).astype(np.uint8).reshape(nb, 8, 32)
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for j in range(8):
        hmask |= hbit[:, j] << j
    return hmask, _pack_2bit(np.where(L > 3, L - 4, L))


def _decode_q3_k(data):
    b = np.ascontiguousarray(data).reshape(-1, 110)
    d = fp16_from_bytes(b[:, 108:110])[:, None]
    dl = (d * _unpack_q3_scales(b[:, 96:108]))[..., None]
    q = _unpack_2bit(b[:, 32:96]).astype(np.int16)
    h = np.unpackbits(b[:, :32].reshape(-1, 1, 32), axis=1, count=8, bitorder="little").reshape(-1, QK_K)
    q = (q - 4 * (1 - h.astype(np.int16))).astype(F32).reshape(-1, 16, 16)
    return (dl * q).reshape(data.shape[0], -1)


# ---- Q4_K / Q5_K -----------------------------------------------------------------------------------
def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 scale + 8 min codes (nb, 8) -> 12 bytes (get_scale_min_k4's layout). Codes are not
    masked first: ggml ORs them in as they are, so a wrapped code behaves as in ggml."""
    ls, lm = ls.astype(np.int64), lm.astype(np.int64)
    b0 = ls[:, :4] | (ls[:, 4:] >> 4) << 6
    b1 = lm[:, :4] | (lm[:, 4:] >> 4) << 6
    b2 = (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4
    return (np.concatenate([b0, b1, b2], axis=1) & 0xFF).astype(np.uint8)


def _unpack_k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> (sc (nb, 8), m (nb, 8)) as float32, per get_scale_min_k4."""
    b0, b1, b2 = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([b0 & 63, (b2 & 0xF) | (b0 >> 6) << 4], axis=1)
    m = np.concatenate([b1 & 63, (b2 >> 4) | (b1 >> 6) << 4], axis=1)
    return sc.astype(F32), m.astype(F32)


def _encode_k45(x, imatrix, nmax: int):
    """Shared Q4_K (nmax 15) / Q5_K (nmax 31) encoder -> (d, dmin, scales12, codes (nb, 256))."""
    X = _super(x)
    nb = X.shape[0]
    xs = X.reshape(-1, 32)
    if imatrix is None:
        xt = _T(xs)
        w = np.sqrt(seq_sum(xt * xt) / F32(32)) + np.abs(xt)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        sc, mn, L = make_qkx_quants(xt, w, nmax, rmin, 0.1, nstep, use_mad=False)
        sc, mn, L = sc.reshape(nb, 8), mn.reshape(nb, 8), L.T
        max_sc, max_mn = _max_pos(sc), _max_pos(mn)
        with np.errstate(divide="ignore"):
            inv_sc = np.where(max_sc > 0, F32(63) / max_sc, F32(0))[:, None]
            inv_mn = np.where(max_mn > 0, F32(63) / max_mn, F32(0))[:, None]
        ls = np.minimum(F32(63), as_u8(nearest_int(inv_sc * sc)))
        lm = np.minimum(F32(63), as_u8(nearest_int(inv_mn * mn)))
        d, dmin = max_sc / F32(63), max_mn / F32(63)
    else:
        sigma2 = (F32(2) * seq_sum(X * X, axis=1) / F32(QK_K))[:, None]
        wt = _T((_imatrix_like(x, imatrix) * np.sqrt(sigma2 + X * X)).reshape(-1, 32))
        sw = _T(seq_sum(wt).reshape(nb, 8))
        sc, mn, L = make_qkx_quants(_T(xs), wt, nmax, -0.9, 0.05, 36, use_mad=False, flat_if_le=True)
        L = L.T
        d, ls = make_qp_quants(_T(sc.reshape(nb, 8)), 63, sw)
        dmin, lm = make_qp_quants(_T(mn.reshape(nb, 8)), 63, sw)
        ls, lm = ls.T, lm.T
        if nmax == 31:                                  # quantize_row_q5_K_impl clamps; q4_K's does not
            ls, lm = np.minimum(F32(63), ls), np.minimum(F32(63), lm)
    scales = _pack_k4_scales(ls, lm)
    usc, um = _unpack_k4_scales(scales)
    d_sub, m_sub = fp16_round(d)[:, None] * usc, fp16_round(dmin)[:, None] * um
    L = _requant(X.reshape(nb, 8, 32), L.reshape(nb, 8, 32), d_sub, m_sub, 0, nmax, 0)
    return d, dmin, scales, L.reshape(nb, QK_K).astype(np.uint8)


def _pack_nibbles_k(L: np.ndarray) -> np.ndarray:
    """codes (nb, 256) -> (nb, 128): byte 32c + l = lo4(e=64c+l) | lo4(e=64c+32+l) << 4."""
    q = (L & 0xF).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)


def _unpack_nibbles_k(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0xF).reshape(-1, QK_K)


def _encode_q4_k(x, imatrix):
    d, dmin, scales, L = _encode_k45(x, imatrix, 15)
    out = np.concatenate([fp16_bytes(d), fp16_bytes(dmin), scales, _pack_nibbles_k(L)], axis=1)
    return out.reshape(x.shape[0], -1)


def _encode_q5_k(x, imatrix):
    d, dmin, scales, L = _encode_k45(x, imatrix, 31)
    out = np.concatenate([fp16_bytes(d), fp16_bytes(dmin), scales, pack_q5_qh(L), _pack_nibbles_k(L)], axis=1)
    return out.reshape(x.shape[0], -1)


def pack_q5_qh(L: np.ndarray) -> np.ndarray:
    """codes (nb, 256) in [0,32) -> qh (nb, 32): 5th bit of e = 64c + 32h + l at qh[l] bit 2c+h."""
    hi = (L.astype(np.uint8) >> 4).reshape(-1, 4, 2, 32)
    qh = np.zeros((L.shape[0], 32), dtype=np.uint8)
    for c in range(4):
        for h in range(2):
            qh |= hi[:, c, h] << (2 * c + h)
    return qh


def _decode_k45(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    d, dmin = fp16_from_bytes(b[:, 0:2])[:, None], fp16_from_bytes(b[:, 2:4])[:, None]
    sc, m = _unpack_k4_scales(b[:, 4:16])
    dl, ml = (d * sc)[..., None], (dmin * m)[..., None]
    return dl * q.astype(F32).reshape(-1, 8, 32) - ml


def _decode_q4_k(data):
    b = np.ascontiguousarray(data).reshape(-1, 144)
    return _decode_k45(b, _unpack_nibbles_k(b[:, 16:])).reshape(data.shape[0], -1)


def _decode_q5_k(data):
    b = np.ascontiguousarray(data).reshape(-1, 176)
    qh = np.unpackbits(b[:, 16:48].reshape(-1, 1, 32), axis=1, count=8, bitorder="little")  # [.., 2c+h, l]
    q = _unpack_nibbles_k(b[:, 48:]) | (qh.reshape(-1, QK_K) << 4)
    return _decode_k45(b, q).reshape(data.shape[0], -1)


# ---- Q6_K ------------------------------------------------------------------------------------------
def _encode_q6_k(x, imatrix):
    X = _super(x)
    nb = X.shape[0]
    xs = X.reshape(-1, 16)
    qw = None if imatrix is None else _T(_imatrix_like(x, imatrix).reshape(-1, 16))
    sc, L = make_qx_quants(_T(xs), 32, 1, qw)
    sc, L = sc.reshape(nb, 16), L.T
    amax, max_sc = signed_absmax(_T(sc))
    live = amax >= GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / np.where(live, max_sc, F32(1))
    d = np.where(live, F32(1) / iscale, F32(0))
    isc = np.minimum(F32(127), nearest_int(iscale[:, None] * sc))
    d_sub = fp16_round(d)[:, None] * isc
    L = _requant(X.reshape(nb, 16, 16), L.reshape(nb, 16, 16), d_sub, None, -32, 31, 32)
    ql, qh = pack_q6_codes(L.reshape(nb, QK_K))
    out = np.concatenate([ql, qh, isc.astype(np.int8).view(np.uint8), fp16_bytes(d)], axis=1)
    out[~live] = 0                                     # ggml memsets an all-zero super-block
    return out.reshape(x.shape[0], -1)


def pack_q6_codes(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes (nb, 256) in [0,64) -> (ql (nb, 128), qh (nb, 64)), layout in the module docstring."""
    nb = L.shape[0]
    q = L.reshape(nb, 2, 4, 32).astype(np.uint8)
    ql = np.stack([(q[:, :, 0] & 0xF) | (q[:, :, 2] & 0xF) << 4,
                   (q[:, :, 1] & 0xF) | (q[:, :, 3] & 0xF) << 4], axis=2).reshape(nb, 128)
    hq = q >> 4
    return ql, (hq[:, :, 0] | hq[:, :, 1] << 2 | hq[:, :, 2] << 4 | hq[:, :, 3] << 6).reshape(nb, 64)


def _decode_q6_k(data):
    b = np.ascontiguousarray(data).reshape(-1, 210)
    ql = b[:, :128].reshape(-1, 2, 2, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    ql = (ql & 0xF).transpose(0, 1, 3, 2, 4).reshape(-1, 2, 4, 32)       # [h, k = 2*nib + half, l]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (ql | (qh & 3) << 4).astype(np.int16) - 32
    sc = b[:, 192:208].view(np.int8).astype(F32)
    d = fp16_from_bytes(b[:, 208:210])[:, None]
    return ((d * sc)[..., None] * q.astype(F32).reshape(-1, 16, 16)).reshape(data.shape[0], -1)


for _name, _enc, _dec in (("Q2_K", _encode_q2_k, _decode_q2_k), ("Q3_K", _encode_q3_k, _decode_q3_k),
                          ("Q4_K", _encode_q4_k, _decode_q4_k), ("Q5_K", _encode_q5_k, _decode_q5_k),
                          ("Q6_K", _encode_q6_k, _decode_q6_k)):
    register_codec(_name)(lambda e=_enc, d=_dec: (e, d))
