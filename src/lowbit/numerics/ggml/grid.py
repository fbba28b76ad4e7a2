"""The code part of each ggml block, apart from its scales: so a method can choose the codes
itself (GPTQ's error feedback) on the grid that ggml's encoder chose the scales for.

Every ggml type decodes a weight as an affine function of its integer code, with the block's
(sub-block's) stored scale and minimum fixed:  x = a * q + b,  q in [0, qmax]. For each type,
CODES names the byte span that holds the codes inside one block and how codes are packed there
(the layouts are drawn in blocks.py / kquants.py); everything outside the span (d, dmin, sub-block
scales) is left as the encoder wrote it.

    a, b = affine(blocks, "Q4_K")        # (nb, 256) each, from the encoded blocks
    q = clip(round((w - b) / a), 0, qmax)
    blocks = with_codes(blocks, "Q4_K", q)  # same scales, new codes: still a valid Q4_K block

a and b are read off the decoder itself (codes all 0 -> b; all 1 -> a + b), so they are exactly
the decoder's grid, whatever the type's scale arithmetic. Q8_0 stores signed int8 codes; here
its codes are unsigned (stored = q - 128), so every type has q in [0, qmax].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lowbit.errors import LowbitError
from lowbit.numerics.ggml.types import get_codec, ggml_type


@dataclass(frozen=True)
class CodeSpan:
    start: int                                   # first byte of the codes in a block
    end: int                                     # one past the last
    qmax: int                                    # codes in [0, qmax]
    pack: Callable[[np.ndarray], np.ndarray]     # codes (nb, block_size) -> bytes (nb, end - start)


def _cat(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts, axis=1)


def _spans() -> dict[str, CodeSpan]:
    from lowbit.numerics.ggml import blocks as b
    from lowbit.numerics.ggml import kquants as k
    return {
        #        d(2) | qs[16]
        "Q4_0": CodeSpan(2, 18, 15, b._pack_nibbles),
        #        d(2) | m(2) | qs[16]
        "Q4_1": CodeSpan(4, 20, 15, b._pack_nibbles),
        #        d(2) | qh[4] | qs[16]
        "Q5_0": CodeSpan(2, 22, 31, lambda q: _cat(b._pack_qh(q), b._pack_nibbles(q))),
        #        d(2) | m(2) | qh[4] | qs[16]
        "Q5_1": CodeSpan(4, 24, 31, lambda q: _cat(b._pack_qh(q), b._pack_nibbles(q))),
        #        d(2) | qs[32] int8 (stored = q - 128)
        "Q8_0": CodeSpan(2, 34, 255, lambda q: (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)),
        #        scales[16] | qs[64] | d | dmin
        "Q2_K": CodeSpan(16, 80, 3, k._pack_2bit),
        #        hmask[32] | qs[64] | scales[12] | d
        "Q3_K": CodeSpan(0, 96, 7, lambda q: _cat(*k.pack_q3_codes(q))),
        #        d | dmin | scales[12] | qs[128]
        "Q4_K": CodeSpan(16, 144, 15, k._pack_nibbles_k),
        #        d | dmin | scales[12] | qh[32] | qs[128]
        "Q5_K": CodeSpan(16, 176, 31, lambda q: _cat(k.pack_q5_qh(q), k._pack_nibbles_k(q))),
        #        ql[128] | qh[64] | scales[16] | d
        "Q6_K": CodeSpan(0, 192, 63, lambda q: _cat(*k.pack_q6_codes(q))),
    }


_SPANS: dict[str, CodeSpan] = {}


def code_span(type_name: str) -> CodeSpan:
    t = ggml_type(type_name)
    if not _SPANS:
        _SPANS.update(_spans())
    if t.name not in _SPANS:
        raise LowbitError(f"ggml type {t.name}: no per-weight code grid (supported: {', '.join(sorted(_SPANS))})")
    return _SPANS[t.name]


def with_codes(blocks: np.ndarray, type_name: str, q: np.ndarray) -> np.ndarray:
    """blocks (nb, type_size) with their codes replaced by q (nb, block_size) in [0, qmax]."""
    s = code_span(type_name)
    out = np.array(blocks, dtype=np.uint8, copy=True)
    out[:, s.start:s.end] = s.pack(np.asarray(q).astype(np.uint8))
    return out


def affine(blocks: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each float32 (nb, block_size): the decoded value of code q is a * q + b."""
    t = ggml_type(type_name)
    _, decode = get_codec(t)
    nb = blocks.shape[0]
    zeros = np.zeros((nb, t.block_size), dtype=np.uint8)
    b0 = decode(with_codes(blocks, t.name, zeros))
    b1 = decode(with_codes(blocks, t.name, zeros + 1))
    return (b1 - b0).astype(np.float32), b0.astype(np.float32)
