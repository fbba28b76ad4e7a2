"""GGMLWeight: a weight held as ggml blocks, the container the ggml methods return and the GGUF
format writes unchanged.

    data   uint8 (rows, row_bytes)   the GGUF tensor bytes, rows in the model's (HF) order
    type   the ggml type actually used ("Q5_0"), after llama.cpp's fallback for rows that its
           block does not divide; `wanted` is what the recipe asked for ("Q4_K")
    shape  (rows, cols) of the float weight

Like QuantizedWeight it never quantizes by itself: dequantize() decodes, bit for bit as ggml.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.numerics.ggml.types import ggml_type


@dataclass
class GGMLWeight:
    data: torch.Tensor
    type: str
    shape: tuple[int, int]
    wanted: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = ggml_type(self.type)
        self.type = t.name
        self.wanted = self.wanted or t.name
        rows, cols = (int(d) for d in self.shape)
        self.shape = (rows, cols)
        want = (rows, t.row_bytes(cols))
        if not t.fits(cols) or tuple(self.data.shape) != want or self.data.dtype != torch.uint8:
            raise LowbitError(f"GGMLWeight: {t.name} data for shape {self.shape} must be uint8 {want}, "
                              f"got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def scheme(self):
        from lowbit.presets.gguf_mixes import ggml_scheme
        return ggml_scheme(self.type)

    @property
    def bits_per_weight(self) -> float:
        return ggml_type(self.type).bits_per_weight

    def storage_bits(self) -> int:
        return int(self.data.numel()) * 8

    @property
    def ragged_last_group(self) -> None:
        return None

    @property
    def g_idx(self) -> None:
        return None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from lowbit.numerics.ggml import dequantize
        a = dequantize(self.data.numpy(), self.type, self.shape)
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
