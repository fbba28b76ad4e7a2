"""Number formats as documented objects: bits, range, spacing near 1.0, bytes per parameter, cast.

    int{b}             signed two's-complement, "full" range   [-2^(b-1), 2^(b-1)-1]   e.g. [-128, 127]
    int{b}_restricted  signed, symmetric "restricted" range   [-(2^(b-1)-1), 2^(b-1)-1] e.g. [-127, 127]
    uint{b}            unsigned                                [0, 2^b - 1]            e.g. [0, 255]
    fp32 fp16 bf16     IEEE-754 binary32 / binary16, bfloat16 (torch dtypes)
    fp8_e4m3           OCP FP8 E4M3 ("fn": no inf, max 448),  torch.float8_e4m3fn
    fp8_e5m2           OCP FP8 E5M2 (IEEE-like, max 57344),   torch.float8_e5m2
                       (Micikevicius et al. 2022, arXiv:2209.05433; OCP 8-bit FP spec v1.0)
    nf4 fp4 ternary    lookup tables from numerics/codebooks.py, in units of the per-group scale

`cast(x)` rounds to the nearest representable value (ties to even for ints and floats) and
saturates at the range: a value beyond max becomes max, never inf/NaN. `cast(x, saturate=False)`
shows what a plain torch `.to(dtype)` does instead (inf for fp16 / e5m2). NaN/inf input is refused.

The formats used as quantization *targets* (Scheme.format) are "int" (any of the int rows, with a
scale and zero point per unit), the codebooks and fp8; this module is about the bare number grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError, check_float_tensor
from lowbit.numerics.codebooks import E2M1_TABLE, NF4_TABLE, TERNARY_TABLE


@dataclass(frozen=True)
class NumberFormat:
    """A number grid. Subclasses fill in how to cast; all report the same facts.

    name             how tables, Schemes and the CLI call it
    kind             "int" | "float" | "codebook"
    storage_bits     bits one value takes in memory (before any per-group scale)
    min_value        most negative representable value
    max_value        largest representable value
    bytes_per_param  storage_bits / 8 as stored (packed for sub-byte formats)
    description      one line, with the source of the numbers
    """
    name: str
    kind: str
    storage_bits: float
    min_value: float
    max_value: float
    description: str

    @property
    def bytes_per_param(self) -> float:
        return self.storage_bits / 8

    @property
    def info_bits(self) -> float:
        """log2 of the number of distinct values (1.58 for ternary; equals storage_bits for ints)."""
        return self.storage_bits

    def cast(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        """x (float) -> the nearest representable values, as float32."""
        raise NotImplementedError

    def step_near_one(self) -> float:
        """Gap between 1.0's nearest representable value and the next one above it (or below it,
        when that value is the format's max): the resolution a value of magnitude ~1 sees."""
        at = float(self.cast(torch.tensor([1.0]))[0])
        up = self._next_up(at)
        return (up - at) if up is not None else (at - self._next_down(at))

    # neighbours on the grid, for step_near_one; subclasses with tables override
    def _next_up(self, v: float) -> float | None:
        raise NotImplementedError

    def _next_down(self, v: float) -> float:
        raise NotImplementedError

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor(x, f"{self.name}.cast(x)", allow_empty=True)
        return x.float()


@dataclass(frozen=True)
class IntFormat(NumberFormat):
    """Integer grid: round half to even, clamp to [min_value, max_value]."""
    signed: bool = True
    restricted: bool = False

    def cast(self, x, saturate=True):
        x = self._check(x)
        r = torch.round(x)
        if not saturate and bool(((r < self.min_value) | (r > self.max_value)).any()):
            raise LowbitError(f"{self.name}.cast: values outside [{self.min_value:g}, {self.max_value:g}] "
                              "and saturate=False; integers have no inf to overflow into")
        return r.clamp(self.min_value, self.max_value)

    def _next_up(self, v):
        return v + 1 if v + 1 <= self.max_value else None

    def _next_down(self, v):
        return v - 1


def int_format(bits: int, signed: bool = True, restricted: bool = False) -> IntFormat:
    if not (isinstance(bits, int) and 2 <= bits <= 8):
        raise LowbitError(f"int_format(bits=...): expected an integer in 2..8, got {bits!r}")
    if restricted and not signed:
        raise LowbitError("int_format: restricted=True applies to signed integers only")
    if signed:
        hi = (1 << (bits - 1)) - 1
        lo = -hi if restricted else -hi - 1
        name = f"int{bits}_restricted" if restricted else f"int{bits}"
        if restricted:
            what = f"signed {bits}-bit, symmetric restricted range [{lo}, {hi}] (scale = absmax/{hi})"
        else:
            what = f"signed {bits}-bit two's complement, full range [{lo}, {hi}]"
    else:
        lo, hi = 0, (1 << bits) - 1
        name, what = f"uint{bits}", f"unsigned {bits}-bit [0, {hi}] (asymmetric codes with a zero point)"
    return IntFormat(name=name, kind="int", storage_bits=bits, min_value=lo, max_value=hi,
                     description=what, signed=signed, restricted=restricted)


@dataclass(frozen=True)
class FloatFormat(NumberFormat):
    """A torch floating dtype: round to nearest even via `.to(dtype)`, saturating first."""
    dtype: torch.dtype = torch.float32

    def cast(self, x, saturate=True):
        x = self._check(x)
        if saturate:
            x = x.clamp(self.min_value, self.max_value)
        return x.to(self.dtype).float()

    def _ulp(self, v: float) -> float:
        # spacing of the binade holding v: eps * 2^floor(log2 v)
        return float(torch.finfo(self.dtype).eps) * 2.0 ** math.floor(math.log2(abs(v)))

    def _next_up(self, v):
        return v + self._ulp(v) if v < self.max_value else None

    def _next_down(self, v):
        return v - self._ulp(v)

    @property
    def smallest_subnormal(self) -> float:
        fi = torch.finfo(self.dtype)
        return float(fi.tiny) * float(fi.eps)


def float_format(name: str, dtype: torch.dtype, description: str) -> FloatFormat:
    fi = torch.finfo(dtype)
    return FloatFormat(name=name, kind="float", storage_bits=fi.bits, min_value=float(fi.min),
                       max_value=float(fi.max), description=description, dtype=dtype)


@dataclass(frozen=True)
class CodebookFormat(NumberFormat):
    """A table of values; cast picks the nearest entry (after clamping to the table's range).

    The values are in units of a per-group scale (absmax for nf4, absmax/6 for fp4, absmean for
    ternary); numerics/codebooks.py holds the tables, their sources and the codecs.
    """
    table: tuple = ()
    n_values: int = 0

    @property
    def info_bits(self) -> float:
        return math.log2(self.n_values)

    def _sorted(self) -> torch.Tensor:
        return torch.tensor(sorted(set(float(v) for v in self.table)))

    def cast(self, x, saturate=True):
        x = self._check(x)
        t = self._sorted()
        mids = (t[1:] + t[:-1]) / 2
        return t[torch.bucketize(x.clamp(float(t[0]), float(t[-1])), mids)]

    def _next_up(self, v):
        above = [float(t) for t in self._sorted() if t > v]
        return above[0] if above else None

    def _next_down(self, v):
        return max(float(t) for t in self._sorted() if t < v)

    def values(self) -> torch.Tensor:
        return self._sorted()


# ---------------------------------------------------------------------------------------------
# The registry of formats, in the order `lowbit formats` prints them.
# ---------------------------------------------------------------------------------------------
def _build() -> dict[str, NumberFormat]:
    out: dict[str, NumberFormat] = {}
    for f in [float_format("fp32", torch.float32, "IEEE-754 binary32: 1 sign, 8 exponent, 23 mantissa bits"),
              float_format("fp16", torch.float16, "IEEE-754 binary16: 1 sign, 5 exponent, 10 mantissa bits"),
              float_format("bf16", torch.bfloat16, "bfloat16: fp32's 8-bit exponent, 7 mantissa bits"),
              float_format("fp8_e4m3", torch.float8_e4m3fn,
                           "OCP FP8 E4M3 (fn): 4 exponent, 3 mantissa, no inf, max 448 (arXiv:2209.05433)"),
              float_format("fp8_e5m2", torch.float8_e5m2,
                           "OCP FP8 E5M2: 5 exponent, 2 mantissa, IEEE-like inf/NaN, max 57344 (arXiv:2209.05433)")]:
        out[f.name] = f
    for bits in range(8, 1, -1):
        for f in (int_format(bits), int_format(bits, restricted=True), int_format(bits, signed=False)):
            out[f.name] = f
    out["nf4"] = CodebookFormat(
        name="nf4", kind="codebook", storage_bits=4, min_value=-1.0, max_value=1.0,
        description="NormalFloat4, 16 normal quantiles in [-1, 1] x absmax (QLoRA, arXiv:2305.14314)",
        table=NF4_TABLE, n_values=16)
    out["fp4"] = CodebookFormat(
        name="fp4", kind="codebook", storage_bits=4, min_value=-6.0, max_value=6.0,
        description="FP4 E2M1 {0,.5,1,1.5,2,3,4,6} x absmax/6 (OCP Microscaling spec v1.0)",
        table=E2M1_TABLE, n_values=15)  # +0 and -0 are one value
    out["ternary"] = CodebookFormat(
        name="ternary", kind="codebook", storage_bits=8 / 5, min_value=-1.0, max_value=1.0,
        description="{-1, 0, 1} x absmean (BitNet b1.58, arXiv:2402.17764); 5 trits per byte",
        table=TERNARY_TABLE, n_values=3)
    return out


FORMATS: dict[str, NumberFormat] = _build()


def get_format(name: str) -> NumberFormat:
    """A format by name (see FORMATS); "int4" etc. are the full-range signed integers."""
    try:
        return FORMATS[name]
    except KeyError:
        raise LowbitError(f"format {name!r}: expected one of {', '.join(FORMATS)}") from None
