"""compressed-tensors checkpoints: what llm-compressor writes and vLLM / transformers load natively.

    DIR/
      config.json             the source config + "quantization_config" (below)
      tokenizer*.json, ...    the source's tokenizer files
      model.safetensors       (or transformers' shards + model.safetensors.index.json)
      lowbit_manifest.json    lowbit's manifest (provenance, sha256 of every file); peers ignore it

Tensors of a quantized linear L (rows = out_features, cols = in_features), by format; the bit
layout of the packed int32 tensors is drawn in lowbit.export.ct_layout:

    pack-quantized  (int weights 1-8 bit, no activation quantization: W4A16, W8A16, ...)
      L.weight_packed      int32  (rows, ceil(cols*b/32))   unsigned codes, packed along dim 1
      L.weight_scale       fp16   (rows, groups) | (rows, 1) | (1,) | (row blocks, col blocks)
      L.weight_zero_point  int32  (ceil(rows*b/32), groups)  asymmetric group/channel only:
                                                      unsigned zero points packed along dim 0
                           int8   scale's shape            asymmetric tensor/block: z - 2^(b-1)
      L.weight_shape       int64  [rows, cols]
      L.weight_g_idx       int32  (cols,)  only in legacy actorder="group" files (read; written
                                           only on request, see below)
    int-quantized (int weights with int8 activations: W8A8), naive-quantized (fp8 weight-only),
    float-quantized (fp8 weights with fp8 activations)
      L.weight             int8 signed codes q - 2^(b-1)  |  float8_e4m3fn
      L.weight_scale       as above;  L.weight_zero_point  int8 (asymmetric int only)

    x_hat = (q - z) * s per group, exactly lowbit's QuantizedWeight.dequantize (numerics/affine).

config.json quantization_config (compressed-tensors 0.19.0 QuantizationConfig.model_dump, the
keys llm-compressor's ModelCompressor.update_config writes):

    {"quant_method": "compressed-tensors", "format": "pack-quantized" | ... | "mixed-precision",
     "quantization_status": "compressed", "version": "0.19.0", "sparsity_config": {},
     "transform_config": {}, "kv_cache_scheme": null, "global_compression_ratio": null,
     "ignore": ["lm_head", ...float linears],
     "config_groups": {"group_0": {"targets": ["Linear"] | ["re:^(?:a|b)$"], "format": ...,
         "weights": {num_bits, type, symmetric, group_size, strategy, block_structure,
                     dynamic, actorder, observer, observer_kwargs},
         "input_activations": null | {...}, "output_activations": null}}}

A recipe with several schemes gives one group per scheme: the largest targets "Linear", each
other one an anchored regex of its exact module names (compressed-tensors ranks exact names and
regexes above class names, so no module is claimed twice); float linears go in "ignore".

What this format cannot hold (refused on write, naming the layer and the fallback):
  * a group size that does not divide the row (SmolLM2's 576 columns at g128): compressed-
    tensors' dequantize raises "tensor column shape must be divisible by the given group_size"
    (lifecycle/forward_helpers.py _process_group); use g64 (576 = 9 x 64) or --format gptq;
  * a dynamic act-order g_idx (GPTQ desc_act): compressed-tensors removed actorder="group"
    (quant_args.py refuses it); use the -actorder-static recipe (stored as actorder "weight",
    no g_idx) or --format gptq. write(..., legacy_g_idx=True) writes the old layout for older
    loaders (vLLM with compressed-tensors < 0.19);
  * codebook formats (nf4, fp4, ternary), fp8 e5m2, ggml block formats, quantized embeddings.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.export import Format, register_format
from lowbit.export import ct_layout as L
from lowbit.export.common import (LayerTensors, TensorFiles, copy_model_files, empty_model, finish, float_tensors,
                                  output_dir, place_quantized, retie, save_safetensors, scale_for_file,
                                  set_tensor, source_config, tie_by_config)
from lowbit.export.manifest import FOREIGN, provenance, read_if_present, read_json, write_manifest

FORMAT = "compressed-tensors"
CT_VERSION = "0.19.0"          # the compressed-tensors release whose layout this follows
QPARAM_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


# ---------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------
def _refuse(name: str, why: str) -> LowbitError:
    return LowbitError(f"compressed-tensors format: layer {name}: {why}")


def _actorder(name: str, qw, legacy_g_idx: bool) -> tuple[str | None, torch.Tensor | None]:
    """-> (actorder string, g_idx to store). A g_idx that is the plain c // g order is dropped."""
    act = bool(qw.info.get("act_order"))
    if qw.g_idx is None:
        return ("weight" if act else None), None
    cols = qw.shape[1]
    plain = (torch.arange(cols) // qw.scheme.group_size).to(torch.int32)
    if torch.equal(qw.g_idx.to(torch.int32), plain):
        return ("weight" if act else None), None
    if not legacy_g_idx:
        raise _refuse(name, "has a dynamic act-order g_idx (GPTQ desc_act); compressed-tensors 0.19 "
                      "removed actorder='group', so its loaders would not read weight_g_idx. Use a "
                      "static-groups recipe (e.g. w4g64-gptq-actorder-static, stored as actorder "
                      "'weight') or --format gptq; legacy_g_idx=True writes the old layout")
    return "group", qw.g_idx.to(torch.int32).contiguous()


def _check_writable(name: str, qw, kind: str) -> None:
    s = qw.scheme
    if kind != "linear":
        raise _refuse(name, "is a quantized embedding; compressed-tensors loaders (vLLM) quantize "
                      "linears only. Keep embeddings in float, or use --format native / gguf")
    if s.format not in ("int", "fp8_e4m3"):
        raise _refuse(name, f"scheme {s.short_name()} (format {s.format}) has no compressed-tensors "
                      "spelling (it holds int 1-8 bit and fp8 e4m3); use --format native")
    if s.granularity == "channel" and s.axis not in (0, -2):
        raise _refuse(name, "per-input-column scales (axis 1) are not a compressed-tensors strategy")
    if s.granularity == "group" and qw.shape[1] % s.group_size:
        raise _refuse(name, f"group_size {s.group_size} does not divide its {qw.shape[1]} input "
                      f"columns (ragged last group of {qw.shape[1] % s.group_size}); compressed-tensors' "
                      "dequantize requires whole groups. Use a group size that divides it (g64 for "
                      "576) or --format gptq / native, which hold ragged groups")
    if s.format == "int":
        z = qw.zero_point
        if z is None or not torch.equal(z, z.round()) or float(z.min()) < 0 or float(z.max()) > s.qmax:
            raise _refuse(name, f"int scheme needs integer zero points in [0, {s.qmax}]")
        if s.symmetric and not bool((z == s.sym_zero).all()):
            raise _refuse(name, f"symmetric scheme with zero points other than {s.sym_zero}")


def _scale_tensor(scale: torch.Tensor, strategy: str) -> torch.Tensor:
    """The file's scales (export.common.scale_for_file); one value for per-tensor."""
    s, _ = scale_for_file(scale)
    return s.reshape(1) if strategy == "tensor" else s


def _layer_tensors(name: str, qw, wargs: dict, fmt: str, g_idx) -> dict[str, torch.Tensor]:
    s, bits, off = qw.scheme, wargs["num_bits"], 1 << (wargs["num_bits"] - 1)
    t: dict[str, torch.Tensor] = {f"{name}.weight_scale": _scale_tensor(qw.scale, wargs["strategy"])}
    if fmt == L.PACK:
        t[f"{name}.weight_packed"] = L.pack(qw.qdata, bits, axis=1)
        t[f"{name}.weight_shape"] = torch.tensor(list(qw.shape), dtype=torch.int64)
    elif s.format == "int":
        t[f"{name}.weight"] = (qw.qdata.to(torch.int16) - off).to(torch.int8)
    else:
        t[f"{name}.weight"] = qw.qdata.contiguous().view(torch.float8_e4m3fn)
    if s.format == "int" and not s.symmetric:
        z = qw.zero_point.round().to(torch.int16)
        if fmt == L.PACK and wargs["strategy"] in L.PACKED_ZP:
            t[f"{name}.weight_zero_point"] = L.pack(z.to(torch.uint8), bits, axis=0)
        else:
            zs = (z - off).to(torch.int8)
            t[f"{name}.weight_zero_point"] = zs.reshape(1) if wargs["strategy"] == "tensor" else zs
    if g_idx is not None:
        t[f"{name}.weight_g_idx"] = g_idx
    return t


def _targets(names: list[str]) -> list[str]:
    """One anchored regex matching exactly these module names (re.match, as compressed-tensors)."""
    return ["re:^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"]


def quantization_config(groups: list[tuple[dict, dict | None, str, list[str]]], ignore: list[str]) -> dict:
    """config.json's quantization_config. groups: (weights args, input_activations args or None,
    format, module names); the largest group targets "Linear" and goes last (the model-free
    dequantizer takes groups in order, and "Linear" would claim every module)."""
    order = sorted(range(len(groups)), key=lambda i: (len(groups[i][3]), -i))   # largest last
    cgroups, formats = {}, set()
    for k, i in enumerate(order):
        w, a, fmt, names = groups[i]
        formats.add(fmt)
        cgroups[f"group_{k}"] = {"targets": ["Linear"] if k == len(order) - 1 else _targets(names),
                                 "weights": w, "input_activations": a, "output_activations": None,
                                 "format": fmt}
    return {"quant_method": FORMAT, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "version": CT_VERSION, "config_groups": cgroups,
            "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}}


def write(qm, out: str | os.PathLike, *, overwrite: bool = False, max_shard_size=None,
          input_activations: dict | None = None, legacy_g_idx: bool = False) -> Path:
    """Write a QuantizedModel as a compressed-tensors checkpoint. input_activations: a
    QuantizationArgs dict (e.g. {"num_bits": 8, "type": "int", "strategy": "token",
    "dynamic": True}) recorded for every group (W8A8; weights then int-/float-quantized);
    default: the recipe's activation settings if it carries any, else weight-only."""
    from lowbit.export.ct_activations import recipe_activation_args
    act_scales: dict = {}
    if input_activations is None:
        input_activations, act_scales = recipe_activation_args(qm)
    aargs = L.activation_args(input_activations, static_ok=bool(act_scales))
    by_args: dict[str, tuple[dict, str, list[str]]] = {}
    tensors = LayerTensors(keep=not qm.lazy)
    layers: dict[str, dict] = {}
    rows = qm.provenance.get("layers", {})
    for name, qw in qm.qweights.items():
        _check_writable(name, qw, qm.kinds[name])
        act, g_idx = _actorder(name, qw, legacy_g_idx)
        wargs = L.weight_args(qw.scheme, act)
        fmt = L.module_format(wargs, aargs)
        tensors.add(name, lambda n=name, w=wargs, f=fmt: _layer_tensors(
            n, qm.qweights[n], w, f, _actorder(n, qm.qweights[n], legacy_g_idx)[1]))
        bias = qm.bias(name)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.contiguous()
        key = json.dumps([wargs, fmt], sort_keys=True)
        by_args.setdefault(key, (wargs, fmt, []))[2].append(name)
        layers[name] = {"kind": "linear", "scheme": qw.scheme.to_dict(), "method": rows.get(name, {}).get("method"),
                        "shape": list(qw.shape), "ct_format": fmt, "ct_bits": wargs["num_bits"],
                        "bits_per_weight": round(qw.bits_per_weight, 6), "has_g_idx": g_idx is not None,
                        "info": {k: v for k, v in sorted(qw.info.items()) if isinstance(v, (bool, int, float, str))}}
    tensors.update(act_scales)                   # static W8A8: one calibrated input_scale per layer
    floats, tied = float_tensors(qm.model, set(layers))
    clash = sorted(set(floats) & set(tensors))
    if clash:
        raise LowbitError(f"compressed-tensors format: tensor {clash[0]} would be written twice")
    tensors.update(floats)
    ignore = [n for n, m in qm.model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    groups = [(w, aargs, fmt, names) for w, fmt, names in by_args.values()]
    cfg = source_config(qm)
    cfg["quantization_config"] = quantization_config(groups, ignore)
    manifest = provenance(qm, FORMAT, layers, {"tied": tied, "ct_version": CT_VERSION})
    with output_dir(out, overwrite) as tmp:
        save_safetensors(tensors, tmp, max_shard_size)
        copy_model_files(qm.source_dir, tmp, cfg)
        write_manifest(tmp, manifest, FOREIGN)
    return Path(out)


# ---------------------------------------------------------------------------------------------
# read
# ---------------------------------------------------------------------------------------------
def _qconfig(path: Path) -> dict:
    cfg = read_json(path / "config.json", "config.json")
    q = cfg.get("quantization_config") or cfg.get("compression_config")
    if not isinstance(q, dict) or q.get("quant_method") != FORMAT:
        raise LowbitError(f"{path / 'config.json'}: no quantization_config with quant_method "
                          f"'{FORMAT}' (found {None if not isinstance(q, dict) else q.get('quant_method')!r})")
    return q


def detect(path: Path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        q = json.loads(p.read_text()).get("quantization_config") or {}
        return isinstance(q, dict) and q.get("quant_method") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _plan(q: dict, where: Path, activations: str) -> tuple[list, list[str]]:
    """config_groups -> [(targets, Scheme, format, actorder)], ignore; refusals name config.json."""
    cfgp = where / "config.json"
    status = q.get("quantization_status", "compressed")
    if status != "compressed":
        raise LowbitError(f"{cfgp}: quantization_status {status!r}; lowbit reads compressed checkpoints "
                          "(a 'frozen'/'dense' one holds float weights: load it as a float model)")
    for key, what in (("sparsity_config", "sparsity"), ("transform_config", "transforms (rotations)")):
        if q.get(key):
            raise LowbitError(f"{cfgp}: quantization_config.{key} is set ({what}); lowbit does not read "
                              f"{what} in compressed-tensors checkpoints")
    if q.get("kv_cache_scheme"):
        raise LowbitError(f"{cfgp}: kv_cache_scheme is set (a quantized KV cache); lowbit runs the KV "
                          "cache in float and would not reproduce this model")
    top = q.get("format")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise LowbitError(f"{cfgp}: quantization_config.config_groups is missing or empty")
    plan = []
    for gname, g in groups.items():
        where_g = f"{cfgp}: config_groups.{gname}"
        if not isinstance(g, dict) or not isinstance(g.get("targets"), list):
            raise LowbitError(f"{where_g}: expected a scheme with a 'targets' list (preset names are not read)")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise LowbitError(f"{where_g}: no weight quantization (activation-only schemes are not read)")
        a = g.get("input_activations")
        if g.get("output_activations"):
            raise LowbitError(f"{where_g}: output_activations quantization is not something lowbit runs")
        if a is not None and not isinstance(a, dict):
            raise LowbitError(f"{where_g}: input_activations: expected null or a dict of QuantizationArgs, "
                              f"got {type(a).__name__}")
        act = act_scheme_from_args(a, where_g) if a and activations == "run" else None
        fmt = g.get("format") or (top if top not in (None, "mixed-precision") else L.infer_format(w, a))
        if fmt not in L.READABLE_FORMATS:
            raise LowbitError(f"{where_g}: format {fmt!r}; lowbit reads {', '.join(L.READABLE_FORMATS)} "
                              "(not nvfp4/mxfp4/mxfp8 packing, sparse-bitmask, marlin-24 or dense)")
        plan.append((list(g["targets"]), L.scheme_from_args(w, where_g), fmt, w.get("actorder"), act))
    ignore = q.get("ignore") or []
    return plan, list(ignore)


def act_scheme_from_args(a: dict, where: str):
    """input_activations QuantizationArgs -> the ActScheme lowbit runs (nn/actquant.py): 8-bit int
    or fp8, symmetric, dynamic per token or per tensor, or static per tensor (input_scale tensors).
    Anything else is refused, naming the group; read(..., activations="float") loads the weights."""
    from lowbit.numerics.activation import ActScheme
    typ, bits, strat = a.get("type", "int"), a.get("num_bits", 8), a.get("strategy")
    dyn, sym = a.get("dynamic", True), a.get("symmetric", True)
    what = f"{where}: input_activations {typ}{bits} {strat} (dynamic={dyn}, symmetric={sym})"
    if bits != 8 or typ not in ("int", "float") or sym is not True or strat not in ("token", "tensor") \
            or dyn not in (True, False) or (strat == "token" and dyn is not True) or a.get("group_size"):
        raise LowbitError(f"{what}: lowbit runs 8-bit symmetric int/fp8 activations, dynamic per token or "
                          "per tensor, or static per tensor; read(..., activations='float') loads this "
                          "model's weights exactly and runs its activations unquantized")
    return ActScheme(format="int8" if typ == "int" else "fp8_e4m3", dynamic=bool(dyn), granularity=strat)


def _attach_act(model: nn.Module, files: TensorFiles, name: str, act, where: Path) -> None:
    import math

    from lowbit.nn.actquant import ActQuant
    scale = None
    if not act.dynamic:
        key = f"{name}.input_scale"
        if key not in files:
            raise LowbitError(f"{where}: tensor {key} is missing (config.json quantizes layer {name}'s input "
                              f"activations statically, {act.short_name()})")
        t = files.get(key)
        v = float(t.reshape(-1)[0]) if t.numel() == 1 and t.is_floating_point() else None
        if v is None or not math.isfinite(v) or v <= 0:
            raise LowbitError(f"{where}: tensor {key}: expected one positive finite float scale, got "
                              f"{t.dtype} {tuple(t.shape)}" + ("" if v is None else f" = {v!r}"))
        scale = torch.tensor(v, dtype=torch.float32)
    model.get_submodule(name).act_quant = ActQuant(act, scale)


def _match(name: str, target: str) -> bool:
    return (re.match(target[3:], name) is not None) if target.startswith("re:") else target == name


def _class_match(module: nn.Module, target: str) -> bool:
    return any(c.__name__ == target for c in type(module).__mro__ if issubclass(c, nn.Module))


def _scheme_of(name: str, module: nn.Module, plan: list, ignore: list[str]):
    """compressed-tensors' resolution (utils/match.py match_targets, lifecycle/apply.py): ignore
    first; then exact names, regexes (sorted), class names; a later group's target overrides an
    earlier group's identical target."""
    if any(_match(name, t) or _class_match(module, t) for t in ignore):
        return None
    by_target = {}
    for entry in plan:
        for t in entry[0]:
            by_target[t] = entry
    ordered = sorted(by_target, key=lambda t: (t.startswith("re:"), t))
    for t in ordered:
        if _match(name, t):
            return by_target[t]
    for t in ordered:
        if _class_match(module, t):
            return by_target[t]
    return None


def _codes_from_int8(w: torch.Tensor, bits: int, key: str, where: Path) -> torch.Tensor:
    if w.dtype != torch.int8:
        raise LowbitError(f"{where}: tensor {key}: expected int8 codes, got {w.dtype}")
    c = w.to(torch.int16) + (1 << (bits - 1))
    if w.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise LowbitError(f"{where}: tensor {key}: values outside the signed {bits}-bit range")
    return c.to(torch.uint8)


def read_layer(files: TensorFiles, name: str, shape: tuple[int, int], scheme, fmt: str, where: Path):
    """One module's QuantizedWeight (exact codes, scales, zero points) and bias."""
    from lowbit.numerics.affine import qparam_shape
    from lowbit.numerics.qweight import QuantizedWeight
    rows, cols = shape
    bits = scheme.code_bits
    qs = qparam_shape(shape, scheme)
    if scheme.granularity == "group" and cols % scheme.group_size:
        raise LowbitError(f"{where}: layer {name}: group_size {scheme.group_size} does not divide "
                          f"{cols} columns; compressed-tensors holds whole groups only")
    scale = files.get(f"{name}.weight_scale")
    if not scale.is_floating_point() or scale.numel() != qs[0] * qs[1] or (scale.dim() == 2 and tuple(scale.shape) != qs):
        raise LowbitError(f"{where}: tensor {name}.weight_scale: expected a float tensor of shape {qs} "
                          f"for {scheme.short_name()} on {shape}, got {scale.dtype} {tuple(scale.shape)}")
    scale = scale.float().reshape(qs)
    if not bool(torch.isfinite(scale).all()):
        raise LowbitError(f"{where}: tensor {name}.weight_scale contains NaN/inf")
    if fmt == L.PACK:
        if scheme.format != "int":
            raise LowbitError(f"{where}: layer {name}: pack-quantized holds int weights, config says {scheme.format}")
        ws = files.get(f"{name}.weight_shape")
        if ws.numel() != 2 or [int(v) for v in ws.reshape(-1)] != [rows, cols]:
            raise LowbitError(f"{where}: tensor {name}.weight_shape is {ws.reshape(-1).tolist()}, the model "
                              f"built from config.json has {[rows, cols]}")
        packed = files.get(f"{name}.weight_packed")
        need = (rows, L.packed_words(cols, bits))
        if packed.dtype != torch.int32 or tuple(packed.shape) != need:
            raise LowbitError(f"{where}: tensor {name}.weight_packed: expected int32 {need} for {bits}-bit "
                              f"codes of shape {list(shape)}, got {packed.dtype} {tuple(packed.shape)}")
        codes = L.unpack(packed, bits, cols, axis=1)
    else:
        w = files.get(f"{name}.weight")
        if tuple(w.shape) != shape:
            raise LowbitError(f"{where}: tensor {name}.weight has shape {tuple(w.shape)}, expected {shape}")
        if scheme.format == "int":
            codes = _codes_from_int8(w, bits, f"{name}.weight", where)
        elif w.dtype == torch.float8_e4m3fn:
            codes = w.contiguous().view(torch.uint8)
        else:
            raise LowbitError(f"{where}: tensor {name}.weight: expected float8_e4m3fn for fp8 weights, got {w.dtype}")
    zero = None
    if scheme.format == "int":
        zero = torch.full(qs, float(scheme.sym_zero))
        z = files.get(f"{name}.weight_zero_point", required=scheme.symmetric is False)
        if z is not None and scheme.symmetric:
            # older compressed-tensors kept an all-zero (signed) zero point for symmetric schemes
            zs = L.unpack(z, bits, qs[0], axis=0).to(torch.int16) - (1 << (bits - 1)) \
                if z.dtype == torch.int32 else z.to(torch.int16)
            if zs.numel() != qs[0] * qs[1] or bool((zs != 0).any()):
                raise LowbitError(f"{where}: tensor {name}.weight_zero_point: a symmetric scheme's zero "
                                  f"point must be 0, got values in [{int(zs.min())}, {int(zs.max())}]")
        elif z is not None:
            if fmt == L.PACK and scheme.granularity in L.PACKED_ZP:
                zneed = (L.packed_words(qs[0], bits), qs[1])
                if z.dtype != torch.int32 or tuple(z.shape) != zneed:
                    raise LowbitError(f"{where}: tensor {name}.weight_zero_point: expected int32 {zneed} "
                                      f"(packed along dim 0), got {z.dtype} {tuple(z.shape)}")
                zero = L.unpack(z, bits, qs[0], axis=0).float()
            else:
                if z.numel() != qs[0] * qs[1]:
                    raise LowbitError(f"{where}: tensor {name}.weight_zero_point: expected {qs}, got {tuple(z.shape)}")
                zero = _codes_from_int8(z.reshape(qs), bits, f"{name}.weight_zero_point", where).float()
    g_idx = files.get(f"{name}.weight_g_idx", required=False)
    if g_idx is not None:
        if g_idx.shape != (cols,) or g_idx.is_floating_point() or (cols and (int(g_idx.min()) < 0 or int(g_idx.max()) >= qs[1])):
            raise LowbitError(f"{where}: tensor {name}.weight_g_idx: expected {cols} group indices in [0, {qs[1]})")
        g_idx = g_idx.to(torch.int32)
    bias = files.get(f"{name}.bias", required=False)
    return QuantizedWeight(codes, scale, zero, scheme, g_idx), bias


def read(path: str | os.PathLike, dtype: torch.dtype = torch.float32, backend: str | None = None,
         activations: str = "run"):
    """A compressed-tensors checkpoint (ours or llm-compressor's) -> LoadedModel with QuantLinear
    modules (PackedLinear kernels with backend=). A W8A8 / FP8 checkpoint's input activations are
    run as it says (activations="run": int8 / fp8, dynamic per token, or static per tensor from its
    input_scale tensors); activations="float" reads the weights exactly and runs activations
    unquantized (not the model its makers ran)."""
    if activations not in ("run", "float"):
        raise LowbitError(f"compressed-tensors read: activations expected 'run' or 'float', got {activations!r}")
    path = Path(path)
    q = _qconfig(path)
    manifest = read_if_present(path)
    plan, ignore = _plan(q, path, activations)
    model = empty_model(path, dtype)
    files = TensorFiles(path)
    quantized: set[str] = set()
    where = path / "model.safetensors"
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        entry = _scheme_of(name, mod, plan, ignore)
        if entry is None:
            if f"{name}.weight_packed" in files or f"{name}.weight_scale" in files:
                raise LowbitError(f"{where}: tensor {name}.weight_scale: layer {name} holds quantized "
                                  "tensors but no config_group of config.json targets it (or it is ignored)")
            continue
        _, scheme, fmt, _, act = entry
        if f"{name}.weight_scale" not in files:
            raise LowbitError(f"{where}: tensor {name}.weight_scale is missing (config.json quantizes "
                              f"layer {name} as {fmt})")
        kind = "embedding" if isinstance(mod, nn.Embedding) else "linear"
        shape = tuple(mod.weight.shape)
        qw, bias = read_layer(files, name, shape, scheme, fmt, where)
        place_quantized(model, name, qw, bias, kind, dtype, backend, path)
        if act is not None and kind == "linear":
            _attach_act(model, files, name, act, where)
        quantized.add(name)
    if not quantized:
        raise LowbitError(f"{path / 'config.json'}: config_groups target no layer of the model")
    for key in files.unused():
        owner, _, leaf = key.rpartition(".")
        if leaf.startswith(("input_", "output_")) and activations == "float":
            continue                   # static activation qparams of a W8A8 model read weights-only
        if leaf in QPARAM_SUFFIXES or leaf.endswith(("_scale", "_zero_point", "_global_scale")):
            raise LowbitError(f"{where}: tensor {key}: quantization parameters lowbit does not read "
                              "(activation / KV-cache scales, or a layer no config_group targets)")
        t = files.get(key)
        set_tensor(model, key, t.to(dtype) if t.is_floating_point() else t, str(path))
    retie(model, {k: v for k, v in manifest.get("tied", {}).items() if k not in files.keys()}, quantized)
    tie_by_config(model)
    return finish(model, path, manifest, FORMAT)


register_format(Format(FORMAT, "compressed-tensors (llm-compressor / vLLM): pack-quantized int4/int8 "
                       "W4A16-W8A16, int-quantized W8A8, fp8; whole groups only", detect, write, read,
                       holds="int 2-8 bit group (dividing the row) / channel / tensor / block, "
                             "fp8 e4m3; no ragged groups, no g_idx (legacy_g_idx=True), no codebooks"))
