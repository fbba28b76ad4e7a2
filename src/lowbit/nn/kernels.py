"""CPU kernels for QuantLinear on packed weights. Each is an nn.Module holding its packed
buffers, called as kernel(x, module) -> y (QuantLinear's `set_kernel` hook).

    backend  weights held as                          formats                      compute
    -------  ---------------------------------------  ---------------------------  -------------------
    ext      q4x32 nibbles or u8 bytes + (N, G) fp32  int 2..8 bits, NF4/FP4/      our C++ (nn/ext): fp32
             scale / zero (nn/packed.py)              ternary (any 16-entry table)  GEMV at decode (or int8
                                                      group sizes multiple of 32   activations, see below),
                                                                                   our fp32 GEMM on weight
                                                                                   panels at prefill
    ext      t2x64: ternary, 2 bits per code +        ternary whose layer rounds   TernaryKernel: x rounded
    (t2)     (N, G) fp32 scale                        its input to int8 per token  per token to int8 in C++,
                                                      (BitNet b1.58), groups of    exact int32 code x q sums,
                                                      64k or one per row           every M
    torch    torch's int4pack / int8 + scales         int <= 4 bits (group 32..256  aten._weight_int4pack_mm
                                                      after splitting), int8 sym    _for_cpu / _weight_int8pack_mm
                                                      per channel
    tiled    q4x32 / u8 codes + the original qparams  anything a codec decodes      dequantize a tile of rows
                                                                                     (reference code), F.linear

None of them builds the whole float weight: `tiled` holds at most TILE_FLOATS floats at once.
`ext` runs on the ISA variant nn/ext picked for this CPU (AVX-512+VNNI, AVX-512, AVX2+FMA or
portable; LOWBIT_ISA forces one). Decode activations: "fp32" multiplies fp32 activations with the
exact dequantized weights; "int8" rounds the activations per 32-column block to int8 (ggml's Q8_0)
and sums codes x int8 exactly in int32 (AVX2 maddubs / AVX-512 VNNI), for integer codes only
(int formats; codebooks stay on fp32). DECODE_ACT is the default (LOWBIT_DECODE_ACT overrides it;
BENCHMARKS.md "CPU kernels: AVX2 / AVX-512 / portable" has the speed and accuracy that chose it);
set_decode_activations(model, ...) switches a prepared model.

Every kernel is tested against QuantLinear's dequantize-then-matmul reference
(tests/test_kernels.py); `ext` and `torch` differ from it only by float summation order.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.nn import ext
from lowbit.nn.packed import (T2_RUN, GroupForm, dequantize_group_form_rows, pack_q4x32_u8, pack_t2x64_u8,
                              pack_u8, padded_cols, to_group_form, unpack_q4x32_u8, unpack_t2x64_u8)
from lowbit.numerics.qweight import QuantizedWeight

BACKENDS = ("ext", "torch", "tiled")
# batch rows up to which the C++ kernel streams codes per row (GEMV); above it, the prefill GEMM
# (bench/bench_kernels.py picks it)
GEMV_MAX_M = 4
TILE_FLOATS = 1 << 20  # tiled fallback: at most 4 MiB of float weight at a time
# "auto": int8 activations for 4-bit-or-smaller integer codes, fp32 for 8-bit ones. Measured on
# the bundled model (BENCHMARKS.md, CPU kernels): int8 activations add ~0.003 nats of KL in both
# cases, ~1% of what 4-bit weights already cost (0.38) but +60% of 8-bit weights' (0.004).
DECODE_ACTS = ("auto", "fp32", "int8")
DECODE_ACT = os.environ.get("LOWBIT_DECODE_ACT", "auto").strip().lower()
# Prefill (M > GEMV_MAX_M) activations: "fp32" runs our fp32 GEMM (nn/ext/kern_gemm_f32.h: x
# packed once, the weight dequantized into L1-sized panels; the portable variant, which has none,
# dequantizes row tiles and calls MKL); "fp32-mkl" forces that tile + MKL path (kept for
# comparisons); "int8" rounds the activations per chunk (<= 256 columns inside one weight group)
# and runs the integer GEMM (nn/ext/kern_gemm_q8.h), 4-bit integer codes only (8-bit codes and
# codebooks stay fp32).
# PREFILL_ACT is the default (LOWBIT_PREFILL_ACT overrides it; BENCHMARKS.md "our own prefill
# GEMMs" has the speed and accuracy that chose it: int8 is 1.3-2x faster but adds activation
# rounding, and `lowbit eval` scores through this path); set_prefill_activations(model, ...)
# switches a prepared model.
PREFILL_ACTS = ("fp32", "fp32-mkl", "int8")
PREFILL_ACT = os.environ.get("LOWBIT_PREFILL_ACT", "fp32").strip().lower()
# Ternary weights whose layer rounds its input to int8 per token (BitNet b1.58's W1.58A8, the
# frozen model's ActScheme(int8, dynamic, token)) get TernaryKernel: 2-bit codes (t2x64) and the
# rounding done in C++; False (LOWBIT_TERNARY_T2=0) keeps them on the nibble kernel with fp32
# activations and the rounding in torch, as before (for comparisons).
TERNARY_T2 = os.environ.get("LOWBIT_TERNARY_T2", "1").strip().lower() not in ("0", "off", "false", "no")
_q4_linear = _u8_linear = _t2_linear = None  # torch.ops.lowbit_cpu.* once the extension is loaded


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _flat(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.shape[-1] != k:
        raise LowbitError(f"quantized linear: expected input with last dim {k}, got {tuple(x.shape)}")
    return x.reshape(-1, k)


class ExtKernel(nn.Module):
    """Our C++ kernel (nn/ext/lowbit_cpu.cpp) on the q4x32 / u8 containers, fp32 accumulation."""
    backend = "ext"

    def __init__(self, form: GroupForm, bias: torch.Tensor | None = None, act: str | None = None):
        super().__init__()
        if not ext.load():
            raise LowbitError(f"backend 'ext': C++ kernels unavailable ({ext.status()})")
        global _q4_linear, _u8_linear
        _q4_linear, _u8_linear = torch.ops.lowbit_cpu.q4_linear.default, torch.ops.lowbit_cpu.u8_linear.default
        self.out_features, self.in_features = form.codes.shape[0], form.in_features
        self.k_pad = padded_cols(self.in_features)
        self.nibble = form.nibble
        self.group_size = form.group_size
        self.register_buffer("codes", pack_q4x32_u8(form.codes) if form.nibble else pack_u8(form.codes))
        # the kernel's own fp32 qparams are plain attributes, not buffers: model.to(bfloat16) must
        # not round them (the kernel computes in fp32 whatever the activation dtype)
        self.lut, self.scale, self.zero, self.perm = form.lut.contiguous(), form.scale, form.zero, form.perm
        self.bias = bias
        # int8 activations need W = scale * (code - zero) with integer codes: the byte container,
        # or nibbles whose table is 0..15 (not NF4 / FP4 / ternary)
        self.int_codes = not form.nibble or torch.equal(self.lut, torch.arange(16, dtype=torch.float32))
        self.prefill = "fp32"
        self.set_act(DECODE_ACT if act is None else act)
        self.set_prefill(PREFILL_ACT)

    def set_prefill(self, act: str) -> None:
        """Prefill activations: 'fp32' (our GEMM on dequantized panels), 'fp32-mkl' (row tiles
        dequantized, then MKL) or 'int8' (integer GEMM; falls back to fp32 for anything but 4-bit
        integer codes)."""
        if act not in PREFILL_ACTS:
            raise LowbitError(f"prefill activations: expected one of {'|'.join(PREFILL_ACTS)}, got {act!r}")
        self.prefill = "fp32" if act == "int8" and not (self.nibble and self.int_codes) else act
        self.__dict__.pop("_args", None)

    def q8_flags(self) -> int:
        """The kernel op's act_q8 argument: bit 0 int8 decode, bit 1 int8 prefill activations,
        bit 2 the tile + MKL fp32 prefill path."""
        return int(self.act == "int8") | (2 * int(self.prefill == "int8")) | (4 * int(self.prefill == "fp32-mkl"))

    def set_act(self, act: str) -> None:
        """Decode activations: 'fp32', 'int8' (falls back to fp32 for non-integer codes) or 'auto'
        (int8 for the 4-bit container's integer codes, fp32 for 8-bit codes; see DECODE_ACT)."""
        if act not in DECODE_ACTS:
            raise LowbitError(f"decode activations: expected one of {'|'.join(DECODE_ACTS)}, got {act!r}")
        if act == "auto":
            act = "int8" if self.nibble else "fp32"
        self.act = act if self.int_codes else "fp32"
        self.__dict__.pop("_args", None)

    def forward(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        # kept lean: at decode this runs ~200 times a token, so each microsecond here counts
        op, args, k, n, plain, bias = self.__dict__.get("_args") or self._cache_args()
        if x.shape[-1] != k:
            _flat(x, k)  # raises the LowbitError naming the expected width
        xf = x.reshape(-1, k)
        if not plain or xf.dtype != torch.float32 or not xf.is_contiguous():
            xf = self._prepare_input(xf)
        y = op(xf, *args)
        if bias is not None:
            y = y + bias.float()
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], n)

    def _prepare_input(self, xf: torch.Tensor) -> torch.Tensor:
        """(M, K) any float -> (M, K_pad) contiguous fp32 in the packed column order."""
        xf = xf.float()
        if self.perm is not None:
            xf = xf.index_select(1, self.perm)
        if self.k_pad != self.in_features:
            xf = F.pad(xf, (0, self.k_pad - self.in_features))
        return xf.contiguous()

    def _cache_args(self) -> tuple:
        # buffers read through nn.Module.__getattr__ cost ~0.7 us each; keep them in a plain tuple
        # (dropped by _apply, i.e. on .to() / .float(), and rebuilt on the next call)
        op, args = self.fused_call(self.codes, self.scale, self.zero)
        plain = self.perm is None and self.k_pad == self.in_features
        a = (op, args, self.in_features, self.out_features, plain, self.bias)
        self.__dict__["_args"] = a
        return a

    def fused_call(self, codes, scale, zero) -> tuple:
        """(op, args after x) for these buffers: nn/step.py's FusedRows calls it on the row-wise
        concatenation of several kernels' codes / scales / zeros."""
        q8 = self.q8_flags()
        if self.nibble:
            return _q4_linear, (codes, self.lut, scale, zero, self.group_size, GEMV_MAX_M, q8)
        return _u8_linear, (codes, scale, zero, self.group_size, GEMV_MAX_M, q8)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_args", None)
        return super()._apply(fn, *args, **kwargs)

    def nbytes(self) -> int:
        return _nbytes(self.codes, self.lut, self.scale, self.zero, self.perm)

    def unpack_codes(self) -> torch.Tensor:
        c = unpack_q4x32_u8(self.codes, self.in_features) if self.nibble else self.codes[:, :self.in_features]
        if self.perm is not None:
            c = c[:, torch.argsort(self.perm)]
        return c

    @property
    def layout(self) -> str:
        return "q4x32" if self.nibble else "u8"


def token_int8(act) -> bool:
    """True for BitNet's activation scheme: int8, dynamic, one scale per token, no LLM.int8() split."""
    return (act is not None and act.format == "int8" and act.dynamic and act.granularity == "token"
            and act.outlier_threshold is None)


class TernaryKernel(ExtKernel):
    """BitNet b1.58 linears on our C++ kernel: ternary codes 2 bits each (t2x64, half the bytes of
    the nibble container) and the layer's per-token int8 activation rounding done in C++ in the same
    call, then exact int32 dot products (AVX-512 VNNI vpdpbusd / vpmaddubsw / portable C++).

    forward(x) takes the float input *before* rounding (PackedLinear skips its ActQuant for it):
    y = s_x * scale * sum_k (code_k - 1) * round(x_k / s_x), s_x = max|x| / 127 per token, i.e. the
    reference F.linear(fake_quant_act(x), W) to fp32 rounding. forward_float(x) takes an already
    rounded (or float) x: any other activation scheme, non-fp32 inputs (dequantized tiles + F.linear).
    """

    def __init__(self, form: GroupForm, bias: torch.Tensor | None, input_act):
        nn.Module.__init__(self)
        if not ext.load():
            raise LowbitError(f"backend 'ext': C++ kernels unavailable ({ext.status()})")
        global _t2_linear
        _t2_linear = torch.ops.lowbit_cpu.t2_linear.default
        self.out_features, self.in_features = form.codes.shape[0], form.in_features
        self.k_pad = -(-self.in_features // T2_RUN) * T2_RUN
        # one scale per row: the group is the whole padded row; else the form's groups (multiples of 64)
        self.group_size = self.k_pad if form.scale.shape[1] == 1 else form.group_size
        self.register_buffer("codes", pack_t2x64_u8(form.codes))
        self.lut, self.scale, self.zero, self.perm = form.lut.contiguous(), form.scale, None, None
        self.bias = bias
        self.nibble, self.int_codes = False, True
        self.act = self.prefill = "int8-token"
        self.input_act = input_act      # the ActScheme this kernel applies to x itself

    @staticmethod
    def takes(form: GroupForm) -> bool:
        """Ternary codes {0, 1, 2} -> {-1, 0, 1} * scale, no zero, no permutation, groups of 64k."""
        return (form.perm is None and form.zero is None and form.lut[:3].tolist() == [-1.0, 0.0, 1.0]
                and (form.scale.shape[1] == 1 or form.group_size % T2_RUN == 0)
                and (form.codes.numel() == 0 or int(form.codes.max()) <= 2))

    def set_act(self, act: str) -> None:
        """The activation rounding is the model's own (BitNet's int8 per token): not switchable."""
        if act not in DECODE_ACTS:
            raise LowbitError(f"decode activations: expected one of {'|'.join(DECODE_ACTS)}, got {act!r}")

    def set_prefill(self, act: str) -> None:
        if act not in PREFILL_ACTS:
            raise LowbitError(f"prefill activations: expected one of {'|'.join(PREFILL_ACTS)}, got {act!r}")

    def q8_flags(self) -> int:
        return 0

    def fused_call(self, codes, scale, zero) -> tuple:
        return _t2_linear, (codes, scale, self.group_size)

    def _cache_args(self) -> tuple:
        op, args = self.fused_call(self.codes, self.scale, None)
        a = (op, args, self.in_features, self.out_features, True, self.bias)   # C++ pads x itself
        self.__dict__["_args"] = a
        return a

    @property
    def layout(self) -> str:
        return "t2x64"

    def unpack_codes(self) -> torch.Tensor:
        return unpack_t2x64_u8(self.codes, self.in_features)

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W^T for an x already rounded (or float): tiles of dequantized rows, F.linear."""
        x2 = _flat(x, self.in_features)
        g = torch.arange(self.in_features) // self.group_size
        step = max(1, TILE_FLOATS // max(1, self.in_features))
        out = []
        for r0 in range(0, self.out_features, step):
            r1 = min(self.out_features, r0 + step)
            c = unpack_t2x64_u8(self.codes[r0:r1], self.in_features).long()
            out.append(F.linear(x2, (self.lut[c] * self.scale[r0:r1][:, g]).to(x2.dtype)))
        y = torch.cat(out, dim=1) if len(out) > 1 else out[0]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class TorchKernel(nn.Module):
    """torch's own weight-only CPU kernels.

    int4: aten._weight_int4pack_mm_for_cpu computes W = (q - 8) * s + z' per group of 32..256
    columns (q in [0, 16), s/z' stored as (K/g, N, 2), the tinygemm convention); lowbit's
    W = s * (q - z) maps onto it exactly with z' = (8 - z) * s. A group the op does not accept
    (e.g. 576-column rows in groups of 128, whose last group has 64) is split into sub-groups of
    the largest accepted size dividing both (64), each repeating its parent's scale and zero.
    int8: aten._weight_int8pack_mm computes x @ (int8 W * s).T per output channel.
    """
    backend = "torch"
    INT4_GROUPS = (256, 128, 64, 32)

    def __init__(self, form: GroupForm, bias: torch.Tensor | None = None, name: str = "weight"):
        super().__init__()
        self.out_features, self.in_features = form.codes.shape[0], form.in_features
        if not torch.equal(form.lut, torch.arange(16, dtype=torch.float32)):
            raise LowbitError(f"{name}: backend 'torch' takes integer codes only (not a codebook)")
        if form.perm is not None:
            raise LowbitError(f"{name}: backend 'torch' does not take act-order (g_idx) layouts")
        self.bias = bias
        n, k, gs = self.out_features, self.in_features, form.group_size
        zero = form.zero if form.zero is not None else torch.zeros_like(form.scale)
        if form.nibble:
            sub = next((g for g in self.INT4_GROUPS if gs % g == 0), None)
            if sub is None or n % 16:
                raise LowbitError(f"{name}: backend 'torch' int4 needs group size a multiple of 32 "
                                  f"and out_features % 16 == 0, got group {gs}, out_features {n}")
            self.kind, self.sub_group = "int4", sub
            self.k_pad = -(-k // sub) * sub
            codes = F.pad(form.codes, (0, self.k_pad - k)).to(torch.int32)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
            parent = torch.clamp(torch.arange(self.k_pad // sub) * sub // gs, max=form.scale.shape[1] - 1)
            s, z = form.scale[:, parent], zero[:, parent]                  # (N, K_pad/sub)
            sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1)   # (K_pad/sub, N, 2)
            self.scales_and_zeros = sz.contiguous()  # fp32 master; cast per activation dtype
        else:
            w = None if form.scale.shape[1] != 1 else form.codes.to(torch.int16) - zero.round().to(torch.int16)
            if w is None or int(w.min()) < -128 or int(w.max()) > 127:
                raise LowbitError(f"{name}: backend 'torch' int8 needs one scale per output channel "
                                  "and codes - zero within int8")
            self.kind, self.k_pad = "int8", k
            self.int8_zero = zero.round().to(torch.int16)   # (N, 1), to give the codes back
            self.register_buffer("packed", w.to(torch.int8).contiguous())
            self.scales = form.scale[:, 0].contiguous()
        self._cast: dict = {}

    def nbytes(self) -> int:
        return _nbytes(self.packed, getattr(self, "scales_and_zeros", None), getattr(self, "scales", None))

    def unpack_codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes back from torch's opaque layout (exports and checks only)."""
        if self.kind == "int4":
            # with scale 1 and z' = 8 the op computes W = q, so eye(K) @ W.T reads the codes out
            sz = torch.zeros_like(self.scales_and_zeros)
            sz[..., 0], sz[..., 1] = 1.0, 8.0
            eye = torch.eye(self.k_pad)
            q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.sub_group, sz)
            return q.t()[:, :self.in_features].round().to(torch.uint8)
        return (self.packed.to(torch.int16) + self.int8_zero).to(torch.uint8)

    def _qparams(self, dtype: torch.dtype) -> torch.Tensor:
        t = self.scales_and_zeros if self.kind == "int4" else self.scales
        if t.dtype == dtype:
            return t
        if dtype not in self._cast:
            self._cast[dtype] = t.to(dtype)
        return self._cast[dtype]

    def forward(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _flat(x, self.in_features)
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        x2 = x2.contiguous()
        if self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.sub_group,
                                                           self._qparams(x2.dtype))
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.packed, self._qparams(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)


class TiledKernel(nn.Module):
    """Any format: codes kept packed; each forward dequantizes TILE_FLOATS-sized tiles of rows with
    the reference codec (so values match QuantLinear exactly) and multiplies them with F.linear."""
    backend = "tiled"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.nibble = int(qw.qdata.max()) < 16 if qw.qdata.numel() else True
        self.register_buffer("codes", pack_q4x32_u8(qw.qdata) if self.nibble else qw.qdata.contiguous())
        self.register_buffer("scale", qw.scale)
        self.register_buffer("zero_point", qw.zero_point)
        self.register_buffer("g_idx", qw.g_idx)
        self.scheme = qw.scheme
        step = max(1, TILE_FLOATS // self.in_features)
        if qw.scheme.granularity == "block":
            br = qw.scheme.block_size[0]
            step = max(br, step // br * br)
        self.tile_rows = step
        self.bias = bias

    def _qp_rows(self, p: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor | None:
        if p is None or p.shape[0] == 1:
            return p
        if self.scheme.granularity == "block":
            br = self.scheme.block_size[0]
            return p[r0 // br: -(-r1 // br)]
        return p[r0:r1]

    def forward(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _flat(x, self.in_features)
        out = []
        for r0 in range(0, self.out_features, self.tile_rows):
            r1 = min(self.out_features, r0 + self.tile_rows)
            c = (unpack_q4x32_u8(self.codes[r0:r1], self.in_features) if self.nibble
                 else self.codes[r0:r1])
            w = QuantizedWeight(c, self._qp_rows(self.scale, r0, r1), self._qp_rows(self.zero_point, r0, r1),
                                self.scheme, self.g_idx).dequantize(x.dtype)
            out.append(F.linear(x2, w))
        y = torch.cat(out, dim=1) if len(out) > 1 else out[0]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def unpack_codes(self) -> torch.Tensor:
        return unpack_q4x32_u8(self.codes, self.in_features) if self.nibble else self.codes

    def nbytes(self) -> int:
        return _nbytes(*self.buffers(recurse=False))


def make_kernel(qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto",
                name: str = "weight", input_act=None) -> nn.Module:
    """The kernel for one weight. backend: "auto" (ext, else tiled), "ext", "torch" or "tiled";
    an explicit backend that cannot take this weight raises LowbitError saying why. input_act: the
    layer's input ActScheme; BitNet's int8 per token on a ternary weight selects TernaryKernel."""
    if backend not in ("auto",) + BACKENDS:
        raise LowbitError(f"backend: expected one of auto|{'|'.join(BACKENDS)}, got {backend!r}")
    if backend == "tiled":
        return TiledKernel(qw, bias)
    try:
        form = to_group_form(qw, name)
    except LowbitError:
        if backend != "auto":
            raise
        return TiledKernel(qw, bias)
    if backend == "torch":
        return TorchKernel(form, bias, name)
    if (TERNARY_T2 and qw.scheme.format == "ternary" and token_int8(input_act) and TernaryKernel.takes(form)
            and ext.load()):
        return TernaryKernel(form, bias, input_act)
    if backend == "ext" or ext.load():
        return ExtKernel(form, bias)
    return TiledKernel(qw, bias)


def _set_ext(model: nn.Module, setter: str, act: str, field: str) -> int:
    n = 0
    for mod in model.modules():
        if isinstance(mod, ExtKernel):
            getattr(mod, setter)(act)
            n += getattr(mod, field) == "int8"
    return n


def set_decode_activations(model: nn.Module, act: str) -> int:
    """Switch every `ext` kernel in `model` to 'fp32', 'int8' or 'auto' decode activations; returns how
    many kernels now use int8 (codebook formats stay fp32)."""
    return _set_ext(model, "set_act", act, "act")


def set_prefill_activations(model: nn.Module, act: str) -> int:
    """Switch every `ext` kernel in `model` to 'fp32', 'fp32-mkl' or 'int8' prefill; returns how
    many kernels now use int8 (only 4-bit integer codes can)."""
    return _set_ext(model, "set_prefill", act, "prefill")


def available_backends() -> dict[str, str]:
    """backend -> 'ready' or why not (for `lowbit generate --backend` and reports)."""
    return {"ext": "ready" if ext.load() else ext.status(),
            "torch": "ready" if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else "missing op",
            "tiled": "ready"}


def dequantize_form(form: GroupForm) -> torch.Tensor:
    """Whole float weight from a GroupForm: for tests and debugging only (kernels never call it)."""
    w = dequantize_group_form_rows(form, 0, form.codes.shape[0])
    if form.perm is not None:
        w = w[:, torch.argsort(form.perm)]
    return w
