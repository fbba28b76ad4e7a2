"""Lookup-table and float-cast formats: NF4, FP4 (e2m1), ternary, fp8 e4m3 / e5m2.

Each format registers a Codec with numerics/affine.py, so the granularity machinery there
(tensor / channel / group / block, ragged last groups) works unchanged:

    Scheme(format="nf4", granularity="group", group_size=64)     -> quantize_weight(w, scheme)

Every codec follows "one scale per unit, then encode each value":

    format     scale per unit          code (uint8)                          x_hat
    nf4        absmax                  index of the nearest NF4 entry 0..15   NF4[code] * scale
    fp4        absmax / 6              e2m1 bit pattern s.ee.m, 0..15         E2M1[code] * scale
    ternary    absmean (BitNet b1.58)  round(clamp(x/scale, -1, 1)) + 1       (code - 1) * scale
    fp8_e4m3   absmax / 448            float8_e4m3fn bits viewed as uint8     fp8(code) * scale
    fp8_e5m2   absmax / 57344          float8_e5m2  bits viewed as uint8      fp8(code) * scale

None of them has a zero point (QParams.zero is None), so QuantizedWeight.storage_bits counts
codes at Scheme.code_bits (4, 4, 2, 8, 8) plus one fp16 scale per unit.
"""
from __future__ import annotations

import torch

from lowbit.numerics.affine import as_units, expand_qparams, qparam_shape, register_codec
from lowbit.numerics.scheme import Scheme

_TINY = torch.finfo(torch.float32).tiny

# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
# NF4 ("4-bit NormalFloat"), QLoRA: Dettmers et al. 2023, arXiv:2305.14314, section 3 and
# bitsandbytes' `get_4bit_type("nf4")` / CUDA `dDequantizeNF4`. The entries are quantiles of
# N(0, 1), normalised to [-1, 1] and made asymmetric so that 0 is exact:
#     positives: Phi^-1 at 8 points evenly spaced from 0.9677083 down to (excl.) 0.5
#     negatives: -Phi^-1 at 7 points evenly spaced from 0.9677083 down to (excl.) 0.5
#     plus 0; sorted; divided by the largest.
# (offset 0.9677083 = mean of the two "1 - 1/(2*n)" choices for 15 and 16 values, per the paper.)
# `nf4_from_quantiles()` rebuilds the table from that construction; tests check it matches.
# Code i is the i-th entry in ascending order, the same index bitsandbytes stores.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 E2M1 as defined by the OCP Microscaling Formats (MX) v1.0 spec (2023), table 1, and used
# by MXFP4 / NVFP4: 1 sign, 2 exponent (bias 1), 1 mantissa bit, no inf/NaN.
#     bits s e1 e0 m       value
#          0 00 0  -> 0     0 00 1 -> 0.5 (subnormal)   0 01 0 -> 1.0   0 01 1 -> 1.5
#          0 10 0  -> 2     0 10 1 -> 3                 0 11 0 -> 4     0 11 1 -> 6
# code = the 4-bit pattern (bit 3 = sign), so codes are the real FP4 encoding (code 8 is -0).
# Note: bitsandbytes' "fp4" is a different e2m1 variant (no subnormal, max normalised to 1);
# we follow the OCP spec because that is what hardware and current file formats use.
E2M1_TABLE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0

# Ternary {-1, 0, 1}: BitNet b1.58, Ma et al. 2024, arXiv:2402.17764, eq. (1)-(3):
#     scale = mean(|W|) over the unit (absmean), W_q = RoundClip(W / scale, -1, 1).
# code = W_q + 1 in {0, 1, 2}, so codes pack as 2-bit values or 5 trits per byte (packing.py).
TERNARY_TABLE = (-1.0, 0.0, 1.0)


def nf4_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """The NF4 table rebuilt from normal quantiles, as QLoRA (arXiv:2305.14314) describes it."""
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (v / v.max()).float()


def _nearest_sorted(v: torch.Tensor, table_sorted: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of an ascending table (ties go to the lower entry)."""
    mids = (table_sorted[1:] + table_sorted[:-1]) / 2
    return torch.bucketize(v, mids)


# ---------------------------------------------------------------------------------------------
# Codecs
# ---------------------------------------------------------------------------------------------
def _absmax(min_val: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    return torch.maximum(min_val.abs(), max_val.abs())


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # an all-zero unit: any scale reproduces it; 1.0 keeps it finite and deterministic
    return torch.where(scale > _TINY, scale, torch.ones_like(scale))


@register_codec("nf4")
class NF4Codec:
    """x / absmax -> nearest NF4 entry (QLoRA, arXiv:2305.14314)."""
    table = torch.tensor(NF4_TABLE)

    def params(self, min_val, max_val, scheme):
        return _safe(_absmax(min_val, max_val)), None

    def encode(self, x, scale, zero, scheme):
        return _nearest_sorted((x / scale).clamp(-1.0, 1.0), self.table).to(torch.uint8)

    def decode(self, codes, scale, zero, scheme):
        return self.table.to(scale.dtype)[codes.long()] * scale


@register_codec("fp4")
class FP4Codec:
    """x / (absmax / 6) -> nearest OCP E2M1 value; code = its 4-bit pattern."""
    table = torch.tensor(E2M1_TABLE)
    # ascending magnitudes 0..6 with the code of the positive value; sign added as bit 3
    _mags = torch.tensor(E2M1_TABLE[:8])

    def params(self, min_val, max_val, scheme):
        return _safe(_absmax(min_val, max_val) / E2M1_MAX), None

    def encode(self, x, scale, zero, scheme):
        v = (x / scale).clamp(-E2M1_MAX, E2M1_MAX)
        mag_code = _nearest_sorted(v.abs(), self._mags)     # 0..7, the positive bit pattern
        sign = (v < 0) & (mag_code > 0)                      # keep +0 for zero: one code for 0
        return (mag_code + 8 * sign).to(torch.uint8)

    def decode(self, codes, scale, zero, scheme):
        return self.table.to(scale.dtype)[codes.long()] * scale


def unit_absmean(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """mean(|x|) per quantization unit, shaped qparam_shape; exact for ragged groups/blocks.

    Each element's unit index comes from expand_qparams over arange(units), so the sum and
    count are over the real values only (as_units would repeat a ragged unit's last value).
    """
    qs = qparam_shape(tuple(x.shape), scheme)
    n_units = 1
    for d in qs:
        n_units *= d
    if scheme.granularity == "tensor" or (scheme.granularity == "group" and x.shape[-1] % scheme.group_size == 0):
        return as_units(x.abs(), scheme).mean(dim=1).reshape(qs)
    idx = expand_qparams(torch.arange(n_units).reshape(qs), tuple(x.shape), scheme).reshape(-1)
    sums = torch.zeros(n_units, dtype=torch.float64).index_add_(0, idx, x.abs().reshape(-1).double())
    counts = torch.bincount(idx, minlength=n_units).double()
    return (sums / counts).float().reshape(qs)


@register_codec("ternary")
class TernaryCodec:
    """BitNet b1.58 (arXiv:2402.17764): scale = absmean, codes {0, 1, 2} for {-1, 0, 1}.

    `default_range` gives (-absmean, absmean) per unit, which affine.choose_qparams uses instead
    of min/max; a range from ranges.py (or min-max) is read as scale = its absmax.
    """

    def default_range(self, x, scheme):
        a = unit_absmean(x, scheme)
        return -a, a

    def params(self, min_val, max_val, scheme):
        return _safe(_absmax(min_val, max_val)), None

    def encode(self, x, scale, zero, scheme):
        return (torch.round((x / scale).clamp(-1.0, 1.0)) + 1).to(torch.uint8)

    def decode(self, codes, scale, zero, scheme):
        return (codes.to(scale.dtype) - 1.0) * scale


class _FP8Codec:
    """scale = absmax / finfo.max, then a saturating cast to fp8 (round to nearest even);
    codes are the fp8 bit pattern viewed as uint8 (what safetensors / compressed-tensors store
    as float8_e4m3fn). fp8 E4M3 / E5M2: Micikevicius et al. 2022, "FP8 Formats for Deep
    Learning", arXiv:2209.05433."""
    dtype: torch.dtype

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    def params(self, min_val, max_val, scheme):
        return _safe(_absmax(min_val, max_val) / self.max), None

    def encode(self, x, scale, zero, scheme):
        v = (x / scale).clamp(-self.max, self.max)
        return v.to(self.dtype).contiguous().view(torch.uint8)

    def decode(self, codes, scale, zero, scheme):
        return codes.contiguous().view(self.dtype).to(scale.dtype) * scale


@register_codec("fp8_e4m3")
class FP8E4M3Codec(_FP8Codec):
    dtype = torch.float8_e4m3fn


@register_codec("fp8_e5m2")
class FP8E5M2Codec(_FP8Codec):
    dtype = torch.float8_e5m2
