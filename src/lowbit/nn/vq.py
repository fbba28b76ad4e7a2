"""VQLinear: a linear whose weight is a vector codebook (numerics/vq.py VQWeight).

The float weight is never built whole. Decode (few rows of x) runs the table-lookup product:

    T[m, v, c] = <codebook[cb(v), c], x[m, v d : (v + 1) d]>        a (V, K) table per row of x
    y[m, n]    = sum_g scale[n, g] * sum_{v in g} T[m, v, idx[n, v]]

one gather and add per d weights, on the compiled op `lowbit_cpu.vq_linear` (nn/ext) when the
extension is loaded and the indices are bytes (K <= 256), else the same sum in torch. The op's
tables are 16-bit where the CPU allows (byte permutes on AVX-512 VBMI; AVX2 byte shuffles for K <= 64)
and float otherwise: `table_kernels(model)` says which runs. Longer inputs (prefill) dequantize
`tile_rows` rows of the weight at a time and multiply them (a tile of the float weight, never all of it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.numerics.vq import VQWeight

TILE_ROWS = 256
LUT_MAX_M = 8          # rows of x up to which the table-lookup product is used


def _ext_op():
    from lowbit.nn import ext
    if not ext.load():
        return None
    return getattr(torch.ops.lowbit_cpu, "vq_linear", None)


IDX_BLOCK = 64         # rows per block of the kernel's index layout (nn/ext/lowbit_kern.h kVqIdxBlock)


def _blocked(indices: torch.Tensor) -> torch.Tensor:
    """(rows, V) indices -> (ceil(rows / IDX_BLOCK), V, IDX_BLOCK), the last block's spare rows 0."""
    rows, V = indices.shape
    nb = -(-rows // IDX_BLOCK)
    padded = indices.new_zeros(nb * IDX_BLOCK, V)
    padded[:rows] = indices
    return padded.view(nb, IDX_BLOCK, V).transpose(1, 2).contiguous()


def table_kernels(model: nn.Module) -> str:
    """Which table-lookup kernel decode runs for each codebook size in `model`, e.g. "64 entries:
    i16-shuffle" ("" without VQLinear layers; "torch" without the compiled op)."""
    sizes = sorted({int(m.codebook.shape[1]) for m in model.modules() if isinstance(m, VQLinear)})
    if not sizes:
        return ""
    op = _ext_op()
    return ", ".join(f"{k} entries: {torch.ops.lowbit_cpu.vq_kernel(k) if op is not None else 'torch'}" for k in sizes)


class VQLinear(nn.Module):
    def __init__(self, vweight: VQWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = vweight.shape
        self.group_size = vweight.group_size
        self.info = dict(vweight.info)
        self.register_buffer("codebook", vweight.codebook.float().contiguous())
        # held as the table-lookup kernel reads them: blocks of IDX_BLOCK rows, (blocks, V, IDX_BLOCK)
        # (one gather = consecutive rows of one vector; one row block = one contiguous stream)
        self.register_buffer("indices_b", _blocked(vweight.indices))
        self.register_buffer("scale_t", vweight.scale.float().t().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act_quant = None
        self.use_ext = True            # False: the torch paths only (tests compare both)

    @property
    def indices(self) -> torch.Tensor:
        """(rows, V), from the blocked buffer (a copy)."""
        nb, V, blk = self.indices_b.shape
        return self.indices_b.transpose(1, 2).reshape(nb * blk, V)[:self.out_features]

    @property
    def scale(self) -> torch.Tensor:
        return self.scale_t.t()

    @property
    def qweight(self) -> VQWeight:
        return VQWeight(self.codebook, self.indices, self.scale, (self.out_features, self.in_features),
                        self.group_size, self.info)

    @property
    def scheme(self):
        return self.qweight.scheme

    @property
    def backend(self) -> str:
        ext_ok = self.use_ext and self.indices_b.dtype == torch.uint8 and _ext_op() is not None
        return "vq-ext" if ext_ok else "vq-torch"

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def _lut_torch(self, x: torch.Tensor) -> torch.Tensor:
        vw = self.qweight
        M, d, K = x.shape[0], vw.dim, vw.codebook_size
        V = self.in_features // d
        cbv = vw.vector_codebook()                                        # (V,)
        T = torch.einsum("mvd,vkd->mvk", x.view(M, V, d), self.codebook[cbv])   # (M, V, K)
        flat = (torch.arange(V) * K)[None, :] + vw.indices.long()         # (N, V) into T[m].view(-1)
        vals = T.reshape(M, -1)[:, flat]                                  # (M, N, V)
        vpg = self.group_size // d
        G = self.scale.shape[1]
        pad = G * vpg - V
        vals = F.pad(vals, (0, pad)).view(M, self.out_features, G, vpg).sum(dim=3)
        return (vals * self.scale[None]).sum(dim=2)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        vw = self.qweight
        out = x.new_empty(x.shape[0], self.out_features)
        for r0 in range(0, self.out_features, TILE_ROWS):
            sl = slice(r0, min(r0 + TILE_ROWS, self.out_features))
            torch.matmul(x, vw.dequantize(x.dtype, sl).t(), out=out[:, sl])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            y = self._tiled(x2.float()).to(x.dtype)
        elif x2.shape[0] <= LUT_MAX_M:
            op = _ext_op() if (self.use_ext and self.indices_b.dtype == torch.uint8) else None
            if op is not None:
                y = op(x2.contiguous(), self.codebook, self.indices_b, self.scale_t, self.group_size)
            else:
                y = self._lut_torch(x2)
        else:
            y = self._tiled(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        vw = self.qweight
        return (f"in_features={self.in_features}, out_features={self.out_features}, vq: {vw.n_codebooks} x "
                f"{vw.codebook_size} codewords of {vw.dim}, scale groups {self.group_size}, "
                f"{vw.bits_per_weight:.3f} bpw, bias={self.bias is not None}")
