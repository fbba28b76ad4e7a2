"""bitsandbytes' blockwise 4-bit (NF4 / FP4) numbers and the double quantization of their scales.

Tensors in, tensors out; no module, no file. The layout is the one bitsandbytes stores
(bitsandbytes 0.4x-0.50 `functional.quantize_4bit` / `dequantize_4bit`, QLoRA: Dettmers et al.
2023, arXiv:2305.14314, sec. 3), so a file written from these tensors loads there unchanged:

    w (out, in) flattened row-major -> blocks of `block_size` (64) consecutive values
    absmax[b]   = max |w| over block b                     (float32, one per block; last block ragged)
    code[i]     = nearest entry of the 16-value table to w[i] * (1 / absmax[b])   (bucketize on midpoints)
    packed[j]   = code[2j] << 4 | code[2j+1]                (uint8; first value in the high nibble;
                                                             an odd count is padded with 0.0's code)
    w_hat[i]    = table[code[i]] * absmax[b]                (float32, then the model's dtype)

Tables (indexed by the 4-bit code):
    nf4   NF4_TABLE of numerics/codebooks.py (ascending; the same 16 values bitsandbytes holds)
    fp4   bitsandbytes' own e2m1 variant, in bit-pattern order s.e1e0.m:
          [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3] / 12
          (not the OCP E2M1 of FP4Codec: no 0.5 subnormal, exponent bias 2; bitsandbytes'
          `get_4bit_type("fp4")`; its dequantizer uses this table whatever the file holds)

Double quantization (QLoRA sec. 3, "Double Quantization"): the float32 absmax constants are
themselves quantized to 8 bits in blocks of 256:

    offset      = mean(absmax)                              (float32 scalar)
    absmax2[c]  = max |absmax - offset| over block c        (float32, one per 256 absmax values)
    qabsmax[k]  = nearest entry of the signed dynamic map to (absmax[k] - offset) / absmax2[c]  (uint8)
    absmax_hat  = dyn[qabsmax] * absmax2[c] + offset        (float32; what both sides dequantize with)

The dynamic map (`dynamic_map_8bit`) is bitsandbytes' `create_dynamic_map(signed=True)`: the
dynamic tree type of Dettmers 2015 (arXiv:1511.04561): per power of ten 10^-6..10^0, 2^i linear
fraction steps between 0.1 and 1 (midpoints), both signs, plus 0 and 1; 256 values, sorted.

Bits per parameter (block 64): 4 + 32/64 = 4.5 plain; 4 + 8/64 + 32/(64*256) = 4.127 with double
quantization (QLoRA's 0.373 bits per parameter saved), plus the 16 + 256 float32 table entries
and one offset per tensor.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.codebooks import NF4_TABLE

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCK = 256          # bitsandbytes' block size for the absmax constants (compress_statistics)
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
_TINY = 1e-38               # bitsandbytes clamps absmax to this before taking 1 / absmax


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 float32 values a 4-bit code indexes (see the module docstring)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_TABLE, dtype=torch.float32)
    if quant_type == "fp4":
        t = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return t / t.abs().max()
    raise LowbitError(f"quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")


_BYTE_TABLES: dict[str, torch.Tensor] = {}


def byte_table(quant_type: str) -> torch.Tensor:
    """(256, 2) float32: packed byte b -> (table[b >> 4], table[b & 15])."""
    if quant_type not in _BYTE_TABLES:
        t, b = code_table(quant_type), torch.arange(256)
        _BYTE_TABLES[quant_type] = torch.stack([t[b >> 4], t[b & 15]], dim=1).contiguous()
    return _BYTE_TABLES[quant_type]


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed dynamic quantization map (create_dynamic_map(signed=True, 7, 8)), (256,)."""
    vals = []
    for i in range(7):                                   # exponent 10^(i-6)
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        vals += [(10 ** (i - 6)) * means, -(10 ** (i - 6)) * means]
    # the reference builds these as Python floats (float64 products) and stores them as float32
    v = torch.cat([m.double() for m in vals] + [torch.tensor([0.0, 1.0], dtype=torch.float64)])
    return v.float().sort().values


def _blocks_index(n: int, block: int) -> torch.Tensor:
    return torch.arange(n) // block


def _blockwise_absmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % block
    am = flat[:full].reshape(-1, block).abs().amax(dim=1)
    if full < n:
        am = torch.cat([am, flat[full:].abs().amax().reshape(1)])
    return am


def _check_finite(w: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(w).all()):
        raise LowbitError(f"{what}: contains {int((~torch.isfinite(w)).sum())} NaN/inf value(s); "
                          "refusing to quantize it")


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", block_size: int = 64,
                  what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 (ceil(n / 2),), absmax float32 (ceil(n / block_size),)), bitsandbytes' layout."""
    if not isinstance(block_size, int) or block_size < 2 or block_size & (block_size - 1):
        raise LowbitError(f"block_size {block_size!r}: expected a power of two >= 2 (bitsandbytes uses 64)")
    table = code_table(quant_type)
    flat = w.detach().reshape(-1).float()
    _check_finite(flat, what)
    n = flat.numel()
    absmax = _blockwise_absmax(flat, block_size)
    full = n - n % block_size
    # x * (1 / absmax) on whole blocks, x / absmax on the ragged tail: bitsandbytes' arithmetic,
    # so the codes are the ones it would pick, bit for bit
    inv = 1.0 / absmax.clamp(min=_TINY)
    scaled = flat[:full].reshape(-1, block_size) * inv[: full // block_size].view(-1, 1)
    scaled = scaled.reshape(-1)
    if full < n:
        scaled = torch.cat([scaled, flat[full:] / absmax[-1].clamp(min=_TINY)])
    scaled = scaled.clamp(-1.0, 1.0)
    if n % 2:                            # an odd count is padded with the code of 0.0
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    order = torch.argsort(table, stable=True)
    srt = table[order]
    codes = order[torch.bucketize(scaled, (srt[:-1] + srt[1:]) / 2)].to(torch.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).contiguous(), absmax.contiguous()


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (ceil(n / 2),) -> codes int64 (n,) (high nibble first)."""
    p = packed.reshape(-1)
    if p.dtype != torch.uint8 or p.numel() != (n + 1) // 2:
        raise LowbitError(f"packed 4-bit codes: expected uint8 with {(n + 1) // 2} bytes for {n} values, "
                          f"got {p.dtype} with {p.numel()}")
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)
    return codes[:n].long()


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape, quant_type: str = "nf4",
                    block_size: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """table[code] * absmax[block] in float32, cast to `dtype`, shaped `shape`."""
    n = 1
    for d in shape:
        n *= int(d)
    nb = (n + block_size - 1) // block_size
    if absmax.numel() != nb or absmax.dtype != torch.float32:
        raise LowbitError(f"absmax: expected float32 with {nb} values ({n} weights in blocks of {block_size}), "
                          f"got {absmax.dtype} with {absmax.numel()}")
    p = packed.reshape(-1)
    if p.dtype != torch.uint8 or p.numel() != (n + 1) // 2:
        raise LowbitError(f"packed 4-bit codes: expected uint8 with {(n + 1) // 2} bytes for {n} values, "
                          f"got {p.dtype} with {p.numel()}")
    vals = byte_table(quant_type)[p.int()].reshape(-1)[:n]     # one gather: byte -> its two values
    if n % block_size == 0:
        out = (vals.view(-1, block_size) * absmax.view(-1, 1)).reshape(-1)
    else:
        out = vals * absmax[_blocks_index(n, block_size)]
    return out.reshape(tuple(shape)).to(dtype)


def double_quantize(absmax: torch.Tensor, block: int = NESTED_BLOCK) -> dict[str, torch.Tensor]:
    """float32 absmax -> {"absmax": uint8 codes, "nested_absmax": float32 per block, "nested_quant_map":
    the dynamic map (256,), "offset": float32 scalar} (QLoRA's double quantization)."""
    a = absmax.reshape(-1).float()
    _check_finite(a, "absmax")
    offset = a.mean()
    x = a - offset
    am2 = _blockwise_absmax(x, block)
    scaled = (x / am2.clamp(min=_TINY)[_blocks_index(x.numel(), block)]).clamp(-1.0, 1.0)
    dyn = dynamic_map_8bit()
    q = torch.bucketize(scaled, (dyn[:-1] + dyn[1:]) / 2).to(torch.uint8)
    return {"absmax": q.contiguous(), "nested_absmax": am2.contiguous(), "nested_quant_map": dyn,
            "offset": offset.reshape(())}


def undo_double_quant(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_quant_map: torch.Tensor,
                      offset, block: int = NESTED_BLOCK) -> torch.Tensor:
    """dyn[q] * absmax2[block] + offset, float32 (bitsandbytes' dequantize_blockwise, then += offset)."""
    q = qabsmax.reshape(-1)
    nb = (q.numel() + block - 1) // block
    if q.dtype != torch.uint8 or nested_absmax.numel() != nb or nested_quant_map.numel() != 256:
        raise LowbitError(f"double-quantized absmax: expected uint8 codes, {nb} nested_absmax values and a "
                          f"256-entry nested_quant_map; got {q.dtype}, {nested_absmax.numel()}, "
                          f"{nested_quant_map.numel()}")
    off = torch.as_tensor(offset, dtype=torch.float32)
    return nested_quant_map.float()[q.long()] * nested_absmax.float()[_blocks_index(q.numel(), block)] + off


def bits_per_param(n: int, block_size: int = 64, double_quant: bool = False) -> float:
    """Storage bits per weight of one tensor of n values (codes + constants + tables)."""
    nb = (n + block_size - 1) // block_size
    codes = ((n + 1) // 2) * 8
    if not double_quant:
        return (codes + nb * 32 + 16 * 32) / n
    nb2 = (nb + NESTED_BLOCK - 1) // NESTED_BLOCK
    return (codes + nb * 8 + nb2 * 32 + 32 + 16 * 32 + 256 * 32) / n
