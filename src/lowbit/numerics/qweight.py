"""QuantizedWeight: the one container every method returns and every kernel / exporter reads.

Its tensors are named (like torchao's tensor_data_names or compressed-tensors' weight_packed /
weight_scale): for a weight of shape (out_features, in_features) = (rows, cols),

    qdata       (rows, cols)            uint8   one unpacked code per weight (packing is the
                                                 kernel's / file format's business)
    scale       qparam_shape            float32
    zero_point  qparam_shape or None    float32 in code units (integer-valued for int formats)
    g_idx       (cols,) or None         int32   group of each input column (act-order layouts)

Quantizing never happens as a side effect: build one with `quantize_weight` (RTN) or from a
method's output, and `dequantize()` gives the float weight back on request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError, check_float_tensor
from lowbit.numerics.affine import QParams, choose_qparams, dequantize, quantize, qparam_shape
from lowbit.numerics.scheme import Scheme


@dataclass
class QuantizedWeight:
    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    scheme: Scheme
    g_idx: torch.Tensor | None = None
    info: dict = field(default_factory=dict)  # method notes: ragged group, damping used, loss, ...

    tensor_data_names = ("qdata", "scale", "zero_point", "g_idx")

    def __post_init__(self) -> None:
        expect = qparam_shape(tuple(self.qdata.shape), self.scheme)
        if tuple(self.scale.shape) != expect:
            raise LowbitError(f"QuantizedWeight.scale: expected shape {expect} for qdata "
                              f"{tuple(self.qdata.shape)} under {self.scheme.short_name()}, "
                              f"got {tuple(self.scale.shape)}")
        if self.zero_point is not None and tuple(self.zero_point.shape) != expect:
            raise LowbitError(f"QuantizedWeight.zero_point: expected shape {expect}, "
                              f"got {tuple(self.zero_point.shape)}")
        if self.g_idx is not None and tuple(self.g_idx.shape) != (self.qdata.shape[-1],):
            raise LowbitError(f"QuantizedWeight.g_idx: expected shape ({self.qdata.shape[-1]},), "
                              f"got {tuple(self.g_idx.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qdata.shape)

    @property
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qdata, self.qparams, self.scheme, self.g_idx, dtype=dtype)

    # ---- size accounting ------------------------------------------------------------------------
    def storage_bits(self, scale_bits: int = 16, zero_bits: int | None = None) -> int:
        """Bits to store this weight packed: codes + scales (+ zeros, + g_idx).

        Scales are counted at fp16 (what every export format stores); integer zero points at
        `bits` (GPTQ packs them like codes), float zero points at fp16.
        """
        n = self.qdata.numel()
        bits = n * self.scheme.code_bits + self.scale.numel() * scale_bits
        if self.zero_point is not None and not self.scheme.symmetric:
            zb = zero_bits or (self.scheme.bits if self.scheme.format == "int" else 16)
            bits += self.zero_point.numel() * zb
        if self.g_idx is not None:
            bits += self.g_idx.numel() * 32
        return bits

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.qdata.numel()

    @property
    def ragged_last_group(self) -> int | None:
        """Length of each row's shorter last group, when group_size does not divide the row."""
        return self.scheme.ragged_groups(self.qdata.shape[-1])


def quantize_weight(w: torch.Tensor, scheme: Scheme, qp: QParams | None = None,
                    name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest a weight onto `scheme` (min-max qparams unless `qp` is given)."""
    check_float_tensor(w, name)
    w = w.detach().float()
    qp = qp or choose_qparams(w, scheme)
    codes = quantize(w, qp, scheme)
    info = {}
    if scheme.ragged_groups(w.shape[-1]):
        info["ragged_last_group"] = scheme.ragged_groups(w.shape[-1])
    return QuantizedWeight(codes, qp.scale, qp.zero, scheme, info=info)
