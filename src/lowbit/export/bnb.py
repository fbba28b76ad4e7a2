"""bitsandbytes checkpoints: the directory transformers' `save_pretrained` writes for a model loaded
with `BitsAndBytesConfig(load_in_4bit=...)` / `load_in_8bit`, and that `from_pretrained` loads back
with bitsandbytes (its CPU backend included).

    DIR/config.json          the source config + quantization_config (BitsAndBytesConfig.to_dict():
                             quant_method "bitsandbytes", load_in_4bit, bnb_4bit_quant_type,
                             bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, ...)
    DIR/model.safetensors    per 4-bit linear L (bitsandbytes' QuantState.as_dict(packed=True)):
        L.weight                                 uint8 (ceil(out*in/2), 1)   codes, high nibble first
        L.weight.absmax                          float32 (blocks,)  | uint8 with double quant
        L.weight.quant_map                       float32 (16,)      the 4-bit code table
        L.weight.nested_absmax                   float32 (ceil(blocks/256),)       double quant only
        L.weight.nested_quant_map                float32 (256,)     dynamic map    double quant only
        L.weight.quant_state.bitsandbytes__nf4   uint8: UTF-8 JSON {"quant_type", "blocksize",
                                                 "dtype", "shape"[, "nested_blocksize",
                                                 "nested_dtype", "nested_offset"]}  (or __fp4)
        L.bias                                   float, when the linear has one
                             per 8-bit linear L (bitsandbytes' Linear8bitLt state dict):
        L.weight int8 (out, in), L.SCB float32 (out,), L.weight_format uint8 scalar 0 (row-major)
                             every other tensor (embeddings, norms; lm_head is never quantized)
                             in float, by its state_dict name; a tied lm_head is stored once
    DIR/tokenizer files, DIR/lowbit_manifest.json

Written from a model whose linears are lowbit.nn.bnb4 layers (api.load(..., quantization=...)),
never by quantizing here. Read back into the same layers, from our files or bitsandbytes' own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.export import Format, register_format
from lowbit.export import _hf_quant as hq
from lowbit.export.common import TensorFiles, empty_model, finish

FORMAT = "bnb"
QS_PREFIX = "quant_state.bitsandbytes__"


def quant_config(quantization: str, double_quant: bool, compute_dtype: str) -> dict:
    """transformers' BitsAndBytesConfig(...).to_dict() for these settings (transformers 4.4x-5.x keys)."""
    four = quantization in ("nf4", "fp4")
    return {"quant_method": "bitsandbytes", "_load_in_4bit": four, "_load_in_8bit": not four,
            "load_in_4bit": four, "load_in_8bit": not four, "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": quantization if four else "fp4",
            "bnb_4bit_use_double_quant": bool(double_quant) if four else False,
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8"}


def _json_u8(d: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def layer_tensors(name: str, mod) -> dict[str, torch.Tensor]:
    """One lowbit.nn.bnb4 layer -> its tensors under bitsandbytes' names."""
    from lowbit.nn.bnb4 import Linear4bit, dtype_name
    out = {}
    if isinstance(mod, Linear4bit):
        w = f"{name}.weight"
        meta = {"quant_type": mod.quant_type, "blocksize": mod.block_size, "dtype": dtype_name(mod.weight_dtype),
                "shape": [mod.out_features, mod.in_features]}
        out[w] = mod.weight_packed.reshape(-1, 1).contiguous()
        out[f"{w}.absmax"] = mod.absmax
        out[f"{w}.quant_map"] = mod.quant_map
        if mod.double_quant:
            out[f"{w}.nested_absmax"] = mod.nested_absmax
            out[f"{w}.nested_quant_map"] = mod.nested_quant_map
            meta.update({"nested_blocksize": 256, "nested_dtype": "float32",
                         "nested_offset": float(mod.nested_offset)})
        out[f"{w}.{QS_PREFIX}{mod.quant_type}"] = _json_u8(meta)
    else:
        out[f"{name}.weight"] = mod.weight_int8
        out[f"{name}.SCB"] = mod.SCB
        out[f"{name}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias.detach()
    return {k: v.contiguous() for k, v in out.items()}


def _settings(mods: dict) -> tuple[str, bool, str]:
    from lowbit.nn.bnb4 import Linear4bit, dtype_name
    kinds = {(m.quant_type, m.double_quant) if isinstance(m, Linear4bit) else ("int8", False) for m in mods.values()}
    if len(kinds) != 1:
        raise LowbitError(f"bnb format: one quantization per model (transformers' BitsAndBytesConfig); the model "
                          f"mixes {sorted(kinds)}")
    (quantization, dq), = kinds
    if quantization != "int8" and len({m.block_size for m in mods.values()}) != 1 or \
            any(getattr(m, "block_size", 64) != 64 for m in mods.values()):
        raise LowbitError("bnb format: transformers loads block size 64 only (bitsandbytes' default); "
                          "load with block_size=64 to export")
    cdt = {dtype_name(m.compute_dtype) for m in mods.values()}
    return quantization, dq, sorted(cdt)[0]


def write(qm, out, *, overwrite: bool = False, max_shard_size=None, **_):
    """A model holding lowbit.nn.bnb4 layers -> a transformers + bitsandbytes directory."""
    from lowbit.nn.bnb4 import bnb_modules
    mods = bnb_modules(qm.model)
    if not mods:
        raise LowbitError("bnb format: the model has no 4-bit / 8-bit bitsandbytes-style layer; load it with "
                          "api.load(..., quantization='nf4' | 'fp4' | 'int8') first")
    quantization, dq, cdt = _settings(mods)
    tensors, layers = {}, {}
    for name, mod in mods.items():
        tensors.update(layer_tensors(name, mod))
        n = mod.in_features * mod.out_features
        nbytes = sum(t.numel() * t.element_size() for k, t in layer_tensors(name, mod).items()
                     if not k.endswith(".bias"))
        layers[name] = {"kind": "linear", "scheme": quantization + ("-dq" if dq else ""), "method": "rtn",
                        "shape": [mod.out_features, mod.in_features], "bits_per_weight": round(nbytes * 8 / n, 6)}
    notes = [f"bnb: {len(mods)} linear(s) as {quantization}{' + double quant' if dq else ''}, "
             f"compute dtype {cdt}; lm_head and embeddings in float"]
    return hq.write_dir(qm, out, FORMAT, tensors, quant_config(quantization, dq, cdt), layers, notes=notes,
                        overwrite=overwrite, max_shard_size=max_shard_size)


def detect(path: Path) -> bool:
    p = Path(path)
    if not p.is_dir():
        return False
    q, _ = hq.quant_config(p)
    return isinstance(q, dict) and str(q.get("quant_method", "")).lower() == "bitsandbytes"


def _meta(files, key: str, where) -> dict:
    raw = files.get(key)
    try:
        d = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LowbitError(f"{where}: tensor {key}: not bitsandbytes' packed quant state JSON ({e})") from None
    if not isinstance(d, dict) or not {"quant_type", "blocksize", "shape"} <= set(d):
        raise LowbitError(f"{where}: tensor {key}: expected quant_type, blocksize and shape, got {sorted(d)}")
    return d


def _read_4bit(files, name: str, key: str, shape, compute_dtype, where):
    from lowbit.nn.bnb4 import Linear4bit, as_dtype
    d = _meta(files, key, where)
    qt = d["quant_type"]
    if key.rsplit("__", 1)[1] != qt:
        raise LowbitError(f"{where}: tensor {key} says quant_type {qt!r}")
    if [int(x) for x in d["shape"]] != list(shape):
        raise LowbitError(f"{where}: {name}: quant state shape {d['shape']}, the model built from config.json "
                          f"expects {list(shape)}")
    w = f"{name}.weight"
    nested = None
    if f"{w}.nested_absmax" in files:
        if int(d.get("nested_blocksize", 256)) != 256:
            raise LowbitError(f"{where}: {w}: nested_blocksize {d.get('nested_blocksize')}; expected 256")
        nested = {"nested_absmax": files.get(f"{w}.nested_absmax"),
                  "nested_quant_map": files.get(f"{w}.nested_quant_map"), "offset": float(d["nested_offset"])}
    qmap = files.get(f"{w}.quant_map", required=False)
    mod = Linear4bit(shape[1], shape[0], quant_type=qt, block_size=int(d["blocksize"]),
                     packed=files.get(w), absmax=files.get(f"{w}.absmax"), bias=files.get(f"{name}.bias", False),
                     nested=nested, compute_dtype=compute_dtype,
                     weight_dtype=as_dtype(d.get("dtype", "float32"), f"{key} dtype"))
    if qmap is not None and not torch.equal(qmap.float(), mod.quant_map):
        # bitsandbytes' dequantizer uses its own table for the quant_type, not the stored one
        raise LowbitError(f"{where}: tensor {w}.quant_map differs from bitsandbytes' {qt} table")
    return mod


def read(path: str | os.PathLike, dtype: torch.dtype = torch.float32, backend: str | None = None,
         verify_files: bool = True):
    """A bitsandbytes directory (ours or transformers' save_pretrained) -> LoadedModel with
    lowbit.nn.bnb4 layers (the codes and constants as stored)."""
    from lowbit.nn.bnb4 import Linear8bit, as_dtype
    from lowbit.nn.qlinear import set_submodule
    path = Path(path)
    if backend is not None:
        raise LowbitError(f"{path}: bitsandbytes layers have no packed-kernel backend; load without backend")
    q, _ = hq.quant_config(path)
    if not isinstance(q, dict) or q.get("quant_method") != "bitsandbytes":
        raise LowbitError(f"{path}: config.json has no quantization_config with quant_method bitsandbytes")
    cdt = as_dtype(q.get("bnb_4bit_compute_dtype") or "float32", "quantization_config.bnb_4bit_compute_dtype")
    manifest = hq.manifest_of(path, verify_files)
    model = empty_model(path, dtype)
    files = TensorFiles(path)
    names = set()
    for key in sorted(files.keys()):
        if f".weight.{QS_PREFIX}" in key:
            name = key.split(".weight.")[0]
            shape = hq.linear_shape(model, name, path)
            set_submodule(model, name, _read_4bit(files, name, key, shape, cdt, path))
            names.add(name)
        elif key.endswith(".SCB"):
            name = key[: -len(".SCB")]
            out_f, in_f = hq.linear_shape(model, name, path)
            files.get(f"{name}.weight_format", required=False)
            b = files.get(f"{name}.bias", False)
            set_submodule(model, name, Linear8bit(in_f, out_f, cb=files.get(f"{name}.weight"),
                                                  scb=files.get(key), bias=b, compute_dtype=cdt))
            names.add(name)
    if not names:
        raise LowbitError(f"{path}: quant_method bitsandbytes, but no *.weight.{QS_PREFIX}* or *.SCB tensor")
    for name in names:      # biases were read with their layer
        files.used.add(f"{name}.bias") if f"{name}.bias" in files else None
    hq.fill_float_rest(model, files, dtype, path, manifest.get("tied", {}), names)
    model.to(dtype)        # non-quantized rest in `dtype`; the bnb layers keep their buffers' dtypes
    return finish(model, path, manifest, FORMAT, extra_meta={"quantization_config": q})


register_format(Format(FORMAT, "bitsandbytes 4-bit (nf4/fp4, double quant) or 8-bit checkpoint, loaded by "
                       "transformers + bitsandbytes", detect, write, read,
                       holds="bitsandbytes-style layers from api.load(quantization=nf4|fp4|int8), block size 64"))
