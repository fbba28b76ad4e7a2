"""W8A8 on integer units: int8 inputs x int8 weights -> int32, one float rescale per output.

    x (M, K) float ─ per-token (dynamic) or calibrated (static) scale s_x ─> x_q int8 (M, K)
    W (N, K) int8 codes, per-row scale s_w (N,)       stored transposed: W^T (K, N) int8
    y = (x_q @ W^T) int32 * s_x (M, 1) * s_w (1, N) + bias

The int8 x int8 -> int32 product is torch._int_mm, which on x86 runs oneDNN's s8s8s32 GEMM
(AVX-512 VNNI vpdpbusd / AVX2 vpmaddubsw where the CPU has them). It computes exactly what the
reference path (QuantLinear.forward: fake-quantized input, dequantized weight) computes, up to
float summation order: the int32 sum is exact, the reference's float32 sum of the same integer
products is exact while it stays below 2^24 and rounds beyond.

    n = prepare_w8a8(model)   # QuantLinears with int8 symmetric per-row weights and int8 input
                              # quantization (not LLM.int8()) get this kernel; returns the count
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lowbit.nn.qlinear import QuantLinear


def has_int_mm() -> bool:
    try:
        torch._int_mm(torch.zeros(17, 8, dtype=torch.int8), torch.zeros(8, 8, dtype=torch.int8))
        return True
    except (RuntimeError, AttributeError):
        return False


def eligible(mod: nn.Module) -> bool:
    if not isinstance(mod, QuantLinear) or mod.act_quant is None or type(mod) is not QuantLinear:
        return False
    s, a = mod.scheme, mod.act_quant.scheme
    return (s.format == "int" and s.bits == 8 and s.symmetric and s.granularity == "channel" and s.axis == 0
            and mod.g_idx is None and a.format == "int8" and a.outlier_threshold is None)


class W8A8Kernel:
    """The callable QuantLinear.set_kernel takes: (x, module) -> y. It quantizes the input itself."""
    quantizes_input = True

    def __init__(self, mod: QuantLinear):
        # unsigned codes with the symmetric zero point 128 -> signed int8, transposed (K, N)
        self.w_t = (mod.qdata.to(torch.int16) - mod.scheme.sym_zero).to(torch.int8).t().contiguous()
        self.w_scale = mod.scale.reshape(1, -1).float()
        self.bias = None if mod.bias is None else mod.bias.detach().float()

    def __call__(self, x: torch.Tensor, mod: QuantLinear) -> torch.Tensor:
        aq = mod.act_quant
        x2 = x.reshape(-1, x.shape[-1]).float()
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


def prepare_w8a8(model: nn.Module) -> int:
    """Attach W8A8Kernel to every eligible QuantLinear of `model`; returns how many."""
    if not has_int_mm():
        return 0
    n = 0
    for mod in model.modules():
        if eligible(mod):
            mod.set_kernel(W8A8Kernel(mod))
            n += 1
    return n
