"""The 32-weight ggml block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml/src/ggml-quants.c).

Byte layout of one block (little endian; d, m are IEEE half):

    Q4_0  d | qs[16]            code q in [0,16):  x = (q - 8) * d
    Q4_1  d | m | qs[16]        code q in [0,16):  x = q * d + m
    Q5_0  d | qh[4] | qs[16]    code q in [0,32):  x = (q - 16) * d
    Q5_1  d | m | qh[4] | qs[16]                    x = q * d + m
    Q8_0  d | qs[32] int8                           x = q * d

    qs byte j (j < 16) = low 4 bits of code j | low 4 bits of code j+16 << 4
    qh (u32)  bit k    = 5th bit of code k

Encoders follow what ggml_quantize_chunk runs:
  * no imatrix: quantize_row_<type>_ref (absmax / min-max rounding; what gguf-py mirrors);
  * imatrix (Q4_0..Q5_1): quantize_row_<type>_impl: per-weight importance
    w = imatrix * sqrt(sigma2 + x^2), sigma2 = mean x^2 of the whole row, and the weighted scale
    search of ksearch.py (make_qx_quants for the symmetric types, make_qkx3_quants for Q4_1/Q5_1).
  * Q8_0 ignores the imatrix, as ggml does.
"""
from __future__ import annotations

import numpy as np

from lowbit.numerics.ggml.types import F32, fp16_bytes, fp16_from_bytes, register_codec, round_away, seq_sum
from lowbit.numerics.ggml.ksearch import make_qkx_quants, make_qx_quants, signed_absmax

QK = 32


def _row_importance(x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """(rows, n) -> per-weight importance blocks (rows*n/32, 32): imatrix * sqrt(sigma2 + x^2)."""
    rows, n = x.shape
    sigma2 = (seq_sum(x * x, axis=1) / F32(n))[:, None]
    w = imatrix.astype(F32)[None, :] * np.sqrt(sigma2 + x * x)
    return w.reshape(-1, QK)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """codes (nb, 32) -> qs (nb, 16): code j in the low nibble, code j+16 in the high one."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_qh(q: np.ndarray) -> np.ndarray:
    """codes (nb, 32) in [0,32) -> qh (nb, 4): bit k of a little-endian u32 = 5th bit of code k."""
    bits = (q.astype(np.uint8) >> 4) & 1
    return np.packbits(bits, axis=1, bitorder="little")


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _unpack_qh(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little")


def _trunc_code(v: np.ndarray, qmax: int) -> np.ndarray:
    """C `MIN(qmax, (int8_t)(v))`: truncation toward zero, then the upper clamp."""
    return np.minimum(np.trunc(v), F32(qmax))


def _T(a: np.ndarray) -> np.ndarray:
    """(nb, n) <-> (n, nb): the searches run element-major."""
    return np.ascontiguousarray(a.T)


def _inv(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`"""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


# ---- symmetric: Q4_0 / Q5_0 ----------------------------------------------------------------------
def _encode_sym(x: np.ndarray, imatrix: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (d fp16-rounded (nb,), codes (nb, 32) in [0, 2*nmax))."""
    xb = x.reshape(-1, QK)
    if imatrix is None:
        _, mx = signed_absmax(_T(xb))
        d = mx / F32(-nmax)
        q = _trunc_code(xb * _inv(d)[:, None] + F32(nmax + 0.5), 2 * nmax - 1)
        return d, q
    d, q = make_qx_quants(_T(xb), nmax, 1, _T(_row_importance(x, imatrix)))
    return d, q.T


def _encode_q4_0(x, imatrix):
    d, q = _encode_sym(x, imatrix, 8)
    out = np.concatenate([fp16_bytes(d), _pack_nibbles(q)], axis=1)
    return out.reshape(x.shape[0], -1)


def _encode_q5_0(x, imatrix):
    d, q = _encode_sym(x, imatrix, 16)
    out = np.concatenate([fp16_bytes(d), _pack_qh(q), _pack_nibbles(q)], axis=1)
    return out.reshape(x.shape[0], -1)


# ---- asymmetric: Q4_1 / Q5_1 ---------------------------------------------------------------------
def _encode_asym(x: np.ndarray, imatrix: np.ndarray | None, nmax: int) -> tuple[np.ndarray, ...]:
    """-> (d, m, codes in [0, nmax]) with x ~ q*d + m."""
    xb = x.reshape(-1, QK)
    if imatrix is None:
        mn, mx = xb.min(axis=1), xb.max(axis=1)
        d = (mx - mn) / F32(nmax)
        q = _trunc_code((xb - mn[:, None]) * _inv(d)[:, None] + F32(0.5), nmax)
        return d, mn, q
    d, the_min, q = make_qkx_quants(_T(xb), _T(_row_importance(x, imatrix)), nmax, -0.9, 0.05, 36,
                                    use_mad=False, flat_if_le=True)
    return d, -the_min, q.T


def _encode_q4_1(x, imatrix):
    d, m, q = _encode_asym(x, imatrix, 15)
    out = np.concatenate([fp16_bytes(d), fp16_bytes(m), _pack_nibbles(q)], axis=1)
    return out.reshape(x.shape[0], -1)


def _encode_q5_1(x, imatrix):
    d, m, q = _encode_asym(x, imatrix, 31)
    out = np.concatenate([fp16_bytes(d), fp16_bytes(m), _pack_qh(q), _pack_nibbles(q)], axis=1)
    return out.reshape(x.shape[0], -1)


def _encode_q8_0(x, imatrix):
    del imatrix  # ggml's quantize_q8_0 ignores it
    xb = x.reshape(-1, QK)
    d = np.abs(xb).max(axis=1) / F32(127)
    q = round_away(xb * _inv(d)[:, None]).astype(np.int8).view(np.uint8)
    return np.concatenate([fp16_bytes(d), q], axis=1).reshape(x.shape[0], -1)


# ---- decoders: float32 in the same operation order as dequantize_row_* -------------------------
def _blocks(data: np.ndarray, type_size: int) -> np.ndarray:
    return np.ascontiguousarray(data).reshape(-1, type_size)


def _decode_q4_0(data):
    b = _blocks(data, 18)
    d = fp16_from_bytes(b[:, 0:2])[:, None]
    q = _unpack_nibbles(b[:, 2:]).astype(F32) - F32(8)
    return (q * d).reshape(data.shape[0], -1)


def _decode_q4_1(data):
    b = _blocks(data, 20)
    d, m = fp16_from_bytes(b[:, 0:2])[:, None], fp16_from_bytes(b[:, 2:4])[:, None]
    q = _unpack_nibbles(b[:, 4:]).astype(F32)
    return (q * d + m).reshape(data.shape[0], -1)


def _decode_q5_0(data):
    b = _blocks(data, 22)
    d = fp16_from_bytes(b[:, 0:2])[:, None]
    q = (_unpack_nibbles(b[:, 6:]) | (_unpack_qh(b[:, 2:6]) << 4)).astype(F32) - F32(16)
    return (q * d).reshape(data.shape[0], -1)


def _decode_q5_1(data):
    b = _blocks(data, 24)
    d, m = fp16_from_bytes(b[:, 0:2])[:, None], fp16_from_bytes(b[:, 2:4])[:, None]
    q = (_unpack_nibbles(b[:, 8:]) | (_unpack_qh(b[:, 4:8]) << 4)).astype(F32)
    return (q * d + m).reshape(data.shape[0], -1)


def _decode_q8_0(data):
    b = _blocks(data, 34)
    d = fp16_from_bytes(b[:, 0:2])[:, None]
    return (b[:, 2:].view(np.int8).astype(F32) * d).reshape(data.shape[0], -1)


for _name, _enc, _dec in (("Q4_0", _encode_q4_0, _decode_q4_0), ("Q4_1", _encode_q4_1, _decode_q4_1),
                          ("Q5_0", _encode_q5_0, _decode_q5_0), ("Q5_1", _encode_q5_1, _decode_q5_1),
                          ("Q8_0", _encode_q8_0, _decode_q8_0)):
    register_codec(_name)(lambda e=_enc, d=_dec: (e, d))
