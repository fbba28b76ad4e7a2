"""QuantLinear: an nn.Linear whose weight is held as a QuantizedWeight.

The codes, scales and zero points are registered as buffers, so state_dict / .to(device) carry
them; `.to(dtype)` casts only the float buffers (scales), never re-quantizes anything.

forward() here is the reference path (dequantize, then matmul): exact, simple and the yardstick
every fast kernel (nn/kernels) is tested against. A kernel, when attached with `set_kernel`,
replaces it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.numerics.qweight import QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self._init_common(qweight, bias)
        self.register_buffer("qdata", qweight.qdata)
        self.kernel = None  # a callable (x, module) -> y, set by nn.kernels

    def _init_common(self, qweight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        """Shape, scheme, info, qparams and bias: what every quantized linear carries."""
        self.out_features, self.in_features = qweight.shape
        self.scheme = qweight.scheme
        self.info = dict(qweight.info)
        self.register_buffer("scale", qweight.scale)
        self.register_buffer("zero_point", qweight.zero_point)
        self.register_buffer("g_idx", qweight.g_idx)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act_quant = None  # input-activation quantization (nn/actquant.py), None: float inputs

    @classmethod
    def from_linear(cls, linear: nn.Linear, qweight: QuantizedWeight) -> "QuantLinear":
        return cls(qweight, linear.bias)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qdata, self.scale, self.zero_point, self.scheme, self.g_idx, self.info)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def set_kernel(self, kernel) -> None:
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None and not getattr(self.kernel, "quantizes_input", False):
            x = self.act_quant(x)
        if self.kernel is not None:
            return self.kernel(x, self)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        ragged = f", ragged_last_group={self.info['ragged_last_group']}" if "ragged_last_group" in self.info else ""
        act = "" if getattr(self, "act_quant", None) is None else f", input={self.act_quant.scheme.short_name()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.short_name()}, bias={self.bias is not None}{ragged}{act}")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class GGMLLinear(nn.Module):
    """A linear whose weight is ggml blocks (numerics.ggml.weight.GGMLWeight), as the GGUF file
    holds them. forward() decodes once (bit for bit as ggml) and caches the float weight: the
    reference path for evaluating a GGUF-bound model in lowbit; llama.cpp runs the file itself."""

    def __init__(self, gweight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = gweight.shape
        self.ggml_type, self.wanted, self.info = gweight.type, gweight.wanted, dict(gweight.info)
        self.register_buffer("data", gweight.data)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._dense = None

    @property
    def scheme(self):
        return self.qweight.scheme

    @property
    def qweight(self):
        from lowbit.numerics.ggml.weight import GGMLWeight
        return GGMLWeight(self.data, self.ggml_type, (self.out_features, self.in_features), self.wanted, self.info)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None or self._dense.dtype != x.dtype:
            self._dense = self.dequantize_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._dense, bias)

    def extra_repr(self) -> str:
        fb = f" (wanted {self.wanted})" if self.wanted != self.ggml_type else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml={self.ggml_type}{fb}"


def make_quant_module(qweight, bias: torch.Tensor | None = None) -> nn.Module:
    """The module that holds a method's result: QuantLinear, GGMLLinear for ggml blocks, VQLinear
    for vector codebooks."""
    if isinstance(qweight, QuantizedWeight):
        return QuantLinear(qweight, bias)
    from lowbit.numerics.vq import VQWeight
    if isinstance(qweight, VQWeight):
        from lowbit.nn.vq import VQLinear
        return VQLinear(qweight, bias)
    return GGMLLinear(qweight, bias)
