"""W8A8 on integer units: int8 inputs x int8 weights -> int32, one float rescale per output.

    x (M, K) float ─ per-token (dynamic) or calibrated (static) scale s_x ─> x_q int8 (M, K)
    W (N, K) int8 codes, per-row scale s_w (N,)       stored transposed: W^T (K, N) int8
    y = (x_q @ W^T) int32 * s_x (M, 1) * s_w (1, N) + bias

The int8 x int8 -> int32 product is lowbit's own C++ op (nn/ext: lowbit_cpu.w8a8_linear, the input
rounding done in the same call; AVX-512 VNNI vpdpbusd, AVX-512 / AVX2 vpmaddwd on int16-widened
codes, portable C++; exact on every variant), else torch._int_mm, which on x86 runs oneDNN's
s8s8s32 GEMM (used only where a probe finds it exact: int_mm_status). Both give the same bits
(tests/test_activations.py). It computes exactly what the
reference path (QuantLinear.forward: fake-quantized input, dequantized weight) computes, up to
float summation order: the int32 sum is exact, the reference's float32 sum of the same integer
products is exact while it stays below 2^24 and rounds beyond.

    n = prepare_w8a8(model)   # QuantLinears with int8 symmetric per-row weights and int8 input
                              # quantization (not LLM.int8()) get this kernel; returns the count
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.nn.qlinear import QuantLinear
from lowbit.numerics.activation import outlier_columns


@functools.lru_cache(maxsize=None)
def int_mm_status() -> str:
    """'exact', or why torch._int_mm is not used here: missing, or not exact on this CPU. oneDNN's
    s8s8 GEMM without VNNI (AVX2 vpmaddubsw) adds pairs of u8 x s8 products in int16 with
    saturation, so large inputs come out wrong (measured: up to 4.4 off on SmolLM2's down_proj with
    oneDNN held to AVX2); a probe at the extremes of int8, at a size that takes the GEMM path,
    must equal the exact int64 product, else the reference float path serves."""
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (64, 256), generator=g, dtype=torch.int16)
        b = torch.randint(-128, 128, (256, 64), generator=g, dtype=torch.int16)
        a[:8], b[:, :8] = 127, -128                       # the pairs that overflow int16 when added
        a[8:16], b[:, 8:16] = -128, 127
        a[16:24], b[:, 16:24] = -128, -128
        got = torch._int_mm(a.to(torch.int8), b.to(torch.int8))
    except (RuntimeError, AttributeError) as e:
        return f"torch._int_mm unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    want = a.long() @ b.long()
    if not torch.equal(got.long(), want):
        bad = int((got.long() != want).sum())
        return (f"torch._int_mm is not exact on this CPU ({bad} of {want.numel()} sums wrong at the int8 "
                "extremes: int16 saturation without VNNI); W8A8 runs the float reference path")
    return "exact"


def backend() -> str | None:
    """'ext' (our C++ op), 'int_mm' (torch._int_mm, exact here) or None (the float reference path)."""
    from lowbit.nn import ext
    if ext.load():
        return "ext"
    return "int_mm" if has_int_mm() else None


def has_int_mm() -> bool:
    """torch._int_mm exists and is exact here (int_mm_status says why not)."""
    return int_mm_status() == "exact"


def eligible(mod: nn.Module, backend_: str | None = None) -> bool:
    """An int8 symmetric per-row weight with int8 input quantization: a QuantLinear (in memory
    after api.quantize) or a PackedLinear (read from a file). LLM.int8() layers (an outlier
    threshold) only on our C++ op (backend_ "ext", the default where it loads)."""
    from lowbit.nn.prepare import PackedLinear
    if not isinstance(mod, QuantLinear) or mod.act_quant is None or type(mod) not in (QuantLinear, PackedLinear):
        return False
    s, a = mod.scheme, mod.act_quant.scheme
    if a.outlier_threshold is not None and (backend_ or backend()) != "ext":
        return False
    return (s.format == "int" and s.bits == 8 and s.symmetric and s.granularity == "channel" and s.axis == 0
            and mod.g_idx is None and a.format == "int8")


class W8A8Kernel:
    """The callable QuantLinear.set_kernel takes: (x, module) -> y. It quantizes the input itself."""
    quantizes_input = True

    def __init__(self, mod: QuantLinear, backend_: str | None = None):
        self.backend = backend_ or backend()
        if self.backend is None:
            raise LowbitError(f"W8A8 kernel: no exact int8 GEMM here ({int_mm_status()}; lowbit's C++ "
                              "kernels unavailable)")
        if mod.act_quant is not None and mod.act_quant.scheme.outlier_threshold is not None and self.backend != "ext":
            raise LowbitError("W8A8 kernel: LLM.int8() (outlier columns in fp16) runs on lowbit's C++ op only, "
                              f"not on backend {self.backend!r}")
        self.w_scale = mod.scale.reshape(1, -1).float()
        self.bias = None if mod.bias is None else mod.bias.detach().float().contiguous()
        zero = mod.scheme.sym_zero
        if self.backend == "ext":
            global _w8a8_linear
            _w8a8_linear = torch.ops.lowbit_cpu.w8a8_linear.default
            k = mod.in_features
            kp = -(-k // 64) * 64
            if kp > 65536:
                raise LowbitError(f"W8A8 kernel: {k} input features; the int32 sums are exact up to 65536")
            codes = _packed_u8_codes(mod, kp)
            if codes is None:
                codes = mod.qdata
                if kp != k:     # pad columns hold the zero point (weight 0); x reads 0 there
                    codes = torch.cat([codes, torch.full((codes.shape[0], kp - k), zero, dtype=torch.uint8)], 1)
            self.codes = codes.contiguous()
            self.zero = int(zero)
            self.w_scale_1d = self.w_scale.reshape(-1).contiguous()
        else:
            # unsigned codes with the symmetric zero point 128 -> signed int8, transposed (K, N)
            self.w_t = (mod.qdata.to(torch.int16) - zero).to(torch.int8).t().contiguous()

    def __call__(self, x: torch.Tensor, mod: QuantLinear) -> torch.Tensor:
        aq = mod.act_quant
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.backend == "ext":
            if aq.scheme.outlier_threshold is not None:
                y = self._llm_int8(x2.contiguous(), aq)
                return y.reshape(*x.shape[:-1], -1).to(x.dtype)
            if aq.scheme.dynamic:
                mode, xs = (0 if aq.scheme.granularity == "token" else 1), 1.0
            else:
                if aq.scale is None:
                    raise LowbitError(f"static input activations ({aq.scheme.short_name()}): no calibrated scale")
                mode, xs = 2, float(aq.scale)
            y = _w8a8_linear(x2.contiguous(), self.codes, self.w_scale_1d, self.bias, self.zero, mode, xs)
            return y.reshape(*x.shape[:-1], -1).to(x.dtype)
        if aq.scheme.dynamic:
            a = x2.abs().amax(dim=-1, keepdim=True) if aq.scheme.granularity == "token" else x2.abs().amax()
            s_x = torch.where(a > 0, a / 127.0, torch.ones_like(a))
        else:
            s_x = aq.scale
        xq = torch.round(x2 / s_x).clamp_(-128, 127).to(torch.int8)
        y = torch._int_mm(xq, self.w_t).float()
        y = y.mul_(s_x * self.w_scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def _llm_int8(self, x2: torch.Tensor, aq) -> torch.Tensor:
        """LLM.int8() (arXiv:2208.07339) as ActQuant's reference computes it: the input columns
        where some token has |x| > threshold are outliers; the rest go through the int8 op
        (per-token scales over the inlier columns only, outliers zeroed), the outliers through
        an fp32 matmul of their fp16-rounded inputs with those weight columns dequantized."""
        cols = outlier_columns(x2, aq.scheme.outlier_threshold)
        aq.record_outliers(cols)
        idx = cols.nonzero()[:, 0]
        if idx.numel() == 0:
            return _w8a8_linear(x2, self.codes, self.w_scale_1d, self.bias, self.zero, 0, 1.0)
        y = _w8a8_linear(x2.index_fill(1, idx, 0.0), self.codes, self.w_scale_1d, None, self.zero, 0, 1.0)
        w_out = (self.codes.index_select(1, idx).float() - self.zero) * self.w_scale_1d[:, None]
        y = y.addmm_(x2.index_select(1, idx).half().float(), w_out.t())
        return y if self.bias is None else y.add_(self.bias)


_w8a8_linear = None


def _packed_u8_codes(mod: nn.Module, kp: int) -> torch.Tensor | None:
    """A PackedLinear's own byte codes when the op can read them as they are (our ext kernel's u8
    container, columns in order, rows padded to exactly kp): then the int8 kernel shares them and
    the layer holds one copy of its weights. Its pad columns hold code 0, not the zero point;
    the op's rounded input is 0 there, so they add nothing to either integer sum."""
    from lowbit.nn.kernels import ExtKernel
    k = mod._modules.get("packed")
    if (type(k) is not ExtKernel or k.nibble or k.perm is not None or k.codes.dtype != torch.uint8
            or tuple(k.codes.shape) != (mod.out_features, kp) or not k.codes.is_contiguous()):
        return None
    return k.codes


def prepare_w8a8(model: nn.Module) -> int:
    """Attach W8A8Kernel to every eligible QuantLinear of `model`; returns how many (0 where no
    exact int8 GEMM exists here: backend() is None)."""
    if backend() is None:
        return 0
    n = 0
    for mod in model.modules():
        if eligible(mod):
            mod.set_kernel(W8A8Kernel(mod))
            n += 1
    return n
