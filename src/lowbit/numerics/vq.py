"""Vector-quantized weights: learned codebooks over short vectors of consecutive input columns.

For a weight of shape (out_features, in_features) = (rows, cols), cut each row into V = cols / d
vectors of d consecutive columns. A vector is one index into a codebook of K = 2^(b d) learned
d-dimensional codewords (b = bits per weight of the index), times the scale of its row and group
of g columns (a vector lies inside one group: g % d == 0):

    W_hat[r, v d + k] = scale[r, (v d) // g] * codebook[cb(v), idx[r, v], k]       k < d

The codebooks are per column block: `n_codebooks` of them, codebook c serving the vectors
[c V / n, (c + 1) V / n) of every row (n = 1: one codebook for the whole matrix). Tensors:

    codebook  (n, K, d)  float32, values exactly fp16 (the file stores fp16)
    indices   (rows, V)  uint8 (K <= 256) or int16 (K <= 4096)
    scale     (rows, ceil(cols / g))  float32, exactly fp16

Storage: rows V log2(K) index bits + 16 bits per codebook entry and per scale. At b = 2, d = 4
(K = 256, one byte per 4 weights) with g = 64 that is 2 + 0.25 + the codebook's 16 K d / (rows cols)
bits per weight: the same 2.25 as a symmetric 2-bit g64 integer grid, plus about 0.02-0.15.

This file is the container and its arithmetic (dequantize, size); methods/vq.py chooses the
codebooks and indices, nn/vq.py runs matmuls on them without building the float matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.numerics.scheme import Scheme

MAX_CODEBOOK = 4096


def decode(codebook: torch.Tensor, flat_idx: torch.Tensor, scale: torch.Tensor, group_size: int,
           cols: int) -> torch.Tensor:
    """W_hat (r, cols) from codebooks (n, K, d), flat indices (r, V) into codebook.reshape(n K, d)
    and scales (r, G): the one formula dequantize, the codebook update and the block fine-tuning
    share (differentiable in codebook and scale)."""
    d = codebook.shape[-1]
    # a gather whose backward is deterministic (embedding's sums each codeword's gradient in index
    # order; advanced indexing's index_put_ accumulates in whatever order the threads reach it)
    w = F.embedding(flat_idx, codebook.reshape(-1, d)).reshape(flat_idx.shape[0], cols)
    return w * scale.repeat_interleave(group_size, dim=1)[:, :cols]


def vq_scheme(bits: int, group_size: int = 64) -> Scheme:
    """The Scheme a VQWeight reports: format "vq", `bits` index bits per weight, scale groups."""
    return Scheme(bits=bits, format="vq", symmetric=True, granularity="group", group_size=group_size)


@dataclass
class VQWeight:
    codebook: torch.Tensor          # (n_codebooks, K, d) float32
    indices: torch.Tensor           # (rows, V) uint8 / int16
    scale: torch.Tensor             # (rows, n_groups) float32
    shape: tuple[int, int]          # (rows, cols)
    group_size: int
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        rows, cols = self.shape
        if self.codebook.dim() != 3:
            raise LowbitError(f"VQWeight.codebook: expected (n_codebooks, K, d), got {tuple(self.codebook.shape)}")
        n, K, d = self.codebook.shape
        if d < 1 or cols % d or not 2 <= K <= MAX_CODEBOOK or (K & (K - 1)):
            raise LowbitError(f"VQWeight: codebook (n={n}, K={K}, d={d}) does not fit {cols} columns "
                              f"(d must divide cols; K a power of two in 2..{MAX_CODEBOOK})")
        V = cols // d
        if n < 1 or V % n:
            raise LowbitError(f"VQWeight: {n} codebooks do not split the {V} vectors of a row evenly")
        if self.group_size % d:
            raise LowbitError(f"VQWeight: group size {self.group_size} is not a multiple of the vector "
                              f"length {d}")
        want_dtype = torch.uint8 if K <= 256 else torch.int16
        if tuple(self.indices.shape) != (rows, V) or self.indices.dtype != want_dtype:
            raise LowbitError(f"VQWeight.indices: expected {want_dtype} ({rows}, {V}), got "
                              f"{self.indices.dtype} {tuple(self.indices.shape)}")
        G = -(-cols // self.group_size)
        if tuple(self.scale.shape) != (rows, G):
            raise LowbitError(f"VQWeight.scale: expected ({rows}, {G}), got {tuple(self.scale.shape)}")

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.codebook.shape[2])

    @property
    def codebook_size(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def n_codebooks(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def index_bits(self) -> int:
        return int(math.log2(self.codebook_size))

    @property
    def bits(self) -> float:
        return self.index_bits / self.dim

    @property
    def scheme(self) -> Scheme:
        return vq_scheme(max(1, round(self.bits)), self.group_size)

    @property
    def ragged_last_group(self) -> int | None:
        r = self.shape[1] % self.group_size
        return r or None

    def vector_codebook(self) -> torch.Tensor:
        """(V,) int64: the codebook of each vector column."""
        V = self.shape[1] // self.dim
        return torch.arange(V) // (V // self.n_codebooks)

    def flat_indices(self, rows: slice | None = None) -> torch.Tensor:
        """(rows, V) int64 indices into codebook.reshape(n K, d) (of the rows `rows` only)."""
        off = self.vector_codebook() * self.codebook_size
        return self.indices[rows or slice(None)].long() + off[None, :]

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """The float weight (or the rows `rows` of it)."""
        rows = rows or slice(None)
        return decode(self.codebook.float(), self.flat_indices(rows), self.scale[rows].float(), self.group_size,
                      self.shape[1]).to(dtype)

    # ---- size -----------------------------------------------------------------------------------
    def storage_bits(self) -> int:
        rows, cols = self.shape
        return rows * (cols // self.dim) * self.index_bits + 16 * (self.codebook.numel() + self.scale.numel())

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.shape[0] * self.shape[1])
