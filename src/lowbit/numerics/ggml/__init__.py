"""ggml block quantization: llama.cpp's GGUF tensor types as number formats.

    from lowbit.numerics.ggml import quantize, dequantize
    blob = quantize(w, "Q4_K", imatrix=imp)          # uint8 (rows, row_bytes): the GGUF tensor bytes
    w_hat = dequantize(blob, "Q4_K", w.shape)         # float32, bit-identical to ggml's to_float

Modules: types (type table, codec registry, ggml's float32 arithmetic), ksearch (the weighted
scale searches), blocks / kquants / ternary (codecs). Elsewhere, by layer: the imatrix is
calibration (calibration/imatrix.py), the mixes (Q4_K_M & co.) are Recipe presets
(presets/gguf_mixes.py), HF <-> llama.cpp tensor names are architecture data
(arch/gguf_names.py), and the GGUF file is a format (export/gguf/).
"""
from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError
from lowbit.numerics.ggml.types import GGML_TYPES, QUANTIZED_TYPES, GGMLType, get_codec, ggml_type

__all__ = ["quantize", "dequantize", "GGML_TYPES", "QUANTIZED_TYPES", "GGMLType", "ggml_type"]

# rows per encoder call are chosen so one call touches about this many weights: the searches hold
# ~10 float32 temporaries of the input's size, so this bounds their memory (~40 MB per array)
CHUNK_WEIGHTS = 1 << 22


def _as_f32_2d(x, name: str) -> np.ndarray:
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise LowbitError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.size == 0:
        raise LowbitError(f"{name}: expected a non-empty 2-D (rows, n_per_row) array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise LowbitError(f"{name}: contains {int((~np.isfinite(a)).sum())} NaN/inf value(s); "
                          "refusing to quantize non-finite input")
    return a


def quantize(x, type_name: str | GGMLType, imatrix=None, name: str = "tensor") -> np.ndarray:
    """Encode rows of x (rows, n_per_row) as ggml `type_name` -> uint8 (rows, row_bytes).

    imatrix: optional (n_per_row,) non-negative per-column importance (mean x^2 of the layer input,
    as llama-imatrix collects it). Without one the bytes equal ggml's quantize_row_<t>_ref; with
    one, ggml's quantize_<t> imatrix path (quantize_row_<t>_impl)."""
    t = ggml_type(type_name)
    a = _as_f32_2d(x, name)
    rows, n = a.shape
    if not t.fits(n):
        raise LowbitError(f"{name}: a row of {n} values is not a multiple of {t.name}'s block of "
                          f"{t.block_size}; use a fallback type (lowbit.presets.gguf_mixes.fallback_type)")
    if t.name == "F32":
        return a.view(np.uint8).reshape(rows, -1).copy()
    if t.name == "F16":
        return a.astype("<f2").view(np.uint8).reshape(rows, -1)
    if t.name == "BF16":
        from gguf.quants import quantize as gq
        from gguf.constants import GGMLQuantizationType
        return gq(a, GGMLQuantizationType.BF16).view(np.uint8).reshape(rows, -1)
    imp = None
    if imatrix is not None:
        imp = _as_f32_2d(imatrix, f"{name} imatrix").ravel()
        if imp.shape != (n,):
            raise LowbitError(f"{name}: imatrix has {imp.size} values, expected one per column ({n})")
        if (imp < 0).any():
            raise LowbitError(f"{name}: imatrix has negative values; expected mean squared activations")
    encode, _ = get_codec(t)
    step = max(1, CHUNK_WEIGHTS // n)
    out = np.empty((rows, t.row_bytes(n)), dtype=np.uint8)
    for r0 in range(0, rows, step):
        out[r0:r0 + step] = encode(a[r0:r0 + step], imp)
    return out


def dequantize(data, type_name: str | GGMLType, shape: tuple[int, int], name: str = "tensor") -> np.ndarray:
    """Decode GGUF tensor bytes of logical shape (rows, n_per_row) -> float32 (rows, n_per_row)."""
    t = ggml_type(type_name)
    rows, n = int(shape[0]), int(shape[-1])
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) \
        else np.asarray(data).view(np.uint8).ravel()
    if n < 1 or rows < 1:
        raise LowbitError(f"{name}: empty shape ({rows}, {n}); a GGUF tensor has at least one element")
    need = rows * t.row_bytes(n)
    if not t.fits(n) or raw.size != need:
        raise LowbitError(f"{name}: {t.name} data for shape ({rows}, {n}) must be {need} bytes "
                          f"(rows of {n} in blocks of {t.block_size}), got {raw.size}")
    raw = raw.reshape(rows, -1)
    if t.name == "F32":
        return raw.view("<f4").astype(np.float32).reshape(rows, n)
    if t.name == "F16":
        return raw.view("<f2").astype(np.float32).reshape(rows, n)
    if t.name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(rows, n)
    _, decode = get_codec(t)
    step = max(1, CHUNK_WEIGHTS // n)
    out = np.empty((rows, n), dtype=np.float32)
    for r0 in range(0, rows, step):
        out[r0:r0 + step] = decode(raw[r0:r0 + step])
    return out
