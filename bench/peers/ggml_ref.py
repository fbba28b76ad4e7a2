"""ggml's own block quantizers via ctypes: llama.cpp's reference encoder/decoder for golden vectors.

Run with the peer venv (bench/setup_peers.sh llamacpp), which ships libggml-base.so inside the
llama_cpp package:

    from ggml_ref import quantize_rows, dequantize_rows, row_size
    blob = quantize_rows("Q4_K", w)                     # w: float32 (rows, n_per_row)
    w_hat = dequantize_rows("Q4_K", blob, *w.shape)     # float32 (rows, n_per_row)

    bench/.venv-llamacpp/bin/python bench/peers/ggml_ref.py --self-check

C API used (vendored llama.cpp ggml/include/ggml.h, llama-cpp-python 0.3.36):
    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                               int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);
    size_t ggml_row_size(enum ggml_type type, int64_t ne);
    int64_t ggml_blck_size(enum ggml_type type);
    const char * ggml_type_name(enum ggml_type type);
    bool ggml_quantize_requires_imatrix(enum ggml_type type);
    bool ggml_validate_row_data(enum ggml_type type, const void * data, size_t nbytes);
    const struct ggml_type_traits * ggml_get_type_traits(enum ggml_type type);   // .to_float

Which encoder runs (ggml/src/ggml-quants.c): with imatrix=None every type here calls its
`quantize_row_<type>_ref` (the reference encoder, the one `gguf.quants` mirrors for the legacy
types); with an imatrix the k-quants / Q4_0..Q5_1 / IQ4_NL use the weighted `*_impl` search
(what llama-quantize --imatrix does). Q8_0, TQ1_0, TQ2_0 ignore the imatrix.
The output is the exact on-disk GGUF tensor bytes: rows are contiguous, each row
n_per_row / block_size blocks of type_size bytes, no padding.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

# enum ggml_type, copied by number from the vendored ggml.h (checked against ggml_type_name at load)
GGML_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
    "IQ4_NL": 20, "IQ4_XS": 23, "BF16": 30, "TQ1_0": 34, "TQ2_0": 35, "MXFP4": 39,
}

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h (field order and types as declared there)
    _fields_ = [("type_name", ctypes.c_char_p),
                ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def _find_lib() -> Path:
    import llama_cpp
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml.so"):
        if (lib_dir / name).is_file():
            return lib_dir / name
    raise SystemExit(f"ggml_ref: no libggml-base.so / libggml.so in {lib_dir}; run bench/setup_peers.sh llamacpp")


def _load():
    lib = ctypes.CDLL(str(_find_lib()))
    i64, sz = ctypes.c_int64, ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = sz
    lib.ggml_row_size.argtypes, lib.ggml_row_size.restype = [ctypes.c_int, i64], sz
    lib.ggml_blck_size.argtypes, lib.ggml_blck_size.restype = [ctypes.c_int], i64
    lib.ggml_type_size.argtypes, lib.ggml_type_size.restype = [ctypes.c_int], sz
    lib.ggml_type_name.argtypes, lib.ggml_type_name.restype = [ctypes.c_int], ctypes.c_char_p
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, sz]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_quantize_init.argtypes, lib.ggml_quantize_init.restype = [ctypes.c_int], None
    # the enum numbers above are ours; the library names each one, so a wrong number fails here
    for name, t in GGML_TYPES.items():
        got = lib.ggml_type_name(t).decode()
        tr = lib.ggml_get_type_traits(t).contents
        if got.upper() != name or tr.type_name.decode() != got or tr.blck_size != lib.ggml_blck_size(t) \
                or tr.type_size != lib.ggml_type_size(t):
            raise SystemExit(f"ggml_ref: enum/traits mismatch for {name}={t}: library says {got!r}")
    return lib


_lib = _load()


def _type(type_name: str) -> int:
    key = type_name.upper()
    if key not in GGML_TYPES:
        raise ValueError(f"ggml_ref: unknown ggml type {type_name!r}; known: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[key]


def block_size(type_name: str) -> int:
    """Weights per block (32 for Q4_0..Q8_0 and IQ4_NL, 256 for the k-quants and TQ*)."""
    return int(_lib.ggml_blck_size(_type(type_name)))


def row_size(type_name: str, n_per_row: int) -> int:
    """Bytes of one quantized row of n_per_row weights (ggml_row_size)."""
    return int(_lib.ggml_row_size(_type(type_name), n_per_row))


def quantize_rows(type_name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> bytes:
    """ggml_quantize_chunk over all rows of float32 x (rows, n_per_row) -> the GGUF tensor bytes.

    imatrix: optional float32 (n_per_row,) per-column importance (mean x^2 of the layer input),
    shared by every row, as llama-quantize passes it.
    """
    t = _type(type_name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"ggml_ref: x must be 2-D (rows, n_per_row), got shape {x.shape}")
    rows, n = x.shape
    blk = int(_lib.ggml_blck_size(t))
    if n % blk:  # ggml would GGML_ASSERT and abort the process
        raise ValueError(f"ggml_ref: n_per_row={n} is not a multiple of {type_name}'s block size {blk}")
    if not np.isfinite(x).all():
        raise ValueError("ggml_ref: x has NaN/inf")
    imp = None
    if imatrix is not None:
        imp = np.ascontiguousarray(imatrix, dtype=np.float32).ravel()
        if imp.shape != (n,) or not np.isfinite(imp).all():
            raise ValueError(f"ggml_ref: imatrix must be finite float32 of shape ({n},), got {imp.shape}")
    elif _lib.ggml_quantize_requires_imatrix(t):
        raise ValueError(f"ggml_ref: {type_name} requires an imatrix")
    out = np.empty(rows * int(_lib.ggml_row_size(t, n)), dtype=np.uint8)
    wrote = _lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, n,
                                     None if imp is None else imp.ctypes.data)
    if wrote != out.nbytes:
        raise RuntimeError(f"ggml_ref: ggml_quantize_chunk wrote {wrote} bytes, expected {out.nbytes}")
    return out.tobytes()


def dequantize_rows(type_name: str, data: bytes, rows: int, n_per_row: int) -> np.ndarray:
    """Decode GGUF tensor bytes with ggml's type_traits.to_float -> float32 (rows, n_per_row)."""
    t = _type(type_name)
    if n_per_row % int(_lib.ggml_blck_size(t)):
        raise ValueError(f"ggml_ref: n_per_row={n_per_row} is not a multiple of {type_name}'s block size")
    need = rows * int(_lib.ggml_row_size(t, n_per_row))
    if len(data) != need:
        raise ValueError(f"ggml_ref: {type_name} ({rows}, {n_per_row}) needs {need} bytes, got {len(data)}")
    src = np.frombuffer(data, dtype=np.uint8).copy()
    if not _lib.ggml_validate_row_data(t, src.ctypes.data, src.nbytes):
        raise ValueError(f"ggml_ref: {type_name} data fails ggml_validate_row_data (NaN/inf scales?)")
    fn = _lib.ggml_get_type_traits(t).contents.to_float
    if not fn:
        raise ValueError(f"ggml_ref: {type_name} has no to_float")
    y = np.empty((rows, n_per_row), dtype=np.float32)
    _to_float_t(fn)(src.ctypes.data, y.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * n_per_row)
    return y


def self_check(seed: int = 0) -> dict:
    """Cross-check against the gguf package's numpy codecs; returns the figures, raises on mismatch."""
    import gguf
    from gguf.quants import dequantize, quantize
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((64, 512)) * rng.uniform(0.01, 1.0, (64, 1))).astype(np.float32)
    w[0, :32] = 0.0                                             # an all-zero block
    w[1, 3] = 40.0                                              # an outlier
    res = {}
    # gguf.quants has numpy encoders for these; Q4_0 and Q8_0 must match ggml bit for bit
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"):
        ours = np.frombuffer(quantize_rows(name, w), dtype=np.uint8)
        ref = quantize(w, getattr(gguf.GGMLQuantizationType, name)).reshape(-1)
        res[f"{name}_frac_bytes_equal_gguf_quantize"] = float((ours == ref).mean())
    for name in GGML_TYPES:
        if name in ("F32", "F16", "BF16"):
            continue
        blob = quantize_rows(name, w)
        ours = dequantize_rows(name, blob, *w.shape)
        ref = dequantize(np.frombuffer(blob, dtype=np.uint8).reshape(w.shape[0], -1),
                         getattr(gguf.GGMLQuantizationType, name))
        rel = float(np.linalg.norm(ours - w) / np.linalg.norm(w))
        res[name] = {"rel_rmse": round(rel, 5), "bytes_per_row": row_size(name, w.shape[1]),
                     "decode_equals_gguf_dequantize": bool(np.array_equal(ours, ref))}
    imp = rng.uniform(0.1, 4.0, w.shape[1]).astype(np.float32)
    res["Q4_K_imatrix_differs_from_ref"] = quantize_rows("Q4_K", w, imp) != quantize_rows("Q4_K", w)
    return res


if __name__ == "__main__":
    import json
    if sys.argv[1:] != ["--self-check"]:
        raise SystemExit(__doc__)
    out = self_check()
    print(json.dumps(out, indent=1))
    bad = [k for k, v in out.items() if v is False or (isinstance(v, dict) and not v["decode_equals_gguf_dequantize"])
           or (k in ("Q4_0_frac_bytes_equal_gguf_quantize", "Q8_0_frac_bytes_equal_gguf_quantize") and v != 1.0)]
    if bad:
        raise SystemExit(f"ggml_ref self-check FAILED: {bad}")
