"""Memory arithmetic: how many bytes a weight takes at a format, scales and zero points included.

    weight bits = n * code_bits                       codes, packed
                + n_groups * scale_bits               one scale per group (fp16, as every file format stores)
                + n_groups * zero_bits                asymmetric int only: an integer zero per group at
                                                      `bits` (GPTQ packs qzeros like the codes)

For a (rows, cols) tensor with group size g, n_groups = rows * ceil(cols / g): a ragged last group
still needs its own scale, exactly as QuantizedWeight.storage_bits counts it. Given only a
parameter count, n_groups = ceil(n / g).

Bits per code: int{b} b; nf4 / fp4 4; fp8 8; ternary 1.6 (5 trits per byte, packing.py; the 2-bit
layout QuantizedWeight.storage_bits assumes is 0.4 bit more); fp16 / bf16 16, fp32 32 (no scale).
Sizes are in bytes; GB = 1e9 bytes (70e9 params at fp32 = 280 GB), GiB = 2^30 bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lowbit.errors import LowbitError

_CODE_BITS = {"nf4": 4.0, "fp4": 4.0, "ternary": 1.6, "fp8_e4m3": 8.0, "fp8_e5m2": 8.0,
              "fp16": 16.0, "bf16": 16.0, "fp32": 32.0}
UNSCALED = ("fp16", "bf16", "fp32")
ESTIMATE_FORMATS = tuple(f"int{b}" for b in range(8, 1, -1)) + tuple(_CODE_BITS)


def code_bits(fmt: str) -> float:
    """Stored bits per weight code for `fmt` (int2..int8, nf4, fp4, ternary, fp8_*, fp16, bf16, fp32)."""
    if fmt.startswith("int") and fmt[3:].isdigit() and 2 <= int(fmt[3:]) <= 8:
        return float(int(fmt[3:]))
    try:
        return _CODE_BITS[fmt]
    except KeyError:
        raise LowbitError(f"format {fmt!r}: expected one of {', '.join(ESTIMATE_FORMATS)}") from None


@dataclass(frozen=True)
class WeightMemory:
    """Bytes one weight (or a sum of weights) takes at a format."""
    fmt: str
    n_params: float
    code_bytes: float
    scale_bytes: float
    zero_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.code_bytes + self.scale_bytes + self.zero_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.n_params if self.n_params else 0.0

    def __add__(self, other: "WeightMemory") -> "WeightMemory":
        return WeightMemory(self.fmt, self.n_params + other.n_params, self.code_bytes + other.code_bytes,
                            self.scale_bytes + other.scale_bytes, self.zero_bytes + other.zero_bytes)


def _check_group(group_size: int, scale_bits: int = 16) -> None:
    if not (isinstance(scale_bits, int) and scale_bits > 0):
        raise LowbitError(f"scale_bits: expected a positive integer (16 for fp16 scales), got {scale_bits!r}")
    if not isinstance(group_size, int) or group_size < -1:
        raise LowbitError(f"group_size: expected a positive integer, 0 (one scale per tensor) or "
                          f"-1 (per output channel), got {group_size!r}")


def _zero_bits(fmt: str, symmetric: bool) -> float:
    # only asymmetric integer grids carry a zero point; codebooks / fp8 are scale-only
    return code_bits(fmt) if fmt.startswith("int") and not symmetric else 0.0


def estimate_weight_memory(n_params: float, fmt: str, group_size: int = 128, *, symmetric: bool = False,
                           scale_bits: int = 16, in_features: int | None = None) -> WeightMemory:
    """Memory of `n_params` weights at `fmt`, from the count alone.

    group_size > 0: one scale (and zero) per ceil(n/g) group; 0: one per tensor (negligible, counted
    as 1); -1: one per output channel, which needs `in_features` (channels = n / in_features).
    """
    if not (isinstance(n_params, (int, float)) and math.isfinite(n_params) and n_params > 0):
        raise LowbitError(f"params: expected a positive number of parameters, got {n_params!r}")
    _check_group(group_size, scale_bits)
    bits = code_bits(fmt)
    codes = n_params * bits / 8
    if fmt in UNSCALED:
        return WeightMemory(fmt, n_params, codes, 0.0, 0.0)
    if group_size > 0:
        units = math.ceil(n_params / group_size)
    elif group_size == 0:
        units = 1
    else:
        if not (isinstance(in_features, int) and in_features > 0):
            raise LowbitError("group_size=-1 (per channel): pass in_features (the input width of the "
                              "layers) to count the channels")
        units = math.ceil(n_params / in_features)
    return WeightMemory(fmt, n_params, codes, units * scale_bits / 8, units * _zero_bits(fmt, symmetric) / 8)


def tensor_weight_memory(shape: tuple[int, ...], fmt: str, group_size: int = 128, *, symmetric: bool = False,
                         scale_bits: int = 16) -> WeightMemory:
    """Exact memory of one (rows, cols) weight, groups along the last axis (ragged last group counted)."""
    _check_group(group_size, scale_bits)
    n = math.prod(shape)
    bits = code_bits(fmt)
    if fmt in UNSCALED or not shape:
        return WeightMemory(fmt, n, n * bits / 8, 0.0, 0.0)
    cols = shape[-1]
    rows = n // cols if cols else 0
    units = {0: 1, -1: rows}.get(group_size) if group_size <= 0 else rows * math.ceil(cols / group_size)
    return WeightMemory(fmt, n, n * bits / 8, units * scale_bits / 8, units * _zero_bits(fmt, symmetric) / 8)


def human_bytes(n: float) -> str:
    """Decimal units, as disk and model cards use: 280 GB, 538.1 MB."""
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.4g} {unit}" if n / k < 1000 else f"{n / k:.0f} {unit}"
    return f"{n:.0f} B"
