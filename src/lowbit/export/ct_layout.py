"""compressed-tensors' tensor layout and config vocabulary: int32 bit packing, and the
QuantizationArgs dicts lowbit's Schemes map to (one concept: how a QuantizedWeight is spelled in
that format). The writer/reader is lowbit.export.compressed_tensors.

Source of the layout: the compressed-tensors package (vllm-project/compressed-tensors), release
0.19.0, read from its source: compressors/pack_quantized/{base,helpers}.py (pack_to_int32,
unpack_from_int32, PackedQuantizationCompressor), compressors/naive_quantized/base.py,
quantization/quant_args.py (QuantizationArgs, calculate_range), quantization/lifecycle/
forward{,_helpers}.py (dequantize), compressors/format.py (infer_module_format).

Codes. compressed-tensors quantizes to *signed* integers q_s in [-2^(b-1), 2^(b-1) - 1] with a
signed zero point z_s (asymmetric) or none (symmetric), and dequantizes x_hat = (q_s - z_s) * s.
lowbit holds unsigned codes q = q_s + 2^(b-1) and zero z = z_s + 2^(b-1) (symmetric: z = 2^(b-1)),
x_hat = (q - z) * s: the same number. pack_to_int32 adds the same 2^(b-1) offset before packing,
so the packed words hold exactly lowbit's unsigned codes.

Dense packing ("pack-quantized", num_bits b in 1..8): along the packed axis, every run of 32
values is one little-endian bit stream of 32*b bits cut into b int32 words, value i at stream
bits [i*b, (i+1)*b); the last run is zero-padded and the tensor is cut to ceil(n*b/32) words
(so a 3-bit row of 100 values takes 10 words, not the 12 of whole runs). b = 4:

    word k = v[8k] | v[8k+1] << 4 | ... | v[8k+7] << 28      (two's complement int32)
        bit 31    28 27    24       7     4 3     0
            [v8k+7 ] [v8k+6 ] ...   [v8k+1 ] [ v8k  ]
    b = 3: 32 values -> 3 words; value 10 straddles words 0|1 (its low 2 bits are word 0 bits
    30-31), value 21 straddles words 1|2. This is lowbit.numerics.packing's int32 stream.

    weight_packed      int32 (out, ceil(in*b/32))     codes, packed along the input axis (dim 1)
    weight_zero_point  int32 (ceil(out*b/32), groups) zero points, packed along dim 0 (output
                                                      axis), only asymmetric group/channel
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.numerics import packing

# config strings compressed-tensors uses (quant_args.py QuantizationStrategy / CompressionFormat)
PACK, NAIVE, INT_Q, FLOAT_Q = "pack-quantized", "naive-quantized", "int-quantized", "float-quantized"
READABLE_FORMATS = (PACK, NAIVE, INT_Q, FLOAT_Q)
STRATEGIES = ("tensor", "channel", "group", "block")
# strategies whose asymmetric zero point pack-quantized packs along dim 0 (PACK_ZP_STRATS)
PACKED_ZP = ("group", "channel")


# ---------------------------------------------------------------------------------------------
# Dense int32 packing (the layout above), through lowbit's bit-stream packer
# ---------------------------------------------------------------------------------------------
def packed_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack(codes: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Unsigned b-bit codes (uint8) -> int32 words along `axis` (compressed-tensors' layout)."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"compressed-tensors packing: num_bits must be 1..8, got {bits}")
    if bits in (2, 3, 4, 8):
        words = packing.pack_int32(codes, bits, axis)
    else:   # 1, 5, 6, 7 bits: the same 32-value stream; pack_int32's public check admits 2/3/4/8
        packing._check_codes(codes, bits)
        words = packing._pack_stream(codes, bits, torch.int32, axis % codes.dim())
    # lowbit pads to whole 32-value runs; compressed-tensors keeps only ceil(n*b/32) words
    return words.narrow(axis, 0, packed_words(codes.shape[axis], bits)).contiguous()


def unpack(words: torch.Tensor, bits: int, length: int, axis: int) -> torch.Tensor:
    """int32 words -> `length` unsigned codes (uint8) along `axis`; inverse of pack."""
    if words.dtype != torch.int32:
        raise LowbitError(f"expected int32 packed words, got {words.dtype}")
    if words.shape[axis] != packed_words(length, bits):
        raise LowbitError(f"{length} {bits}-bit values pack into {packed_words(length, bits)} int32 "
                          f"words along axis {axis}, got {words.shape[axis]}")
    run_words = packing._stream_shape(bits, 32)[1]          # words per lowbit stream run (6-bit: 3)
    pad = (-words.shape[axis]) % run_words
    if pad:
        shape = list(words.shape)
        shape[axis] = pad
        words = torch.cat([words, words.new_zeros(shape)], dim=axis)
    if bits in (2, 3, 4, 8):
        return packing.unpack_int32(words, bits, length, axis)
    return packing._unpack_stream(words, bits, length, axis % words.dim(), "compressed-tensors unpack")


# ---------------------------------------------------------------------------------------------
# QuantizationArgs <-> lowbit Scheme
# ---------------------------------------------------------------------------------------------
def weight_args(scheme, actorder: str | None = None) -> dict:
    """The compressed-tensors `weights` QuantizationArgs dict for a lowbit Scheme, or None when
    the format has no spelling for it (the caller names the layer in its refusal)."""
    if scheme.format == "int":
        typ, bits, symmetric = "int", scheme.bits, scheme.symmetric
    elif scheme.format == "fp8_e4m3":
        typ, bits, symmetric = "float", 8, True
    else:
        return None
    g = scheme.granularity
    if g == "channel" and scheme.axis not in (0, -2):
        return None
    return {"num_bits": bits, "type": typ, "symmetric": symmetric,
            "group_size": scheme.group_size if g == "group" else None, "strategy": g,
            "block_structure": list(scheme.block_size) if g == "block" else None,
            "dynamic": False, "actorder": actorder, "observer": None, "observer_kwargs": {}}


def activation_args(spec: dict | None, static_ok: bool = False) -> dict | None:
    """Validate an `input_activations` QuantizationArgs dict (W8A8 recipes): int8 or fp8, dynamic
    per token, or per tensor. None = weight-only (A16). static_ok: the writer has calibrated
    input_scale tensors for a static per-tensor scheme (export/ct_activations.py)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise LowbitError(f"input_activations: expected a dict of QuantizationArgs, got {type(spec).__name__}")
    known = {"num_bits", "type", "symmetric", "strategy", "dynamic", "group_size", "observer"}
    if set(spec) - known:
        raise LowbitError(f"input_activations: unknown keys {sorted(set(spec) - known)}; expected {sorted(known)}")
    a = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
         "block_structure": None, "dynamic": True, "actorder": None, "observer": None,
         "observer_kwargs": {}, **spec}
    if a["num_bits"] != 8 or a["type"] not in ("int", "float"):
        raise LowbitError(f"input_activations: expected num_bits 8 of type int or float, got "
                          f"{a['num_bits']} {a['type']}")
    if a["strategy"] not in ("token", "tensor"):
        raise LowbitError(f"input_activations.strategy: expected 'token' or 'tensor', got {a['strategy']!r}")
    if a["strategy"] == "token" and a["dynamic"] is not True:
        raise LowbitError("input_activations: per-token activation scales must be dynamic "
                          "(compressed-tensors refuses static token quantization)")
    if a["dynamic"] is not True and not static_ok:
        raise LowbitError("input_activations: static activation scales need calibrated input_scale "
                          "tensors, which lowbit does not produce; use dynamic: true")
    if a["type"] == "float" and not a["symmetric"]:
        raise LowbitError("input_activations: fp8 activations are symmetric")
    return a


def module_format(wargs: dict, aargs: dict | None) -> str:
    """The compressor compressed-tensors itself picks for this scheme (format.py
    infer_module_format's priority: int-quantized, pack-quantized, float-quantized,
    naive-quantized). Its model-free dequantizer re-infers it, so we write the same."""
    if wargs["type"] == "int":
        return INT_Q if aargs is not None else PACK
    return FLOAT_Q if aargs is not None else NAIVE


def scheme_from_args(w: dict, where: str):
    """compressed-tensors `weights` args -> lowbit Scheme; LowbitError for what lowbit lacks."""
    from lowbit.numerics.scheme import Scheme
    typ, bits = w.get("type", "int"), w.get("num_bits", 8)
    strategy = w.get("strategy")
    if strategy is None:       # QuantizationArgs' own inference from group_size
        gs = w.get("group_size")
        strategy = "tensor" if gs is None else ("group" if gs > 0 else "channel")
    if strategy not in STRATEGIES:
        raise LowbitError(f"{where}: weight strategy {strategy!r} is not one lowbit holds "
                          f"(expected one of {STRATEGIES}; tensor_group is nvfp4's)")
    kw: dict = {"granularity": strategy}
    if strategy == "group":
        if not isinstance(w.get("group_size"), int) or w["group_size"] <= 0:
            raise LowbitError(f"{where}: group strategy needs a positive group_size, got {w.get('group_size')!r}")
        kw["group_size"] = w["group_size"]
    if strategy == "block":
        bs = w.get("block_structure")
        if not (isinstance(bs, list) and len(bs) == 2):
            raise LowbitError(f"{where}: block strategy needs block_structure [rows, cols], got {bs!r}")
        kw["block_size"] = (int(bs[0]), int(bs[1]))
    if typ == "int":
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise LowbitError(f"{where}: int weights of {bits!r} bits; lowbit holds 2..8-bit integers")
        return Scheme(bits=bits, format="int", symmetric=bool(w.get("symmetric", True)), **kw)
    if typ == "float":
        if bits != 8:
            raise LowbitError(f"{where}: float weights of {bits} bits (fp4: nvfp4/mxfp4 formats) "
                              "are not read by lowbit; it reads fp8 e4m3")
        return Scheme(bits=8, format="fp8_e4m3", symmetric=True, **kw)
    raise LowbitError(f"{where}: weight type {typ!r}; expected 'int' or 'float'")


def infer_format(w: dict, a: dict | None) -> str:
    """Per-scheme format when config.json names none (or 'mixed-precision' at the top)."""
    if w.get("type", "int") == "int":
        return INT_Q if a is not None else (PACK if 1 <= w.get("num_bits", 8) <= 8 else NAIVE)
    return FLOAT_Q if a is not None else NAIVE
