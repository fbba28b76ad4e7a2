"""Quantization-aware training math: fake quantization with a straight-through estimator (STE)
for any int / codebook Scheme, learned scales (LSQ), and the exact hand-over from and back to a
QuantizedWeight. Pure tensor math; the model surgery and training loop live in lowbit.train.qat.

For one weight W (rows, cols) with per-unit scale s and (int formats) zero point z, both expanded
to W's shape by the scheme's granularity (affine.expand_qparams, act-order g_idx included):

    codes = codec.encode(W, s, z)                 the same encoder PTQ uses (int, nf4, fp4, ...)
    V     = codec.decode(codes, 1, z)             the unit-scale value: code - z, NF4[code], ...
    W_hat = V * s                                 bit for bit what QuantizedWeight.dequantize gives

Backward (the STE of Bengio et al. 2013, clipped; LSQ of Esser et al. 2020, arXiv:1902.08153):
with u = W / s and [lo, hi] the representable unit-scale range (qmin - z .. qmax - z for int,
the table's extremes for codebooks),

    dW_hat/dW = 1 where lo <= u <= hi, else 0
    dW_hat/ds = V - u where lo <= u <= hi, else V       (summed over each unit by autograd)

so the forward pass is exactly the quantized model and gradients flow as if rounding were the
identity. Zero points stay fixed (integers in the file formats); LSQ's gradient-scale factor
1/sqrt(n * Qp) is left out because Adam normalises per-parameter step sizes anyway.

Starting from a PTQ result (RTN, GPTQ, ...) the latent weight is its dequantized value
(`latent_from_qweight`): encode(decode(codes)) == codes, since each value sits on a grid point,
a whole rounding step (or table gap) away from any decision boundary. `check_reproduces` proves
it per weight before training starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.affine import codec_for, expand_qparams
from lowbit.numerics.codebooks import E2M1_MAX
from lowbit.numerics.qweight import QuantizedWeight
from lowbit.numerics.scheme import CODEBOOK_FORMATS, FLOAT_FORMATS, INT_FORMATS, Scheme

QAT_FORMATS = INT_FORMATS + CODEBOOK_FORMATS + ("fp8_e4m3", "fp8_e5m2")
_MIN_SCALE = torch.finfo(torch.float32).tiny   # the floor PTQ codecs use too


def check_scheme(scheme: Scheme, name: str = "weight") -> None:
    """QAT trains through int and codebook (NF4, FP4, ternary, fp8) schemes; others are refused."""
    if scheme.format not in QAT_FORMATS:
        raise LowbitError(f"qat {name}: scheme format {scheme.format!r} has no fake-quant path; "
                          f"expected one of {QAT_FORMATS} (ggml block types and plain float casts "
                          "are not trained through)")
    if scheme.format in FLOAT_FORMATS and not scheme.format.startswith("fp8"):
        raise LowbitError(f"qat {name}: {scheme.format!r} is a float cast, nothing to train")


def unit_range(scheme: Scheme, zero: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """[lo, hi] of u = W / s that the codes represent without clipping (expanded zero for int)."""
    if scheme.format == "int":
        return scheme.qmin - zero, scheme.qmax - zero
    if scheme.format in ("nf4", "ternary"):
        return -1.0, 1.0
    if scheme.format == "fp4":
        return -E2M1_MAX, E2M1_MAX
    mx = float(torch.finfo(torch.float8_e4m3fn if scheme.format == "fp8_e4m3" else torch.float8_e5m2).max)
    return -mx, mx


class _FakeQuantLSQ(torch.autograd.Function):
    """(W, s_expanded) -> W_hat; see the module docstring for both gradients."""

    @staticmethod
    def forward(ctx, w, s, z, scheme):
        codec = codec_for(scheme)
        codes = codec.encode(w, s, z, scheme)
        v = codec.decode(codes, torch.ones_like(s), z, scheme)
        u = w / s
        lo, hi = unit_range(scheme, z)
        inside = (u >= lo) & (u <= hi)
        # kept for backward: the mask (1 byte per weight) and, only when the scale trains, one
        # fp32 factor per weight; W_hat itself is returned, not kept
        factor = torch.where(inside, v - u, v) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(inside, factor)
        return v * s

    @staticmethod
    def backward(ctx, grad):
        inside, factor = ctx.saved_tensors
        gw = grad * inside
        gs = grad * factor if factor is not None else None
        return gw, gs, None, None


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme,
                         g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize `w` (rows, cols) with per-unit `scale` / `zero` (qparam_shape), STE
    gradients to `w` and (when it requires grad) LSQ gradients to `scale`."""
    shape = tuple(w.shape)
    s = expand_qparams(scale.clamp_min(_MIN_SCALE), shape, scheme, g_idx)
    z = None if zero is None else expand_qparams(zero.to(w.dtype), shape, scheme, g_idx)
    return _FakeQuantLSQ.apply(w, s, z, scheme)


@dataclass
class LatentWeight:
    """The trainable state of one weight: latent float W and scale; zero / g_idx stay fixed."""
    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None
    scheme: Scheme
    fp16_scales: bool = True      # the PTQ scales were fp16 numbers: freeze rounds trained ones so too


def latent_from_qweight(qw: QuantizedWeight) -> LatentWeight:
    """Latent float weight = the dequantized PTQ weight, so fake quantization gives its codes back."""
    check_scheme(qw.scheme)
    scale = qw.scale.detach().float().clone()
    return LatentWeight(qw.dequantize(torch.float32).clone(), scale,
                        None if qw.zero_point is None else qw.zero_point.detach().float().clone(),
                        None if qw.g_idx is None else qw.g_idx.clone(), qw.scheme,
                        fp16_scales=bool(torch.equal(scale.half().float(), scale)))


def codes_of(lat: LatentWeight, weight: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The codes the latent weight (or `weight` / `scale` given) encodes to now."""
    w = (lat.weight if weight is None else weight).detach().float()
    sc = (lat.scale if scale is None else scale).detach().float().clamp_min(_MIN_SCALE)
    shape = tuple(w.shape)
    s = expand_qparams(sc, shape, lat.scheme, lat.g_idx)
    z = None if lat.zero is None else expand_qparams(lat.zero, shape, lat.scheme, lat.g_idx)
    return codec_for(lat.scheme).encode(w, s, z, lat.scheme)


def check_reproduces(qw: QuantizedWeight, lat: LatentWeight, name: str = "weight") -> None:
    """Step-0 check: fake quantization of the latent weight is the PTQ weight, code for code."""
    codes = codes_of(lat)
    if not torch.equal(codes, qw.qdata):
        n = int((codes != qw.qdata).sum())
        raise LowbitError(f"qat {name}: the latent weight re-encodes to {n} code(s) that differ from the "
                          f"PTQ result ({qw.scheme.short_name()}); refusing to train from a wrong start")
    w_hat = fake_quantize_weight(lat.weight, lat.scale, lat.zero, lat.scheme, lat.g_idx)
    if not torch.equal(w_hat, qw.dequantize(torch.float32)):
        raise LowbitError(f"qat {name}: fake-quantized weight differs from the PTQ weight's dequantized value")


def freeze(lat: LatentWeight, weight: torch.Tensor, scale: torch.Tensor, info: dict | None = None) -> QuantizedWeight:
    """Trained latent weight + scale -> a real QuantizedWeight (the container every exporter reads).

    Scales are rounded to fp16 first when the PTQ scales were fp16 numbers (lowbit's methods make
    them so, and file formats store fp16), so the codes are chosen for the scale the file holds."""
    sc = scale.detach().float().clamp_min(_MIN_SCALE)
    if lat.fp16_scales:
        sc = sc.half().float().clamp_min(float(torch.finfo(torch.float16).tiny))
    if not torch.isfinite(weight).all() or not torch.isfinite(sc).all():
        raise LowbitError("qat freeze: the trained weight or scale has NaN/inf values")
    codes = codes_of(lat, weight, sc)
    return QuantizedWeight(codes, sc.clone(), None if lat.zero is None else lat.zero.clone(), lat.scheme,
                           None if lat.g_idx is None else lat.g_idx.clone(), info=dict(info or {}))
