"""ggml tensor types: block geometry, the codec registry, and the float32 arithmetic ggml uses.

Every ggml block type stores `block_size` consecutive weights of one row in `type_size` bytes
(ggml/src/ggml-common.h; sizes cross-checked against gguf.constants.GGML_QUANT_SIZES at import):

    type    weights/block  bytes/block  bits/weight   layout (in order)
    Q4_0         32            18          4.5        d f16 | qs[16] (two 4-bit codes per byte)
    Q4_1         32            20          5.0        d f16 | m f16 | qs[16]
    Q5_0         32            22          5.5        d f16 | qh[4] (5th bits, u32 LE) | qs[16]
    Q5_1         32            24          6.0        d f16 | m f16 | qh[4] | qs[16]
    Q8_0         32            34          8.5        d f16 | qs[32] int8
    Q2_K        256            84          2.625      scales[16] (4-bit scale | 4-bit min) | qs[64] | d | dmin
    Q3_K        256           110          3.4375     hmask[32] | qs[64] | scales[12] (16 x 6 bit) | d
    Q4_K        256           144          4.5        d | dmin | scales[12] (8 x (6-bit sc, 6-bit m)) | qs[128]
    Q5_K        256           176          5.5        d | dmin | scales[12] | qh[32] | qs[128]
    Q6_K        256           210          6.5625     ql[128] | qh[64] | scales[16] int8 | d
    TQ1_0       256            54          1.6875     qs[48] (5 trits/byte) | qh[4] (4 trits/byte) | d
    TQ2_0       256            66          2.0625     qs[64] (4 x 2-bit per byte) | d

A codec is a pair of vectorised functions over whole rows (registered by blocks.py, kquants.py,
ternary.py):

    encode(x: float32 (rows, n_per_row), imatrix: float32 (n_per_row,) | None) -> uint8 (rows, row_bytes)
    decode(data: uint8 (rows, row_bytes)) -> float32 (rows, n_per_row)

To reproduce ggml's bytes exactly, the encoders do every step in float32 in the same order as
ggml-quants.c: sums run sequentially (np.cumsum, never numpy's pairwise sum), products are
evaluated left to right, and rounding uses ggml's rules (`nearest_int` = round half to even,
`roundf` = half away from zero, C casts truncate). The searches keep blocks in "element-major"
layout, (n, n_blocks), so that each of ggml's per-element loops is one vector op over all blocks.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lowbit.errors import LowbitError

F32 = np.float32
QK_K = 256                      # weights per k-quant super-block
GROUP_MAX_EPS = F32(1e-15)      # ggml-quants.c: a group with max |x| below this is "all zero"


@dataclass(frozen=True)
class GGMLType:
    name: str           # ggml's spelling: "Q4_K"
    gguf_id: int        # enum ggml_type / gguf.GGMLQuantizationType
    block_size: int     # weights per block
    type_size: int      # bytes per block

    @property
    def format(self) -> str:
        """The lowbit Scheme.format spelling ("q4_k")."""
        return self.name.lower()

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size

    def fits(self, n_per_row: int) -> bool:
        return n_per_row % self.block_size == 0


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("BF16", 30, 1, 2),
    GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q2_K", 10, 256, 84), GGMLType("Q3_K", 11, 256, 110), GGMLType("Q4_K", 12, 256, 144),
    GGMLType("Q5_K", 13, 256, 176), GGMLType("Q6_K", 14, 256, 210),
    GGMLType("TQ1_0", 34, 256, 54), GGMLType("TQ2_0", 35, 256, 66),
)}
GGML_BY_ID = {t.gguf_id: t for t in GGML_TYPES.values()}
QUANTIZED_TYPES = tuple(n for n in GGML_TYPES if n not in ("F32", "F16", "BF16"))


def _check_against_gguf() -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    for t in GGML_TYPES.values():
        q = GGMLQuantizationType(t.gguf_id)
        if q.name != t.name or GGML_QUANT_SIZES[q] != (t.block_size, t.type_size):
            raise LowbitError(f"ggml type table: {t} disagrees with gguf's {q.name} {GGML_QUANT_SIZES[q]}")


_check_against_gguf()


def ggml_type(name: str | GGMLType) -> GGMLType:
    """'q4_k' / 'Q4_K' / GGMLType -> GGMLType."""
    if isinstance(name, GGMLType):
        return name
    key = str(name).upper()
    if key not in GGML_TYPES:
        raise LowbitError(f"ggml type {name!r}: unknown; expected one of {', '.join(GGML_TYPES)}")
    return GGML_TYPES[key]


# ---- codec registry ------------------------------------------------------------------------------
Encoder = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
Decoder = Callable[[np.ndarray], np.ndarray]
_CODECS: dict[str, tuple[Encoder, Decoder]] = {}
CODEC_MODULES = ("lowbit.numerics.ggml.blocks", "lowbit.numerics.ggml.kquants", "lowbit.numerics.ggml.ternary")


def register_codec(name: str) -> Callable:
    """Class-free registration: `@register_codec("Q4_K")` on a function returning (encode, decode)."""
    def deco(make: Callable[[], tuple[Encoder, Decoder]]):
        _CODECS[ggml_type(name).name] = make()
        return make
    return deco


def get_codec(name: str | GGMLType) -> tuple[Encoder, Decoder]:
    t = ggml_type(name)
    if not _CODECS:
        for mod in CODEC_MODULES:
            importlib.import_module(mod)
    if t.name not in _CODECS:
        raise LowbitError(f"ggml type {t.name}: no lowbit codec; available: {', '.join(sorted(_CODECS))}")
    return _CODECS[t.name]


# ---- ggml's float32 arithmetic --------------------------------------------------------------------
def seq_sum(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sum over `axis` in float32, strictly in index order, as a C `for` loop adds.

    Works row by row over a contiguous (n, ...) view: each step is one vectorised add across all
    blocks, which is both exact in ordering and fast (numpy's own sum may reorder: pairwise)."""
    a = np.moveaxis(np.asarray(a, dtype=F32), axis, 0)
    if a.ndim > 1 and not a[0].flags.c_contiguous:
        a = np.ascontiguousarray(a)
    s = a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (the 1.5*2^23 trick): round half to even, as float32 codes."""
    return np.rint(x).astype(F32, copy=False)


def round_away(x: np.ndarray) -> np.ndarray:
    """C roundf / lroundf: half away from zero. Done in float64, where |x| + 0.5 is exact."""
    x64 = np.asarray(x, dtype=np.float64)
    return (np.sign(x64) * np.floor(np.abs(x64) + 0.5)).astype(F32)


def as_u8(codes: np.ndarray) -> np.ndarray:
    """C store of an int into uint8_t: modulo 256 (negative codes wrap, as in ggml)."""
    return (codes.astype(np.int64) & 0xFF).astype(F32)


def fp16_round(x: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x)): round to nearest-even fp16 and back."""
    return np.asarray(x, dtype=F32).astype(np.float16).astype(F32)


def fp16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 (...,) -> uint8 (..., 2): little-endian IEEE half, as ggml_half is stored."""
    return np.asarray(x, dtype=F32).astype("<f2").view(np.uint8).reshape(*np.shape(x), 2)


def fp16_from_bytes(b: np.ndarray) -> np.ndarray:
    """uint8 (..., 2) -> float32 (...)."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(F32)


def safe_div(num: np.ndarray, den: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """num / den where `ok`, 0 elsewhere, without division warnings (float32)."""
    return np.where(ok, num / np.where(ok, den, F32(1)), F32(0)).astype(F32, copy=False)
