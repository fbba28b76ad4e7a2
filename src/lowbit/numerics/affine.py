"""Affine quantization on torch tensors: granularity, qparams, quantize / dequantize / fake_quantize.

    code  = clamp(round(x / scale + zero), qmin, qmax)          stored unsigned, in [0, 2^bits)
    x_hat = (code - zero) * scale

Symmetric schemes fix zero = 2^(bits-1) (8 for 4 bits) and take scale = absmax / (2^(bits-1) - 1),
so codes read as signed values code - 8 in [-8, 7] ("full") or [-7, 7] ("restricted").
Asymmetric schemes take scale = (max - min) / (2^bits - 1) over a range widened to include 0
(so 0.0 is exact, which padding and ReLU-like zeros need) and an integer zero point, the
convention of GPTQ (arXiv:2210.17323) and of the GPTQ / AWQ / compressed-tensors file formats.

Non-integer formats (NF4, FP4, ternary, fp8, ...) register a Codec here and reuse the same
granularity machinery: every format is "scale per unit, then encode/decode each value".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError, check_float_tensor
from lowbit.numerics.scheme import Scheme

_TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------
# Granularity: view a tensor as (units, values_per_unit) and expand per-unit qparams back.
# ---------------------------------------------------------------------------------------------
def qparam_shape(shape: tuple[int, ...], scheme: Scheme) -> tuple[int, ...]:
    """Shape of scale / zero tensors for a tensor of `shape` under `scheme`."""
    g = scheme.granularity
    if g == "tensor":
        return (1,) * len(shape)
    if g == "channel":
        _need_2d(shape, scheme)
        return (shape[0], 1) if scheme.axis == 0 else (1, shape[1])
    if g == "group":
        return tuple(shape[:-1]) + (scheme.n_groups(shape[-1]),)
    _need_2d(shape, scheme)
    br, bc = scheme.block_size
    return (-(-shape[0] // br), -(-shape[1] // bc))


def _need_2d(shape, scheme: Scheme) -> None:
    if len(shape) != 2:
        raise LowbitError(f"granularity={scheme.granularity!r} needs a 2-D tensor, got shape {tuple(shape)}")


def as_units(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """(U, L) view of x, one row per quantization unit, in qparam_shape order.

    A ragged last group / block is padded by repeating its own last value, which changes
    neither its min, max nor absmax (range searches see one value a few times more).
    """
    g = scheme.granularity
    if g == "tensor":
        return x.reshape(1, -1)
    if g == "channel":
        _need_2d(x.shape, scheme)
        return x if scheme.axis == 0 else x.t()
    if g == "group":
        cols = x.shape[-1]
        n = scheme.n_groups(cols)
        rows = x.reshape(-1, cols)
        pad = n * scheme.group_size - cols
        if pad:
            rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
        return rows.reshape(-1, scheme.group_size)
    _need_2d(x.shape, scheme)
    br, bc = scheme.block_size
    rb, cb = qparam_shape(x.shape, scheme)
    xp = F.pad(x[None], (0, cb * bc - x.shape[1], 0, rb * br - x.shape[0]), mode="replicate")[0]
    return xp.reshape(rb, br, cb, bc).permute(0, 2, 1, 3).reshape(rb * cb, br * bc)


def expand_qparams(p: torch.Tensor, shape: tuple[int, ...], scheme: Scheme,
                   g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Broadcast per-unit qparams `p` (qparam_shape) to the full tensor shape.

    g_idx (cols,) maps each column to its group, for act-order (GPTQ desc_act) layouts.
    """
    g = scheme.granularity
    if g in ("tensor", "channel"):
        return p.expand(shape)
    if g == "group":
        if g_idx is not None:
            return p[..., g_idx.long()]
        return p.repeat_interleave(scheme.group_size, dim=-1)[..., : shape[-1]]
    br, bc = scheme.block_size
    return p.repeat_interleave(br, 0).repeat_interleave(bc, 1)[: shape[0], : shape[1]]


def unit_minmax(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit min and max, shaped qparam_shape."""
    u = as_units(x, scheme)
    qs = qparam_shape(tuple(x.shape), scheme)
    return u.amin(dim=1).reshape(qs), u.amax(dim=1).reshape(qs)


# ---------------------------------------------------------------------------------------------
# Codecs: how one scaled value becomes a code. "int" lives here; others register themselves.
# ---------------------------------------------------------------------------------------------
class Codec(Protocol):
    def params(self, min_val: torch.Tensor, max_val: torch.Tensor, scheme: Scheme
               ) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def encode(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme
               ) -> torch.Tensor: ...
    def decode(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme
               ) -> torch.Tensor: ...


_CODECS: dict[str, Codec] = {}


def register_codec(fmt: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _CODECS[fmt] = cls()
        return cls
    return deco


def codec_for(scheme: Scheme) -> Codec:
    try:
        return _CODECS[scheme.format]
    except KeyError:
        raise LowbitError(f"no codec registered for format {scheme.format!r}; "
                          f"registered: {sorted(_CODECS)}") from None


@register_codec("int")
class IntCodec:
    """Uniform integer grid, unsigned codes with a zero point (see module docstring)."""

    def params(self, min_val, max_val, scheme):
        if scheme.symmetric:
            absmax = torch.maximum(min_val.abs(), max_val.abs())
            scale = absmax / (scheme.sym_zero - 1)
            zero = torch.full_like(scale, float(scheme.sym_zero))
        else:
            lo = torch.clamp(min_val, max=0.0)
            hi = torch.clamp(max_val, min=0.0)
            scale = (hi - lo) / scheme.qmax
            zero = torch.clamp(torch.round(-lo / torch.where(scale > 0, scale, 1.0)), 0, scheme.qmax)
        # an all-zero unit: any scale reproduces it; 1.0 keeps it finite and deterministic
        scale = torch.where(scale > _TINY, scale, torch.ones_like(scale))
        return scale, zero

    def encode(self, x, scale, zero, scheme):
        q = torch.round(x / scale + zero)
        return torch.clamp(q, scheme.qmin, scheme.qmax).to(torch.uint8)

    def decode(self, codes, scale, zero, scheme):
        return (codes.to(scale.dtype) - zero) * scale


# ---------------------------------------------------------------------------------------------
# Public primitives
# ---------------------------------------------------------------------------------------------
@dataclass
class QParams:
    """scale and zero (None for zero-free formats), shaped qparam_shape(tensor.shape, scheme)."""
    scale: torch.Tensor
    zero: torch.Tensor | None


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, scheme: Scheme) -> QParams:
    """The qparams that map [min_val, max_val] (per unit) onto the scheme's grid."""
    scale, zero = codec_for(scheme).params(min_val.float(), max_val.float(), scheme)
    return QParams(scale, zero)


def choose_qparams(x: torch.Tensor, scheme: Scheme, clip_ratio: float | torch.Tensor = 1.0) -> QParams:
    """Min-max qparams, optionally shrinking each unit's range by `clip_ratio` (scalar or per unit)."""
    check_float_tensor(x, "x")
    # a codec may define its own default range (ternary: BitNet's absmean), else min-max
    default_range = getattr(codec_for(scheme), "default_range", None)
    mn, mx = default_range(x.float(), scheme) if default_range else unit_minmax(x.float(), scheme)
    return qparams_from_range(mn * clip_ratio, mx * clip_ratio, scheme)


def quantize(x: torch.Tensor, qp: QParams, scheme: Scheme, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Float tensor -> codes (uint8 for int/codebook formats), same shape as x."""
    check_float_tensor(x, "x")
    shape = tuple(x.shape)
    s = expand_qparams(qp.scale, shape, scheme, g_idx)
    z = None if qp.zero is None else expand_qparams(qp.zero, shape, scheme, g_idx)
    return codec_for(scheme).encode(x.float(), s, z, scheme)


def dequantize(codes: torch.Tensor, qp: QParams, scheme: Scheme, g_idx: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes -> float tensor of `dtype`."""
    shape = tuple(codes.shape)
    s = expand_qparams(qp.scale.float(), shape, scheme, g_idx)
    z = None if qp.zero is None else expand_qparams(qp.zero.float(), shape, scheme, g_idx)
    return codec_for(scheme).decode(codes, s, z, scheme).to(dtype)


def quantize_dequantize(x: torch.Tensor, scheme: Scheme, qp: QParams | None = None) -> torch.Tensor:
    """x -> x_hat through the scheme's grid (min-max qparams unless given)."""
    qp = qp or choose_qparams(x, scheme)
    return dequantize(quantize(x, qp, scheme), qp, scheme, dtype=x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scheme, qp):
        return quantize_dequantize(x, scheme, qp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quantize(x: torch.Tensor, scheme: Scheme, qp: QParams | None = None) -> torch.Tensor:
    """Quantize-dequantize in the forward pass; identity gradient (straight-through estimator,
    Bengio et al. 2013), as QAT needs."""
    return _FakeQuantSTE.apply(x, scheme, qp)


# ---------------------------------------------------------------------------------------------
# Error metrics
# ---------------------------------------------------------------------------------------------
def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(torch.mean((x.double() - x_hat.double()) ** 2))


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10*log10(sum x^2 / sum (x - x_hat)^2), in dB."""
    noise = float(torch.sum((x.double() - x_hat.double()) ** 2))
    signal = float(torch.sum(x.double() ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
