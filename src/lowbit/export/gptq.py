"""GPTQ checkpoints: the layout AutoGPTQ wrote and transformers (optimum + GPTQModel), GPTQModel
and vLLM load (quant_method "gptq").

Sources of the layout: AutoGPTQ's auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py (pack() and
the torch forward), GPTQModel's TorchQuantLinear and its v1 <-> v2 zero conversion, transformers'
GPTQConfig (utils/quantization_config.py), vLLM's layers/quantization/gptq.py.

For a quantized linear L of shape (out_features, in_features) = (N, K), b bits, group size g,
G = ceil(K / g) groups (G = 1 per channel, g = -1):

    L.qweight  int32  (K * b / 32, N)   codes packed along the INPUT dim, per output column:
                                        word r of column n holds inputs 32r/b ... little end first
         b = 4:  bit 31 ........................................... 0
                 [ c7 ][ c6 ][ c5 ][ c4 ][ c3 ][ c2 ][ c1 ][ c0 ]     (8 codes per word)
         b = 2:  16 codes per word, b = 8: 4 per word, same order
         b = 3:  32 codes in 3 words, one 96-bit little-endian stream:
                 word0 = c10[1:0] c9 .. c0      (c10's low 2 bits in bits 30-31)
                 word1 = c21[0] c20 .. c11 c10[2]
                 word2 = c31 .. c22 c21[2:1]
    L.qzeros   int32  (G, N * b / 32)   zero points, packed the same way along the OUTPUT dim
    L.scales   fp16   (G, N)
    L.g_idx    int32  (K,)              group of each input column: c // g for static groups,
                                        GPTQ's act-order (desc_act) order otherwise
    L.bias     fp16   (N,)              if the layer has one

    w[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])

Zero-point convention (checkpoint_format): "gptq" (v1, AutoGPTQ's, what transformers and vLLM
read by default) stores zero - 1 (loaders add 1 back); "gptq_v2" (GPTQModel) stores the zero
itself. v1 cannot hold a zero of 0 (its -1 wraps to 2^b - 1, read back as 2^b): the writer
refuses such a layer naming it and points to gptq_v2. Symmetric files store 2^(b-1) - 1 (v1) or
2^(b-1) (v2) everywhere (lowbit's symmetric zero is 2^(b-1)).

The reader converts both conventions and refuses what it cannot tell apart: a symmetric file
whose zeros are neither all 2^(b-1) - 1 nor all 2^(b-1), a label that disagrees with the zeros,
and a v1 (or unlabelled) asymmetric file with stored zeros of 2^b - 1 (a wrapped zero of 0, or an
unlabelled v2 file: either way not what was quantized).

Groups: G = ceil(K / g), so a shorter last group (SmolLM2's 576 = 4 * 128 + 64 at g128) is
expressed by g_idx; AutoGPTQ's QuantLinear and GPTQModel size qzeros/scales with ceil and index
them through g_idx, so they load it; vLLM (gptq and gptq_marlin) requires g to divide K and
refuses such a file (write g64 / g32 for vLLM). K and N must be multiples of 32 (loaders size
qweight as K // 32 * b and qzeros as N // 32 * b).

Mixed recipes: the most common (bits, group_size, sym) goes in quantization_config, other layers
get GPTQModel's `dynamic` overrides ("+:^name$": {bits, group_size, sym}), and linears left in
float get "-:^name$". transformers' optimum path and vLLM honour `dynamic` only in recent
versions; a uniform recipe needs none.

lowbit schemes GPTQ cannot hold (refused naming the tensor): per-tensor or block granularity,
codebook / float formats (nf4, fp4, ternary, fp8, ggml types), bit widths other than 2, 3, 4, 8,
scales that are not float16 numbers. Quantized embeddings are written dequantized (_hf_quant).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.export import Format, register_format
from lowbit.export import _hf_quant as hq
from lowbit.export.common import LayerTensors, TensorFiles, empty_model, finish, place_quantized
from lowbit.numerics.packing import pack_int32, unpack_int32

FORMAT = "gptq"
V1, V2 = "gptq", "gptq_v2"
BITS = (2, 3, 4, 8)
EXTRA = "quantize_config.json"


# ---- writing ---------------------------------------------------------------------------------------
def _layer_params(qw) -> tuple[int, int, bool]:
    """(bits, group_size, sym) in GPTQ's terms (group_size -1 = per output channel)."""
    s = qw.scheme
    return s.bits, (s.group_size if s.granularity == "group" else -1), bool(s.symmetric)


def check_layer(name: str, qw) -> None:
    s = qw.scheme
    rows, cols = qw.shape
    fallback = "write --format native (holds every lowbit scheme)"
    if s.format != "int":
        raise LowbitError(f"gptq format: layer {name} has scheme {s.short_name()} (format {s.format}); GPTQ "
                          f"holds integer codes only; {fallback}, or --format gguf for ggml types")
    if s.bits not in BITS:
        raise LowbitError(f"gptq format: layer {name} has {s.bits}-bit codes; GPTQ holds {BITS} bits; {fallback}")
    if s.granularity not in ("group", "channel") or (s.granularity == "channel" and s.axis != 0):
        raise LowbitError(f"gptq format: layer {name} has {s.granularity} granularity ({s.short_name()}); GPTQ "
                          f"holds groups along the input dim or one scale per output channel; {fallback}")
    if rows % 32 or cols % 32:
        raise LowbitError(f"gptq format: layer {name} has shape {(rows, cols)}; GPTQ loaders need in_features and "
                          f"out_features to be multiples of 32 (they size qweight as in // 32 * bits); {fallback}")


def pack_layer(name: str, qw, checkpoint_format: str = V1) -> dict[str, torch.Tensor]:
    """One QuantizedWeight -> {name.qweight, name.qzeros, name.scales, name.g_idx} (module docstring)."""
    check_layer(name, qw)
    bits, g, sym = _layer_params(qw)
    rows, cols = qw.shape
    qweight = pack_int32(qw.qdata.t().contiguous(), bits, axis=0)           # (K*b/32, N)
    scales = hq.fp16_exact(qw.scale.t(), f"{name}.scales", "GPTQ")           # (G, N)
    zero = qw.zero_point if qw.zero_point is not None else torch.full_like(qw.scale, float(qw.scheme.sym_zero))
    zero = zero.t()
    zi = zero.round()
    if not torch.equal(zi, zero) or float(zi.min()) < 0 or float(zi.max()) > qw.scheme.qmax:
        raise LowbitError(f"gptq format: layer {name} has zero points that are not integers in "
                          f"[0, {qw.scheme.qmax}]; GPTQ stores integer zeros; write --format native")
    zi = zi.to(torch.int64)
    if checkpoint_format == V1:
        if bool((zi == 0).any()):
            n = int((zi == 0).sum())
            grp, col = (int(v) for v in (zi == 0).nonzero()[0])
            raise LowbitError(f"gptq format: tensor {name}.qzeros: {n} group(s) have a zero point of 0 (e.g. "
                              f"output row {col}, group {grp}), which GPTQ v1 (checkpoint_format 'gptq', stored "
                              "zero - 1) cannot hold; write checkpoint_format 'gptq_v2' (--format gptq_v2; "
                              "GPTQModel loads it) or --format native")
        zi = zi - 1
    qzeros = pack_int32(zi.to(torch.uint8), bits, axis=1)                    # (G, N*b/32)
    if qw.g_idx is not None:
        g_idx = qw.g_idx.to(torch.int32).contiguous()
    elif g == -1:
        g_idx = torch.zeros(cols, dtype=torch.int32)
    else:
        g_idx = (torch.arange(cols) // g).to(torch.int32)
    return {f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales,
            f"{name}.g_idx": g_idx}


def _recipe_arg(qm, key: str, default):
    for r in getattr(qm.recipe, "rules", None) or []:
        if r.scheme is not None and r.method == "gptq" and key in r.method_args:
            return r.method_args[key]
    return default


def write(qm, out: str | os.PathLike, *, overwrite: bool = False, max_shard_size=None,
          checkpoint_format: str = V1, float_dtype: str | None = None) -> Path:
    """Write a QuantizedModel as a GPTQ checkpoint directory (v1 zeros unless checkpoint_format
    'gptq_v2'). float_dtype: the non-quantized tensors' dtype (default: the model's own)."""
    if checkpoint_format not in (V1, V2):
        raise LowbitError(f"gptq checkpoint_format {checkpoint_format!r}: expected 'gptq' (v1) or 'gptq_v2'")
    names = hq.linear_names(qm, "gptq")
    # the most common (bits, group, sym) by weight count is the file's default; others go in dynamic
    weight = Counter()
    for n in names:
        qw = qm.qweights[n]
        check_layer(n, qw)
        weight[_layer_params(qw)] += qw.qdata.numel()
    default = max(weight, key=lambda k: weight[k])     # ties: first seen (Counter keeps insertion order)
    tensors = LayerTensors(keep=not qm.lazy)
    layers, dynamic = {}, {}
    rows = qm.provenance.get("layers", {})
    desc_act = False
    for n in names:
        qw = qm.qweights[n]
        tensors.add(n, lambda n=n: pack_layer(n, qm.qweights[n], checkpoint_format))
        b = qm.bias(n)
        if b is not None:
            tensors[f"{n}.bias"] = hq.fp16_bias(b, f"{n}.bias")
        p = _layer_params(qw)
        if p != default:
            dynamic[f"+:{hq.module_regex(n)}"] = {"bits": p[0], "group_size": p[1], "sym": p[2]}
        desc_act |= qw.g_idx is not None
        layers[n] = {"kind": "linear", "scheme": qw.scheme.short_name(), "method": rows.get(n, {}).get("method"),
                     "shape": list(qw.shape), "bits_per_weight": round(qw.bits_per_weight, 6),
                     "ragged_last_group": qw.ragged_last_group, "has_g_idx": qw.g_idx is not None}
    for n in hq.float_linears_in_blocks(qm, set(names)):
        if n != "lm_head":                       # loaders never convert lm_head unless told to
            dynamic[f"-:{hq.module_regex(n)}"] = {}
    import lowbit
    calib = qm.provenance.get("calibration", {})
    bits, group, sym = default
    qconfig = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
               "true_sequential": bool(calib.get("true_sequential", True)),
               "damp_percent": float(_recipe_arg(qm, "damp_percent", 0.01)) or 0.01,
               "static_groups": bool(_recipe_arg(qm, "static_groups", False)),
               "checkpoint_format": checkpoint_format, "format": checkpoint_format,
               "lm_head": "lm_head" in names, "meta": {"quantizer": [f"lowbit:{lowbit.__version__}"]}}
    if dynamic:
        qconfig["dynamic"] = dynamic
    notes = hq.embedding_notes(qm, "gptq")
    ragged = [n for n in names if qm.qweights[n].ragged_last_group]
    if ragged:
        notes.append(f"gptq: {len(ragged)} layer(s) end in a shorter group (e.g. {ragged[0]}); transformers/"
                     "GPTQModel load it (ceil groups, g_idx), vLLM refuses it (needs group_size | in_features)")
    extra = {EXTRA: {k: qconfig[k] for k in qconfig if k not in ("dynamic",)} | (
        {"dynamic": dynamic} if dynamic else {})}
    return hq.write_dir(qm, out, FORMAT if checkpoint_format == V1 else V2, tensors, qconfig, layers,
                        notes=notes, extra_json=extra, overwrite=overwrite, max_shard_size=max_shard_size,
                        float_dtype=float_dtype)


def write_v2(qm, out, **opts) -> Path:
    opts.setdefault("checkpoint_format", V2)
    return write(qm, out, **opts)


# ---- reading -----------------------------------------------------------------------------------------
def _true_zeros(stored: torch.Tensor, bits: int, sym: bool, label: str | None, key: str, where) -> tuple[torch.Tensor, str]:
    """Stored zeros (G, N) -> true zeros, by the file's convention; refuses an ambiguous one."""
    mid = 1 << (bits - 1)
    top = (1 << bits) - 1
    if sym:
        v1, v2 = bool((stored == mid - 1).all()), bool((stored == mid).all())
        seen = sorted({int(v) for v in stored.unique()[:6]})
        conv = V1 if v1 else V2 if v2 else None
        if conv is None or (label is not None and label != conv):
            what = (f"checkpoint_format {label!r} expects {mid - 1 if label == V1 else mid}" if label
                    else f"no checkpoint_format in the config, and they are neither all {mid - 1} (v1) nor all {mid} (v2)")
            raise LowbitError(f"{where}: tensor {key}: sym=True but the stored zeros are {seen}...; {what}. "
                              "The zero-point convention is ambiguous; refusing to load weights that may be wrong "
                              "(set quantization_config.checkpoint_format / sym to what the writer used)")
        return torch.full_like(stored, mid), conv
    conv = label or V1              # transformers, AutoGPTQ and vLLM read an unlabelled file as v1
    if conv == V1:
        if bool((stored == top).any()):
            raise LowbitError(f"{where}: tensor {key}: a stored zero of {top} under the v1 convention means a true "
                              f"zero of {top + 1}, outside the {bits}-bit code range: a zero of 0 wrapped by a v1 "
                              f"writer, or a gptq_v2 file not labelled so (checkpoint_format "
                              f"{'absent' if label is None else repr(label)}); ambiguous, refusing to load it")
        return stored + 1, conv
    return stored, conv


def unpack_layer(files, name: str, shape: tuple[int, int], params: dict, where, dtype=torch.float32):
    """Read one layer's tensors -> (QuantizedWeight, bias, convention)."""
    from lowbit.numerics import int_scheme
    from lowbit.numerics.qweight import QuantizedWeight
    bits, g, sym, label = params["bits"], params["group_size"], params["sym"], params["format"]
    n_out, k_in = shape
    if bits not in BITS:
        raise LowbitError(f"{where}: layer {name}: bits {bits!r} in the quantization config; GPTQ has {BITS}")
    if k_in % 32 or n_out % 32:
        raise LowbitError(f"{where}: layer {name} has shape {shape}; GPTQ needs multiples of 32")
    n_groups = 1 if g in (-1, None) or g >= k_in else -(-k_in // g)
    qweight = files.get(f"{name}.qweight")
    want = (k_in * bits // 32, n_out)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != want:
        hint = ""
        if qweight.dtype == torch.int32 and qweight.dim() == 2 and qweight.shape[1] == n_out and \
                (qweight.shape[0] * 32) % k_in == 0:
            hint = f" (that is {qweight.shape[0] * 32 // k_in}-bit codes: the config's bits {bits} is wrong)"
        raise LowbitError(f"{where}: tensor {name}.qweight: expected int32 {want} for {bits}-bit codes of a "
                          f"{shape} layer, got {str(qweight.dtype).replace('torch.', '')} {tuple(qweight.shape)}{hint}")
    qzeros = hq.take(files, f"{name}.qzeros", torch.int32, (n_groups, n_out * bits // 32), where)
    scales = hq.take(files, f"{name}.scales", torch.float16, (n_groups, n_out), where)
    g_idx = files.get(f"{name}.g_idx", required=False)
    bias = files.get(f"{name}.bias", required=False)
    if not bool(torch.isfinite(scales).all()):
        raise LowbitError(f"{where}: tensor {name}.scales contains NaN/inf")
    codes = unpack_int32(qweight, bits, k_in, axis=0).t().contiguous()          # (N, K)
    stored = unpack_int32(qzeros, bits, n_out, axis=1).to(torch.int64)          # (G, N)
    zeros, conv = _true_zeros(stored, bits, sym, label, f"{name}.qzeros", where)
    static = (torch.arange(k_in) // (g if n_groups > 1 else k_in)).to(torch.int32)
    if g_idx is not None:
        if g_idx.dtype not in (torch.int32, torch.int64) or tuple(g_idx.shape) != (k_in,):
            raise LowbitError(f"{where}: tensor {name}.g_idx: expected int32 ({k_in},), got "
                              f"{str(g_idx.dtype).replace('torch.', '')} {tuple(g_idx.shape)}")
        g_idx = g_idx.to(torch.int32)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise LowbitError(f"{where}: tensor {name}.g_idx has groups outside [0, {n_groups})")
        if torch.equal(g_idx, static):
            g_idx = None
        elif n_groups == 1:
            raise LowbitError(f"{where}: tensor {name}.g_idx: per-channel layer with non-zero groups")
    scheme = int_scheme(bits, None if n_groups == 1 and g in (-1, None) else g, sym)
    if scheme.granularity == "group" and scheme.n_groups(k_in) != n_groups:
        scheme = int_scheme(bits, None, sym)       # group_size >= in_features: one group = per channel
    qw = QuantizedWeight(codes, scales.float().t().contiguous(), zeros.t().float().contiguous(), scheme, g_idx,
                         {"gptq_checkpoint_format": conv})
    if bias is not None:
        bias = bias.to(dtype)
    return qw, bias, conv


def _global_params(q: dict, where) -> dict:
    label = q.get("checkpoint_format", None)
    fmt2 = q.get("format", None)
    if label is not None and fmt2 is not None and str(label).lower() != str(fmt2).lower():
        raise LowbitError(f"{where}: quantization_config says checkpoint_format {label!r} but format {fmt2!r}")
    label = label if label is not None else fmt2
    if label is not None:
        label = str(label).lower()
        if label not in (V1, V2):
            raise LowbitError(f"{where}: checkpoint_format {label!r}: this lowbit reads 'gptq' (v1) and 'gptq_v2' "
                              "(repack marlin / bitblas / ipex files to gptq with GPTQModel first)")
    try:
        bits = int(q.get("bits", q.get("w_bit")))
        group = int(q.get("group_size", q.get("q_group_size", 128)))
    except (TypeError, ValueError):
        raise LowbitError(f"{where}: quantization_config needs integer 'bits' and 'group_size', got "
                          f"bits={q.get('bits')!r}, group_size={q.get('group_size')!r}") from None
    if bits not in BITS:
        raise LowbitError(f"{where}: quantization_config bits {bits}: GPTQ has {BITS}")
    if group != -1 and group <= 0:
        raise LowbitError(f"{where}: quantization_config group_size {group}: expected > 0 or -1 (per channel)")
    dyn = q.get("dynamic")
    if dyn is not None and not isinstance(dyn, dict):
        raise LowbitError(f"{where}: quantization_config.dynamic: expected an object, got {type(dyn).__name__}")
    return {"bits": bits, "group_size": group, "sym": bool(q.get("sym", True)), "format": label,
            "dynamic": dyn or {}}


def detect(path: Path) -> bool:
    p = Path(path)
    if not p.is_dir():
        return False
    q, src = hq.quant_config(p, (EXTRA,))
    if q is None:
        return False
    method = str(q.get("quant_method", "gptq" if src.name == EXTRA else "")).lower()
    return method == "gptq"


def read(path: str | os.PathLike, dtype: torch.dtype = torch.float32, backend: str | None = None,
         verify_files: bool = True):
    """A GPTQ checkpoint directory (ours or a peer's, v1 or v2 zeros) -> LoadedModel with
    QuantLinear modules (PackedLinear kernels with backend=)."""
    path = Path(path)
    q, src = hq.quant_config(path, (EXTRA,))
    if q is None:
        raise LowbitError(f"{path}: no quantization_config in config.json and no {EXTRA}; not a GPTQ checkpoint")
    if src.name == "config.json" and not ({"checkpoint_format", "format"} & set(q)) and (path / EXTRA).is_file():
        try:                                     # AutoGPTQ / GPTQModel keep the label in quantize_config.json
            side = hq.read_json(path / EXTRA, EXTRA)
        except LowbitError:
            side = {}
        q = {**q, **{k: side[k] for k in ("checkpoint_format", "format") if k in side}}
    base = _global_params(q, src)
    manifest = hq.manifest_of(path, verify_files)
    model = empty_model(path, dtype)
    files = TensorFiles(path)
    names = hq.quantized_modules(files)
    if not names:
        raise LowbitError(f"{path}: no *.qweight tensor in its safetensors; not a GPTQ checkpoint")
    convs = Counter()
    for name in names:
        over = hq.dynamic_rule(base["dynamic"], name)
        if over is None:
            raise LowbitError(f"{path}: tensor {name}.qweight, but quantization_config.dynamic keeps {name} in float")
        params = {**base, **{k: over[k] for k in ("bits", "group_size", "sym") if k in over}}
        shape = hq.linear_shape(model, name, path)
        qw, bias, conv = unpack_layer(files, name, shape, params, path, dtype)
        convs[conv] += 1
        place_quantized(model, name, qw, bias, "linear", dtype, backend, path)
        del qw
    hq.fill_float_rest(model, files, dtype, path, manifest.get("tied", {}), set(names))
    notes = [] if base["format"] else [f"no checkpoint_format in the config: zeros read as {dict(convs)}"]
    return finish(model, path, manifest, FORMAT,
                  extra_meta={"quantization_config": q, "checkpoint_format": dict(convs), "notes": notes})


register_format(Format("gptq", "GPTQ checkpoint (AutoGPTQ v1 zeros), loaded by transformers/optimum + "
                       "GPTQModel and vLLM", detect, write, read,
                       holds="int 2/3/4/8-bit, groups (ragged via g_idx) or per channel, act-order g_idx, "
                             "sym or asym (v1: no zero of 0)"))
register_format(Format("gptq_v2", "GPTQ checkpoint with true zeros (GPTQModel's gptq_v2); read by the 'gptq' "
                       "reader", lambda p: False, write_v2, None,
                       holds="as gptq, zero points of 0 included"))
