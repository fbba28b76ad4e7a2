"""AWQ GEMM checkpoints (quant_method "awq", version "gemm"): AutoAWQ's layout, which transformers
(AwqConfig), AutoAWQ and vLLM load.

Sources: AutoAWQ's awq/modules/linear/gemm.py (WQLinear_GEMM.from_linear: the packing) and
awq/utils/packing_utils.py (AWQ_ORDER / AWQ_REVERSE_ORDER, dequantize_gemm), transformers'
AwqConfig (utils/quantization_config.py), vLLM's layers/quantization/awq.py.

For a quantized linear L of shape (out_features, in_features) = (N, K), 4-bit codes, group g,
G = K / g groups:

    L.qweight  int32  (K, N / 8)   codes packed along the OUTPUT dim, 8 outputs per word, in
                                   AutoAWQ's interleaved order: nibble i of word j holds output
                                   8j + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
                 bit 31 ...................................... 0
                 [ o7 ][ o5 ][ o3 ][ o1 ][ o6 ][ o4 ][ o2 ][ o0 ]
    L.qzeros   int32  (G, N / 8)   zero points, same interleave; the true zero (no -1 as in GPTQ v1)
    L.scales   fp16   (G, N)
    L.bias     fp16   (N,)         if the layer has one

    w[n, k] = scales[k // g, n] * (q[k, n] - zero[k // g, n])

AWQ has no g_idx: columns map to groups as k // g, so act-order with dynamic groups (lowbit's
g_idx) cannot be written (static groups can), and g must divide K (a shorter last group has no
place: AutoWQLinear asserts in_features % group_size == 0, vLLM refuses it too). Only 4 bits,
one group size for the whole model (config.json has one), no per-channel (AutoAWQ's -1 means
one group of K, which is what we write for lowbit's per-channel schemes). Symmetric lowbit
schemes are written with their zero of 8 stored in qzeros (AWQ's formula is the same); the
reader gives asymmetric schemes back, with the same codes, scales and zeros.
Linears left in float are listed in modules_to_not_convert. Quantized embeddings are written
dequantized (_hf_quant).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.export import Format, register_format
from lowbit.export import _hf_quant as hq
from lowbit.export.common import LayerTensors, TensorFiles, empty_model, finish, place_quantized
from lowbit.numerics.packing import pack_int32, unpack_int32

FORMAT = "awq"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)         # nibble i of a word <- output 8j + ORDER[i]
BITS = 4


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """(R, N) -> (R, N) reordered so a plain low-first pack_int32 gives AutoAWQ's words."""
    r, n = x.shape
    return x.reshape(r, n // 8, 8)[:, :, list(ORDER)].reshape(r, n)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    inv = [ORDER.index(i) for i in range(8)]          # = AutoAWQ's AWQ_REVERSE_ORDER [0, 4, 1, 5, 2, 6, 3, 7]
    r, n = x.shape
    return x.reshape(r, n // 8, 8)[:, :, inv].reshape(r, n)


def _group(qw) -> int:
    s = qw.scheme
    return s.group_size if s.granularity == "group" else -1


def check_layer(name: str, qw) -> None:
    s = qw.scheme
    rows, cols = qw.shape
    native = "write --format native (holds every lowbit scheme)"
    if s.format != "int" or s.bits != BITS:
        raise LowbitError(f"awq format: layer {name} has scheme {s.short_name()}; AWQ GEMM holds 4-bit integer "
                          f"codes only; use --format gptq (2/3/4/8 bits) or {native}")
    if s.granularity not in ("group", "channel") or (s.granularity == "channel" and s.axis != 0):
        raise LowbitError(f"awq format: layer {name} has {s.granularity} granularity; AWQ holds groups along the "
                          f"input dim (or one per output channel); {native}")
    if qw.g_idx is not None:
        raise LowbitError(f"awq format: layer {name} has act-order groups (g_idx); AWQ has no g_idx (columns map "
                          "to groups as k // g); quantize with -actorder-static, or write --format gptq")
    if s.granularity == "group" and cols % s.group_size:
        raise LowbitError(f"awq format: layer {name}: group_size {s.group_size} does not divide in_features "
                          f"{cols} (last group {cols % s.group_size}); AWQ has no ragged groups. Quantize with a "
                          f"group size that divides it (e.g. g64 for {cols}) or write --format gptq")
    if rows % 8:
        raise LowbitError(f"awq format: layer {name}: out_features {rows} is not a multiple of 8 (8 codes per word)")


def pack_layer(name: str, qw) -> dict[str, torch.Tensor]:
    check_layer(name, qw)
    qweight = pack_int32(_interleave(qw.qdata.t().contiguous()), BITS, axis=1)      # (K, N/8)
    scales = hq.fp16_exact(qw.scale.t(), f"{name}.scales", "AWQ")                    # (G, N)
    zero = qw.zero_point if qw.zero_point is not None else torch.full_like(qw.scale, float(qw.scheme.sym_zero))
    zi = zero.t().round()
    if not torch.equal(zi, zero.t()) or float(zi.min()) < 0 or float(zi.max()) > 15:
        raise LowbitError(f"awq format: layer {name}: zero points are not integers in [0, 15]")
    qzeros = pack_int32(_interleave(zi.to(torch.uint8)), BITS, axis=1)              # (G, N/8)
    return {f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales}


def write(qm, out: str | os.PathLike, *, overwrite: bool = False, max_shard_size=None,
          float_dtype: str | None = None) -> Path:
    """Write a QuantizedModel as an AWQ GEMM checkpoint directory."""
    names = hq.linear_names(qm, "awq")
    groups = {}
    for n in names:
        check_layer(n, qm.qweights[n])
        groups.setdefault(_group(qm.qweights[n]), n)
    if len(groups) > 1:
        (g1, n1), (g2, n2) = list(groups.items())[:2]
        raise LowbitError(f"awq format: layers {n1} (group {g1}) and {n2} (group {g2}) differ; AWQ's config has "
                          "one group_size for the model; use --format gptq (per-layer overrides) or native")
    group = next(iter(groups))
    tensors, layers = LayerTensors(keep=not qm.lazy), {}
    rows = qm.provenance.get("layers", {})
    for n in names:
        qw = qm.qweights[n]
        tensors.add(n, lambda n=n: pack_layer(n, qm.qweights[n]))
        b = qm.bias(n)
        if b is not None:
            tensors[f"{n}.bias"] = hq.fp16_bias(b, f"{n}.bias")
        layers[n] = {"kind": "linear", "scheme": qw.scheme.short_name(), "method": rows.get(n, {}).get("method"),
                     "shape": list(qw.shape), "bits_per_weight": round(qw.bits_per_weight, 6),
                     "ragged_last_group": None, "has_g_idx": False}
    skip = hq.float_linears_in_blocks(qm, set(names))
    qconfig = {"quant_method": "awq", "bits": BITS, "group_size": group, "zero_point": True, "version": "gemm",
               "modules_to_not_convert": skip or None}
    notes = hq.embedding_notes(qm, "awq")
    if any(qm.qweights[n].scheme.symmetric for n in names):
        notes.append("awq: symmetric layers written with their zero point (8) in qzeros (zero_point true)")
    return hq.write_dir(qm, out, FORMAT, tensors, qconfig, layers, notes=notes, overwrite=overwrite,
                        max_shard_size=max_shard_size, float_dtype=float_dtype)


def unpack_layer(files, name: str, shape: tuple[int, int], group: int, where, dtype=torch.float32):
    from lowbit.numerics import int_scheme
    from lowbit.numerics.qweight import QuantizedWeight
    n_out, k_in = shape
    g = k_in if group in (-1, None) else group
    if k_in % g or n_out % 8:
        raise LowbitError(f"{where}: layer {name} of shape {shape}: AWQ needs group_size {group} to divide "
                          f"in_features and out_features to be a multiple of 8")
    n_groups = k_in // g
    qweight = hq.take(files, f"{name}.qweight", torch.int32, (k_in, n_out // 8), where)
    qzeros = hq.take(files, f"{name}.qzeros", torch.int32, (n_groups, n_out // 8), where)
    scales = hq.take(files, f"{name}.scales", torch.float16, (n_groups, n_out), where)
    if not bool(torch.isfinite(scales).all()):
        raise LowbitError(f"{where}: tensor {name}.scales contains NaN/inf")
    bias = files.get(f"{name}.bias", required=False)
    codes = _deinterleave(unpack_int32(qweight, BITS, n_out, axis=1)).t().contiguous()     # (N, K)
    zeros = _deinterleave(unpack_int32(qzeros, BITS, n_out, axis=1)).t().float().contiguous()  # (N, G)
    scheme = int_scheme(BITS, None if n_groups == 1 else g, False)
    qw = QuantizedWeight(codes, scales.float().t().contiguous(), zeros, scheme, None, {})
    return qw, (None if bias is None else bias.to(dtype))


def _params(q: dict, where) -> int:
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise LowbitError(f"{where}: AWQ version {version!r}: this lowbit reads 'gemm' (GEMV / marlin / exllama "
                          "layouts differ)")
    try:
        bits = int(q.get("bits", q.get("w_bit", 4)))
        group = int(q.get("group_size", q.get("q_group_size", 128)))
    except (TypeError, ValueError):
        raise LowbitError(f"{where}: quantization_config needs integer bits and group_size") from None
    if bits != BITS:
        raise LowbitError(f"{where}: AWQ bits {bits}: the GEMM layout holds 4-bit codes only")
    if q.get("zero_point", True) is False:
        raise LowbitError(f"{where}: AWQ zero_point false: AutoAWQ's GEMM layout always stores zeros; "
                          "this file's convention is unknown")
    if group != -1 and group <= 0:
        raise LowbitError(f"{where}: AWQ group_size {group}: expected > 0 or -1")
    return group


def detect(path: Path) -> bool:
    p = Path(path)
    if not p.is_dir():
        return False
    q, src = hq.quant_config(p, ("quant_config.json",))
    return q is not None and str(q.get("quant_method", "awq" if src.name == "quant_config.json" else "")).lower() == "awq"


def read(path: str | os.PathLike, dtype: torch.dtype = torch.float32, backend: str | None = None,
         verify_files: bool = True):
    """An AWQ GEMM checkpoint directory (ours or AutoAWQ's / a peer's) -> LoadedModel."""
    path = Path(path)
    q, src = hq.quant_config(path, ("quant_config.json",))
    if q is None:
        raise LowbitError(f"{path}: no AWQ quantization_config in config.json")
    group = _params(q, src)
    manifest = hq.manifest_of(path, verify_files)
    model = empty_model(path, dtype)
    files = TensorFiles(path)
    names = hq.quantized_modules(files)
    if not names:
        raise LowbitError(f"{path}: no *.qweight tensor in its safetensors; not an AWQ checkpoint")
    for name in names:
        shape = hq.linear_shape(model, name, path)
        qw, bias = unpack_layer(files, name, shape, group, path, dtype)
        place_quantized(model, name, qw, bias, "linear", dtype, backend, path)
        del qw
    hq.fill_float_rest(model, files, dtype, path, manifest.get("tied", {}), set(names))
    return finish(model, path, manifest, FORMAT, extra_meta={"quantization_config": q})


register_format(Format("awq", "AWQ GEMM checkpoint (AutoAWQ's layout), loaded by transformers, AutoAWQ and vLLM",
                       detect, write, read,
                       holds="int 4-bit, one group size dividing in_features (or per channel), no g_idx"))
