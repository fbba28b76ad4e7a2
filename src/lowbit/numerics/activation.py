"""What a quantized activation is: ActScheme, and the (fake-)quantization of a linear's input.

    int8  symmetric, codes in [-128, 127], scale = absmax / 127              (vLLM's int8 W8A8)
    fp8   fp8_e4m3 ("fn", max 448), scale = absmax / 448                     (vLLM's fp8 W8A8)

    dynamic=True   the scale is computed from each input at run time: per token (one scale per row
                   of x: (..., in) -> (..., 1)) or per tensor
    dynamic=False  one per-tensor scale fixed from calibration inputs by a range calibrator of
                   numerics/ranges.py: minmax | percentile | mse | kl

LLM.int8() (Dettmers, Lewis, Belkada, Zettlemoyer, arXiv:2208.07339, sec. 3.2): vector-wise int8
(per-token activation scales, per-row weight scales) with a mixed-precision decomposition: the
input columns holding any |x| > outlier_threshold (6.0 in the paper) in the current input stay in
16-bit (fp16), the rest go through int8. The linear then computes W (Q(x_inliers) + x_outliers).

Pure tensor functions; nn/actquant.py attaches them to QuantLinear.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from lowbit.errors import LowbitError, check_float_tensor
from lowbit.numerics.ranges import METHODS as CALIBRATORS
from lowbit.numerics.scheme import Scheme

ACT_FORMATS = {"int8": 127.0, "fp8_e4m3": 448.0}   # format -> the largest code magnitude


@dataclass(frozen=True)
class ActScheme:
    format: str = "int8"                  # int8 | fp8_e4m3
    dynamic: bool = True
    granularity: str = "token"            # token | tensor
    calibrator: str = "minmax"            # static only: minmax | percentile | mse | kl
    outlier_threshold: float | None = None   # LLM.int8(): columns with |x| > t stay in fp16

    def __post_init__(self) -> None:
        if self.format not in ACT_FORMATS:
            raise LowbitError(f"input_activations format: expected one of {sorted(ACT_FORMATS)}, got {self.format!r}")
        if self.granularity not in ("token", "tensor"):
            raise LowbitError(f"input_activations granularity: expected token|tensor, got {self.granularity!r}")
        if not self.dynamic and self.granularity != "tensor":
            raise LowbitError("input_activations: static (dynamic=False) scales are per tensor; "
                              f"got granularity {self.granularity!r}")
        if self.calibrator not in CALIBRATORS:
            raise LowbitError(f"input_activations calibrator: expected one of {CALIBRATORS}, got {self.calibrator!r}")
        t = self.outlier_threshold
        if t is not None and not (isinstance(t, (int, float)) and t > 0):
            raise LowbitError(f"input_activations outlier_threshold: expected a positive number, got {t!r}")
        if t is not None and not (self.dynamic and self.format == "int8"):
            raise LowbitError("input_activations outlier_threshold (LLM.int8()): needs dynamic int8")

    @property
    def qmax(self) -> float:
        return ACT_FORMATS[self.format]

    def range_scheme(self) -> Scheme:
        """The per-tensor Scheme the range calibrators see (their codec, their number of levels)."""
        if self.format == "int8":
            return Scheme(bits=8, symmetric=True, granularity="tensor")
        return Scheme(format=self.format, granularity="tensor")

    def short_name(self) -> str:
        if self.outlier_threshold is not None:
            return f"a8-llmint8({self.outlier_threshold:g})"
        f = "a8" if self.format == "int8" else "afp8"
        return f"{f}-{'dyn-' + self.granularity if self.dynamic else 'static-' + self.calibrator}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ActScheme":
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise LowbitError(f"input_activations: unknown keys {sorted(set(d) - known)}; expected some of {sorted(known)}")
        return cls(**d)


def act_scale(x: torch.Tensor, scheme: ActScheme) -> torch.Tensor:
    """Dynamic scale: (..., 1) per token or a 0-d tensor per tensor; all-zero inputs get scale 1."""
    a = x.abs().amax(dim=-1, keepdim=True) if scheme.granularity == "token" else x.abs().amax()
    return torch.where(a > 0, a / scheme.qmax, torch.ones_like(a))


def quantize_act(x: torch.Tensor, scale: torch.Tensor, scheme: ActScheme) -> torch.Tensor:
    """Codes: int8 tensor, or float8_e4m3fn."""
    y = x / scale
    if scheme.format == "int8":
        return y.round().clamp(-128, 127).to(torch.int8)
    return y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def fake_quant_act(x: torch.Tensor, scheme: ActScheme, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x -> dequantize(quantize(x)) in x's dtype; `scale` for static schemes (else computed).

    NaN/inf never turn into finite codes (a NaN absmax gives act_scale's scale 1, and the int8
    cast of NaN is arbitrary): as in the C++ op (lowbit_cpu.w8a8_linear), a token holding NaN
    or inf comes out all NaN under a per-token scale, every token under a dynamic per-tensor
    scale; a static scale clamps inf to the largest code and gives a NaN token a NaN row."""
    s = act_scale(x, scheme) if scale is None else scale
    y = quantize_act(x, s, scheme).to(torch.float32) * s
    bad = torch.isnan(x) if not scheme.dynamic else ~torch.isfinite(x)
    per_tensor = scheme.dynamic and scheme.granularity == "tensor"
    return y.masked_fill(bad.any() if per_tensor else bad.any(-1, keepdim=True), float("nan")).to(x.dtype)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(in,) bool: the input columns holding any |x| > threshold in this input (LLM.int8())."""
    return (x.abs() > threshold).reshape(-1, x.shape[-1]).any(0)


def llm_int8_act(x: torch.Tensor, scheme: ActScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8()'s decomposition of the input: int8 per token on the inlier columns, fp16 on the
    outlier columns. Returns (x_hat, outlier column mask)."""
    cols = outlier_columns(x, scheme.outlier_threshold)
    inl = x.masked_fill(cols, 0.0)
    x_hat = fake_quant_act(inl, scheme)
    x_hat = torch.where(cols, x.to(torch.float16).to(x.dtype), x_hat)
    return x_hat, cols


def static_scale(lo: torch.Tensor, hi: torch.Tensor, scheme: ActScheme) -> torch.Tensor:
    """The per-tensor scale of a calibrated range (symmetric: the larger magnitude)."""
    a = torch.maximum(lo.abs(), hi.abs()).reshape(())
    return torch.where(a > 0, a / scheme.qmax, torch.ones_like(a)).float()


def check_act(x: torch.Tensor, layer: str) -> None:
    check_float_tensor(x, f"input activations of {layer}")
