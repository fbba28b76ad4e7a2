"""Decode a peer checkpoint's packed weights with numpy, independently, and compare with the peer's
own dequantization (peer_check/dequant.safetensors written by load_check.py).

    bench/.venv-gptq/bin/python bench/peers/decode_check.py CKPT_DIR [--dequant CKPT/peer_check/dequant.safetensors]

Pins the layouts written down in bench/peers/README.md ("Formats as the peers write them") to the
actual bytes; prints one JSON object: per layout variant the max |diff| over all quantized
weights, so the right reading (diff ~0) and a wrong one (a step or more) are both on record.
Layouts (32-bit words, element i of a word in bits [bits*i, bits*i + bits)):
  gptq              qweight (in/8, out) packed along in; qzeros (groups, out/8) along out;
                    scales (groups, out); g_idx (in,);  W[o,i] = s[g[i],o] * (q[i,o] - z[g[i],o] - 1)
                    for checkpoint_format "gptq" (v1: zero stored minus one)
  awq (gemm)        qweight (in, out/8), qzeros (groups, out/8), both along out with nibble i of word
                    j = column 8j + [0,2,4,6,1,3,5,7][i]; W[o,i] = s[i//gs,o] * (q - z)
  compressed-tensors pack-quantized: weight_packed (out, in/8) along in, value = q + 2^(bits-1);
                    weight_zero_point (out/8, groups) along out (dim 0), same offset;
                    weight_scale (out, groups);  W = (q - zp) * scale
                    int-quantized: weight int8 (out, in) * weight_scale (out, 1)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_last(x: np.ndarray, bits: int, order=None) -> np.ndarray:
    """int32 (..., c*bits/32) -> (..., c) unsigned codes; `order` maps nibble i -> column offset."""
    per = 32 // bits
    u = x.view(np.uint32)
    codes = (u[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & ((1 << bits) - 1)
    if order is not None:
        out = np.empty_like(codes)
        out[..., order] = codes
        codes = out
    return codes.reshape(*x.shape[:-1], -1).astype(np.int64)


def load(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file
    out = {}
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        for k, v in load_file(str(f)).items():
            out[k] = v.float().numpy().astype(np.float64) if v.is_floating_point() else v.numpy()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--dequant", help="default: CKPT/peer_check/dequant.safetensors")
    args = ap.parse_args()
    ckpt = Path(args.ckpt)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    t = load(ckpt)
    ref = load(Path(args.dequant) if args.dequant else ckpt / "peer_check" / "dequant.safetensors")
    method = qc["quant_method"]
    variants: dict[str, float] = {}

    def note(name, w, key):
        variants[name] = max(variants.get(name, 0.0), float(np.abs(w - ref[key]).max()))

    info = {"checkpoint": str(ckpt), "quant_method": method}
    if method == "gptq":
        bits, gs = qc["bits"], qc["group_size"]
        info.update(bits=bits, group_size=gs, desc_act=qc.get("desc_act"),
                    checkpoint_format=qc.get("checkpoint_format", "gptq (key absent: v1)"))
        sequential = True
        for m in sorted(k[: -len(".qweight")] for k in t if k.endswith(".qweight")):
            q = unpack_last(t[m + ".qweight"].T.copy(), bits).T           # (in, out)
            z = unpack_last(t[m + ".qzeros"], bits)                        # (groups, out)
            s = t[m + ".scales"]
            g = t[m + ".g_idx"].astype(np.int64)
            sequential &= bool((g == np.arange(g.size) // gs).all())
            for off in (1, 0):
                note(f"zero = stored + {off}, groups by g_idx", ((q - z[g] - off) * s[g]).T, m + ".weight")
            note("zero = stored + 1, groups by i // group_size (ignoring g_idx)",
                 ((q - z[np.arange(g.size) // gs] - 1) * s[np.arange(g.size) // gs]).T, m + ".weight")
        info["g_idx_sequential_everywhere"] = sequential
    elif method == "awq":
        bits, gs = qc["bits"], qc["group_size"]
        info.update(bits=bits, group_size=gs, version=qc.get("version"))
        for m in sorted(k[: -len(".qweight")] for k in t if k.endswith(".qweight")):
            s = t[m + ".scales"]
            gi = np.arange(t[m + ".qweight"].shape[0]) // gs
            for name, order in (("AWQ order [0,2,4,6,1,3,5,7]", AWQ_ORDER), ("plain column order", None)):
                q = unpack_last(t[m + ".qweight"], bits, order)
                z = unpack_last(t[m + ".qzeros"], bits, order)
                note(name, ((q - z[gi]) * s[gi]).T, m + ".weight")
    elif method == "compressed-tensors":
        info["format"] = qc.get("format")
        for m in sorted(k[: -len(".weight_scale")] for k in t if k.endswith(".weight_scale")):
            s = t[m + ".weight_scale"]
            if m + ".weight_packed" in t:
                args_w = next(iter(qc["config_groups"].values()))["weights"]
                bits, gs = args_w["num_bits"], args_w["group_size"]
                off = 1 << (bits - 1)
                q = unpack_last(t[m + ".weight_packed"], bits) - off                 # (out, in)
                q = q[:, : int(t[m + ".weight_shape"][1])]
                gi = np.arange(q.shape[1]) // gs
                if m + ".weight_zero_point" in t:
                    zp = unpack_last(t[m + ".weight_zero_point"].T.copy(), bits).T - off  # (out, groups)
                    zp = zp[: q.shape[0]]
                    note("zero point packed along dim 0 (out/8, groups)", (q - zp[:, gi]) * s[:, gi], m + ".weight")
                else:
                    note("symmetric (no zero point)", q * s[:, gi], m + ".weight")
            else:
                note("int8 weight * per-channel scale", t[m + ".weight"].astype(np.float64) * s, m + ".weight")
    else:
        sys.exit(f"{ckpt}: quant_method {method!r} is not one this script decodes")
    info["max_abs_diff_vs_peer_dequant"] = variants
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
