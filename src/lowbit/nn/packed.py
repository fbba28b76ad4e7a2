"""Packed code layouts for the CPU kernels, and the "group form" every kernel reads.

Group form: any QuantizedWeight whose decode is affine in a 16-entry table can be written as

    W[n, k] = scale[n, g] * (lut[code[n, k]] - zero[n, g]),     g = k // group_size

with scale / zero shaped (N, G). Per-tensor and per-output-channel schemes are groups of
the whole row; block schemes are groups of block_cols with scales repeated down the rows;
act-order (g_idx) layouts become contiguous groups once the columns are permuted by
argsort(g_idx) (then x is permuted the same way at run time: y = W[:, p] @ x[p]).

Layouts (rows padded on the right to K_pad, a multiple of 32, with code 0; the kernels pad x
with 0.0 so the padding contributes nothing):

    q4x32  (N, K_pad/2) uint8, 2 codes per byte, per run of 32 columns:
               byte j of run c:  bits 7..4 = col 32c+16+j   bits 3..0 = col 32c+j
           (the split ggml's Q4_0 uses: one 16-byte load gives two contiguous 16-value halves)
    u8     (N, K_pad) uint8, one code per byte (5..8-bit codes)
    t2x64  ternary codes t + 1 in {0, 1, 2} (TernaryCodec's), 4 per byte, rows padded to a multiple
           of 64 columns with code 1 (value 0); per run of 64 columns, 16 bytes:
               byte j of run c:  bits 7..6 = col 64c+48+j  5..4 = 64c+32+j  3..2 = 64c+16+j  1..0 = 64c+j
           (one 16-byte load shifted by 0 / 2 / 4 / 6 gives the run's 64 codes in column order;
           the same split as ggml's TQ2_0, on runs of 64 instead of 128)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.affine import codec_for
from lowbit.numerics.qweight import QuantizedWeight

RUN = 32  # columns per packed run; every kernel pads K to a multiple of it


def padded_cols(cols: int) -> int:
    return -(-cols // RUN) * RUN


def pack_q4x32_u8(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 16) -> (N, K_pad/2) uint8 in the q4x32 layout above."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise LowbitError(f"pack_q4x32_u8: expected 2-D uint8 codes, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise LowbitError(f"pack_q4x32_u8: codes must be < 16, found {int(codes.max())}")
    n, k = codes.shape
    kp = padded_cols(k)
    c = torch.nn.functional.pad(codes, (0, kp - k)) if kp != k else codes
    c = c.reshape(n, kp // RUN, 2, 16)                 # (N, runs, lo|hi half, 16)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, kp // 2).contiguous()


def unpack_q4x32_u8(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_q4x32_u8: (N, K_pad/2) -> (N, cols) uint8 codes."""
    n = packed.shape[0]
    b = packed.reshape(n, -1, 1, 16)
    c = torch.cat([b & 0x0F, b >> 4], dim=2)           # (N, runs, 2, 16)
    return c.reshape(n, -1)[:, :cols]


T2_RUN = 64  # columns per t2x64 run


def pack_t2x64_u8(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 ternary codes in {0, 1, 2} -> (N, K_pad64/4) uint8 in the t2x64 layout above."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise LowbitError(f"pack_t2x64_u8: expected 2-D uint8 codes, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 2:
        raise LowbitError(f"pack_t2x64_u8: ternary codes must be 0, 1 or 2, found {int(codes.max())}")
    n, k = codes.shape
    kp = -(-k // T2_RUN) * T2_RUN
    c = torch.nn.functional.pad(codes, (0, kp - k), value=1) if kp != k else codes
    c = c.reshape(n, kp // T2_RUN, 4, 16)              # (N, runs, quarter, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(n, kp // 4).contiguous()


def unpack_t2x64_u8(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_t2x64_u8: (N, K_pad/4) -> (N, cols) uint8 codes."""
    n = packed.shape[0]
    b = packed.reshape(n, -1, 1, 16)
    c = torch.cat([b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6], dim=2)   # (N, runs, 4, 16)
    return c.reshape(n, -1)[:, :cols]


def pack_u8(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 -> (N, K_pad) uint8 (zero padded), the byte container."""
    k = codes.shape[1]
    kp = padded_cols(k)
    return (torch.nn.functional.pad(codes, (0, kp - k)) if kp != k else codes).contiguous()


@dataclass
class GroupForm:
    """A QuantizedWeight rewritten for the kernels (see module docstring)."""
    codes: torch.Tensor            # (N, K) uint8, columns already permuted when perm is set
    lut: torch.Tensor              # (16,) float32: value of each code before scale / zero
    scale: torch.Tensor            # (N, G) float32 contiguous
    zero: torch.Tensor | None      # (N, G) float32 contiguous, None when all zero
    group_size: int                # columns per group (the last may be shorter)
    perm: torch.Tensor | None      # (K,) int64 column order, or None
    in_features: int
    nibble: bool                   # codes fit 4 bits (q4x32 container) else bytes (u8)


def code_lut(qw: QuantizedWeight) -> torch.Tensor | None:
    """The 16 decoded values of codes 0..15 at scale 1, zero 0; None if the format's codes go past 15
    (5..8-bit ints, whose value is the code itself and use the byte container)."""
    sch = qw.scheme
    if sch.format == "int" and sch.bits > 4:
        return None
    codec = codec_for(sch)
    c = torch.arange(16, dtype=torch.uint8).reshape(1, 16)
    one = torch.ones(1, 16)
    zero = None if qw.zero_point is None else torch.zeros(1, 16)
    return codec.decode(c, one, zero, sch).float().reshape(16).contiguous()


def to_group_form(qw: QuantizedWeight, name: str = "weight") -> GroupForm:
    """Rewrite `qw` as GroupForm, or raise LowbitError saying which scheme feature has no group form
    (the caller then uses the tiled fallback, which reads any scheme)."""
    sch = qw.scheme
    n, k = qw.shape
    scale, zero = qw.scale.float(), None if qw.zero_point is None else qw.zero_point.float()
    codes, perm = qw.qdata, None
    if sch.granularity == "tensor":
        gs, scale = padded_cols(k), scale.reshape(1, 1).expand(n, 1)
        zero = None if zero is None else zero.reshape(1, 1).expand(n, 1)
    elif sch.granularity == "channel":
        if sch.axis != 0:
            raise LowbitError(f"{name}: per-input-channel scales (axis={sch.axis}) have no group form")
        gs = padded_cols(k)
    elif sch.granularity == "group":
        gs = sch.group_size
        if qw.g_idx is not None:
            g = qw.g_idx.long()
            perm = torch.argsort(g, stable=True)
            if not torch.equal(g[perm], torch.arange(k) // gs):
                raise LowbitError(f"{name}: g_idx groups are not all of size {gs}; no group form")
            codes = codes[:, perm]
    else:  # block: scales repeat down the rows of each block
        br, bc = sch.block_size
        gs = bc
        scale = scale.repeat_interleave(br, 0)[:n]
        zero = None if zero is None else zero.repeat_interleave(br, 0)[:n]
    if gs % RUN:
        raise LowbitError(f"{name}: group size {gs} is not a multiple of {RUN}; no group form")
    lut = code_lut(qw)
    nibble = lut is not None
    if lut is None:
        lut = torch.arange(16, dtype=torch.float32)  # the byte kernel reads codes as values
    if zero is not None and not bool(torch.any(zero != 0)):
        zero = None                                  # codebooks: no zero term to subtract
    form = GroupForm(codes.contiguous(), lut, scale.contiguous(),
                     None if zero is None else zero.contiguous(), gs, perm, k, nibble)
    _probe_exact(form, qw, name)
    return form


def _probe_exact(form: GroupForm, qw: QuantizedWeight, name: str, rows: int = 8) -> None:
    """Decode a few rows both ways; a codec whose decode is not scale*(lut[c]-zero) is refused here
    rather than computed wrongly by a kernel."""
    r = min(rows, qw.shape[0])
    ref = QuantizedWeight(qw.qdata[:r], _rows(qw.scale, r, qw), _rows(qw.zero_point, r, qw),
                          qw.scheme, qw.g_idx).dequantize()
    got = dequantize_group_form_rows(form, 0, r)
    if form.perm is not None:
        ref = ref[:, form.perm]
    if not torch.allclose(got, ref, rtol=1e-6, atol=1e-7 * float(ref.abs().max().clamp(min=1e-30))):
        raise LowbitError(f"{name}: format {qw.scheme.format!r} does not decode as "
                          "scale*(lut[code]-zero); no group form")


def _rows(p: torch.Tensor | None, r: int, qw: QuantizedWeight) -> torch.Tensor | None:
    if p is None or p.shape[0] == 1:
        return p
    if qw.scheme.granularity == "block":
        return p[: -(-r // qw.scheme.block_size[0])]
    return p[:r]


def dequantize_group_form_rows(form: GroupForm, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of the (column-permuted) float weight, (r1-r0, K) float32."""
    c = form.codes[r0:r1]
    k = c.shape[1]
    g = torch.arange(k) // form.group_size
    w = form.lut[c.long()] if form.nibble else c.float()
    if form.zero is not None:
        w = w - form.zero[r0:r1][:, g]
    return w * form.scale[r0:r1][:, g]
