"""Pack unsigned codes into uint8 / int32 containers and back, bit-exact, along any axis.

Codes are the unsigned integers QuantizedWeight.qdata holds (uint8, in [0, 2^bits)). All layouts
here are one little-endian bit stream per run of values along `axis`: value i of a run occupies
bits [i*bits, (i+1)*bits) of the stream, and the stream is cut into containers low bit first.

    4-bit in uint8 (2 per byte)        byte j = v[2j] | v[2j+1] << 4
        bit  7 6 5 4 3 2 1 0
             B B B B A A A A        A = v[2j] (low nibble first), B = v[2j+1]
    2-bit in uint8 (4 per byte)        bit 7..0 = D D C C B B A A
    3-bit in uint8 (8 values -> 3 bytes, a 24-bit stream)
        byte0 = C1 C0 B2 B1 B0 A2 A1 A0     byte1 = F0 E2 E1 E0 D2 D1 D0 C2 ...
    8-bit in uint8                     the codes themselves
    b-bit in int32, b in {2, 4, 8}     32/b values per word, value i at bits [i*b, (i+1)*b)
    3-bit in int32 (32 values -> 3 words, a 96-bit stream): value 10 straddles words 0|1
        (bits 30-31 of word 0 hold its low 2 bits, bit 0 of word 1 its high bit) and value 21
        straddles words 1|2, exactly GPTQ's / AutoGPTQ's 3-bit qweight layout.
    Ternary, 5 trits per byte:  byte = t0 + 3*t1 + 9*t2 + 27*t3 + 81*t4 (t = code in {0,1,2};
        3^5 = 243 <= 256, so 1.6 bits per value). Ternary 2 bits per value: pack_2bit_u8.

int32 words are two's complement: a word whose top bit is set reads as negative, as GPTQ files do.

Lengths that are not a multiple of the pack factor (values per container run) are padded with
zero codes at the end of the axis; unpack needs the original `length` and checks it fits.

How the file formats' layouts are expressed (weight codes qdata: (out, in)):
    GPTQ / AutoGPTQ qweight (in/8, out) int32, 8 4-bit values per word along the input axis,
        low bits first:           pack_int32(qdata.t(), bits=4, axis=0)   == pack_int32(qdata, 4, axis=1).t()
    GPTQ qzeros (groups, out/8):  pack_int32(zeros_codes, bits=4, axis=1)       (zeros (groups, out);
                                  GPTQ v1 files store zero - 1, which is the exporter's business)
    compressed-tensors weight_packed (out, in/8) int32, packed along the input axis:
                                  pack_int32(qdata, bits=4, axis=1)
    (AWQ interleaves nibbles in the order 0,2,4,6,1,3,5,7 inside a word and packs along the
    output axis; an AWQ writer permutes the values, then calls pack_int32(..., axis=1).)
"""
from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError

_CONTAINER_BITS = {torch.uint8: 8, torch.int32: 32}


# ---------------------------------------------------------------------------------------------
# Checks and the (axis -> last, pad) plumbing every packer shares
# ---------------------------------------------------------------------------------------------
def _check_codes(codes: torch.Tensor, bits: int, name: str = "codes") -> None:
    if not isinstance(codes, torch.Tensor):
        raise LowbitError(f"{name}: expected a torch.Tensor of integer codes, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise LowbitError(f"{name}: expected an integer tensor of codes (uint8), got dtype {codes.dtype}")
    if codes.dim() == 0:
        raise LowbitError(f"{name}: expected at least 1 dimension, got a scalar")
    if codes.numel():
        lo, hi = (int(v) for v in torch.aminmax(codes))
        if lo < 0 or hi >= (1 << bits):
            raise LowbitError(f"{name}: {bits}-bit codes must lie in [0, {(1 << bits) - 1}], "
                              f"found values in [{lo}, {hi}]")


def _check_bits(bits: int, allowed: tuple[int, ...], fn: str) -> None:
    if bits not in allowed:
        raise LowbitError(f"{fn}(bits=...): expected one of {allowed}, got {bits!r}")


def _axis(t: torch.Tensor, axis: int, name: str) -> int:
    if not -t.dim() <= axis < t.dim():
        raise LowbitError(f"{name}: axis {axis} out of range for a {t.dim()}-D tensor of shape {tuple(t.shape)}")
    return axis % t.dim()


def _runs(codes: torch.Tensor, axis: int, run: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """codes with `axis` moved last, zero-padded to a multiple of `run`, as (..., n_runs, run)."""
    x = codes.movedim(axis, -1).to(dtype).contiguous()
    pad = (-x.shape[-1]) % run
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, run)


def _check_unpack_length(length: int, n_runs: int, run: int, axis: int, fn: str) -> None:
    """Padding is at most run-1 values: n_runs runs hold (n_runs-1)*run+1 .. n_runs*run values."""
    lo = (n_runs - 1) * run + 1 if n_runs else 0
    if not (isinstance(length, int) and lo <= length <= n_runs * run):
        raise LowbitError(f"{fn}: length={length!r} does not fit axis {axis} of the packed tensor "
                          f"({n_runs} run(s) of {run} values); expected {lo}..{n_runs * run}")


# ---------------------------------------------------------------------------------------------
# The bit stream: `run` values of `bits` bits -> `words` containers of `cbits` bits
# ---------------------------------------------------------------------------------------------
def _stream_shape(bits: int, cbits: int) -> tuple[int, int]:
    """(values per run, containers per run): the smallest run that fills whole containers."""
    total = math.lcm(bits, cbits)
    return total // bits, total // cbits


def _pack_stream(codes: torch.Tensor, bits: int, dtype: torch.dtype, axis: int) -> torch.Tensor:
    cbits = _CONTAINER_BITS[dtype]
    if bits == cbits:                                     # 8-bit codes in bytes: nothing to pack
        return codes.to(dtype).clone()
    run, words = _stream_shape(bits, cbits)
    # Arithmetic in the container's own dtype: a left shift drops the bits that belong to the
    # next container (torch shifts int32 as two's complement, so 15 << 28 is the word 0xF0000000)
    x = _runs(codes, axis, run, dtype)                    # (..., R, run)
    acc: list[torch.Tensor | None] = [None] * words
    # A loop over the <= 32 positions inside one run; every run in the tensor moves at once.
    for i in range(run):
        w, off = divmod(i * bits, cbits)
        parts = [(w, x[..., i] << off)]
        if off + bits > cbits:                            # straddles into the next container
            parts.append((w + 1, x[..., i] >> (cbits - off)))
        for k, v in parts:
            acc[k] = v if acc[k] is None else acc[k] | v
    out = torch.stack(acc, dim=-1).reshape(*x.shape[:-2], -1)
    return out.movedim(-1, axis).contiguous()


def _unpack_stream(packed: torch.Tensor, bits: int, length: int, axis: int, fn: str) -> torch.Tensor:
    cbits = _CONTAINER_BITS.get(packed.dtype)
    if cbits is None:
        raise LowbitError(f"{fn}: expected a uint8 or int32 packed tensor, got dtype {packed.dtype}")
    axis = _axis(packed, axis, fn)
    run, words = _stream_shape(bits, cbits)
    n_words = packed.shape[axis]
    if n_words % words:
        raise LowbitError(f"{fn}: a {bits}-bit stream in {packed.dtype} comes in runs of {words} "
                          f"containers; axis {axis} has {n_words}")
    _check_unpack_length(length, n_words // words, run, axis, fn)
    if bits == cbits:
        return packed.to(torch.uint8).narrow(axis, 0, length).clone()
    p = packed.movedim(axis, -1).contiguous()
    p = p.reshape(*p.shape[:-1], -1, words)               # (..., R, words)
    mask = (1 << bits) - 1
    vals = []
    for i in range(run):
        w, off = divmod(i * bits, cbits)
        v = p[..., w] >> off                              # int32 >> sign-extends: mask below
        if off + bits > cbits:                            # low part from word w, high from w + 1
            v = (v & ((1 << (cbits - off)) - 1)) | (p[..., w + 1] << (cbits - off))
        vals.append(v & mask)
    out = torch.stack(vals, dim=-1).reshape(*p.shape[:-2], -1)[..., :length]
    return out.to(torch.uint8).movedim(-1, axis).contiguous()


# ---------------------------------------------------------------------------------------------
# Public packers: names say width and container
# ---------------------------------------------------------------------------------------------
def pack_bits_u8(codes: torch.Tensor, bits: int, axis: int = -1) -> torch.Tensor:
    """b-bit codes (b in 2, 3, 4, 8) -> uint8, along `axis` (module docstring for layouts).
    The packed axis has ceil(n * bits / 8) bytes (3-bit: rounded up to whole 3-byte runs)."""
    _check_bits(bits, (2, 3, 4, 8), "pack_bits_u8")
    _check_codes(codes, bits)
    return _pack_stream(codes, bits, torch.uint8, _axis(codes, axis, "pack_bits_u8"))


def unpack_bits_u8(packed: torch.Tensor, bits: int, length: int, axis: int = -1) -> torch.Tensor:
    """Inverse of pack_bits_u8; `length` = the original size of `axis` (drops the zero padding)."""
    _check_bits(bits, (2, 3, 4, 8), "unpack_bits_u8")
    _need_dtype(packed, torch.uint8, "unpack_bits_u8")
    return _unpack_stream(packed, bits, length, axis, "unpack_bits_u8")


def pack_int32(codes: torch.Tensor, bits: int, axis: int = -1) -> torch.Tensor:
    """b-bit codes (b in 2, 3, 4, 8) -> int32 words along `axis`, low bits first: 32/b values
    per word, or for 3 bits 32 values per 3 words (GPTQ's layout). See the module docstring for
    the GPTQ and compressed-tensors calls."""
    _check_bits(bits, (2, 3, 4, 8), "pack_int32")
    _check_codes(codes, bits)
    return _pack_stream(codes, bits, torch.int32, _axis(codes, axis, "pack_int32"))


def unpack_int32(packed: torch.Tensor, bits: int, length: int, axis: int = -1) -> torch.Tensor:
    """Inverse of pack_int32 -> uint8 codes; `length` = the original size of `axis`."""
    _check_bits(bits, (2, 3, 4, 8), "unpack_int32")
    _need_dtype(packed, torch.int32, "unpack_int32")
    return _unpack_stream(packed, bits, length, axis, "unpack_int32")


def _need_dtype(packed: torch.Tensor, dtype: torch.dtype, fn: str) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != dtype:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise LowbitError(f"{fn}: expected a {dtype} packed tensor, got {got}")


def pack_2bit_u8(codes, axis=-1):
    """4 values per byte, low bits first (also ternary at 2 bits per value)."""
    return pack_bits_u8(codes, 2, axis)


def unpack_2bit_u8(packed, length, axis=-1):
    return unpack_bits_u8(packed, 2, length, axis)


def pack_3bit_u8(codes, axis=-1):
    """8 values per 3 bytes, one little-endian 24-bit stream."""
    return pack_bits_u8(codes, 3, axis)


def unpack_3bit_u8(packed, length, axis=-1):
    return unpack_bits_u8(packed, 3, length, axis)


def pack_4bit_u8(codes, axis=-1):
    """2 values per byte, the first in the low nibble."""
    return pack_bits_u8(codes, 4, axis)


def unpack_4bit_u8(packed, length, axis=-1):
    return unpack_bits_u8(packed, 4, length, axis)


def pack_8bit_u8(codes, axis=-1):
    return pack_bits_u8(codes, 8, axis)


def unpack_8bit_u8(packed, length, axis=-1):
    return unpack_bits_u8(packed, 8, length, axis)


# ---------------------------------------------------------------------------------------------
# Ternary: 5 trits per byte (base 3)
# ---------------------------------------------------------------------------------------------
_POW3 = (1, 3, 9, 27, 81)


def pack_ternary_5per_u8(codes: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Trit codes {0, 1, 2} -> uint8, byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4 (<= 242).

    1.6 bits per value. (llama.cpp's TQ1_0 also stores 5 trits per byte but pre-scales each byte
    by 256/243 for a multiply-based decode; this layout is the plain base-3 number.)
    """
    _check_codes(codes, 2)
    if codes.numel() and int(codes.max()) > 2:
        raise LowbitError(f"codes: ternary codes must be 0, 1 or 2, found {int(codes.max())}")
    x = _runs(codes, _axis(codes, axis, "pack_ternary_5per_u8"), 5, torch.uint8)   # (..., R, 5)
    # at most 2*(1+3+9+27+81) = 242: the sum fits a byte
    packed = x[..., 0] + 3 * x[..., 1] + 9 * x[..., 2] + 27 * x[..., 3] + 81 * x[..., 4]
    return packed.movedim(-1, axis).contiguous()


def unpack_ternary_5per_u8(packed: torch.Tensor, length: int, axis: int = -1) -> torch.Tensor:
    """Inverse of pack_ternary_5per_u8; `length` = the original size of `axis`."""
    fn = "unpack_ternary_5per_u8"
    _need_dtype(packed, torch.uint8, fn)
    axis = _axis(packed, axis, fn)
    _check_unpack_length(length, packed.shape[axis], 5, axis, fn)
    p = packed.movedim(axis, -1).contiguous()
    if p.numel() and int(p.max()) > 242:
        raise LowbitError(f"{fn}: byte value {int(p.max())} > 242 is not 5 base-3 digits")
    trits = []
    for _ in range(5):                                    # peel base-3 digits, lowest first
        trits.append(p % 3)
        p = p // 3
    out = torch.stack(trits, dim=-1).reshape(*p.shape[:-1], -1)[..., :length]
    return out.movedim(-1, axis).contiguous()


def packed_len(n: int, bits: int, container: torch.dtype = torch.uint8) -> int:
    """Containers a run of n b-bit values takes (after zero padding); ternary5: bits=1.6."""
    if bits == 1.6:
        return -(-n // 5)
    run, words = _stream_shape(bits, _CONTAINER_BITS[container])
    return -(-n // run) * words
