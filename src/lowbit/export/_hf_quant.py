"""What the GPTQ and AWQ formats share: a Hugging Face model directory in which every quantized
linear L is stored as packed int32 tensors (L.qweight, L.qzeros, L.scales[, L.g_idx], L.bias) and
config.json carries a `quantization_config`; every other tensor (norms, embeddings, float
linears) keeps its state_dict name, in float.

    DIR/
      config.json              the source config + quantization_config (the format's keys)
      <format's extra JSON>    quantize_config.json (GPTQ)
      tokenizer files          export.common.MODEL_FILES
      model.safetensors        (or transformers' shards + model.safetensors.index.json)
      lowbit_manifest.json     lowbit's manifest (export/manifest.py), sha256 of every file

Both formats store scales (and biases) as float16: a scale that is not exactly a float16 number
is refused (the codes were rounded against that scale; re-rounding it would silently change the
model), as is a bias outside float16's range. lowbit's methods round scales to float16 by
default (scale_dtype), so this refusal only meets recipes that asked for float32 scales.

Embeddings quantized by a recipe: neither format has a quantized embedding, and the model serves
the embedding dequantized anyway (api.quantize), so it is written as that dequantized float table
(same logits, no smaller file) and the manifest's notes say so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.export.common import (LayerTensors, copy_model_files, float_tensors, output_dir, save_safetensors,
                                  set_tensor, source_config)
from lowbit.export.manifest import FOREIGN, provenance, read_if_present, read_json, write_manifest

FLOAT_DTYPES = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fp16_exact(t: torch.Tensor, what: str, fmt: str) -> torch.Tensor:
    """t as float16, refusing values float16 cannot hold exactly (GPTQ / AWQ store fp16 scales)."""
    t = t.detach().float()
    if not bool(torch.isfinite(t).all()):
        raise LowbitError(f"tensor {what}: contains NaN/inf; refusing to write a broken model")
    h = t.to(torch.float16)
    if not bool(torch.isfinite(h).all()) or not torch.equal(h.float(), t):
        bad = int((h.float() != t).sum())
        raise LowbitError(f"tensor {what}: {bad} value(s) are not float16 numbers; {fmt} stores float16 "
                          "scales. Quantize with scale_dtype float16 (the methods' default), or write "
                          "--format native, which keeps float32 scales")
    return h.contiguous()


def fp16_bias(b: torch.Tensor, what: str) -> torch.Tensor:
    b = b.detach().float()
    if not bool(torch.isfinite(b).all()) or float(b.abs().max()) > 65504.0:
        raise LowbitError(f"tensor {what}: NaN/inf or beyond float16's range (|b| > 65504); the format "
                          "stores float16 biases")
    return b.to(torch.float16).contiguous()


def linear_names(qm, fmt: str) -> list[str]:
    """The quantized linears, in model order; every quantized embedding gets a note instead."""
    names = [n for n, k in qm.kinds.items() if k == "linear"]
    if not names:
        raise LowbitError(f"{fmt} format: no quantized linear layer to write (only embeddings); "
                          "use --format native")
    return names


def embedding_notes(qm, fmt: str) -> list[str]:
    emb = [n for n, k in qm.kinds.items() if k == "embedding"]
    if not emb:
        return []
    return [f"{fmt}: quantized embedding(s) {', '.join(emb)} written dequantized in float ({fmt} "
            "files hold no quantized embeddings); logits are unchanged, the file is not smaller"]


def float_linears_in_blocks(qm, quantized: set[str]) -> list[str]:
    """nn.Linear modules left in float (loaders must be told not to convert them)."""
    import torch.nn as nn
    return [n for n, m in qm.model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]


def write_dir(qm, out, fmt: str, tensors: dict, qconfig: dict, layers: dict, *, notes: list[str],
              extra_json: dict | None = None, overwrite: bool = False, max_shard_size=None,
              float_dtype: str | None = None) -> Path:
    """Float rest + quantized tensors -> safetensors, config.json with quantization_config,
    tokenizer files, extra JSON files, lowbit_manifest.json; atomically."""
    if float_dtype not in FLOAT_DTYPES:
        raise LowbitError(f"float_dtype {float_dtype!r}: expected one of "
                          f"{', '.join(str(k) for k in FLOAT_DTYPES if k)} (or None: the model's own)")
    floats, tied = float_tensors(qm.model, set(layers))
    want = FLOAT_DTYPES[float_dtype]
    if want is not None:
        floats = {k: (v.to(want) if v.is_floating_point() else v) for k, v in floats.items()}
    clash = sorted(set(floats) & set(tensors))
    if clash:
        raise LowbitError(f"{fmt} format: tensor names {clash[:3]} are both float and quantized")
    if isinstance(tensors, LayerTensors):
        tensors.update(floats)
        all_t = tensors
    else:
        all_t = {**tensors, **floats}
    cfg = source_config(qm)
    cfg["quantization_config"] = qconfig
    man_notes = list(qm.provenance.get("notes", [])) + list(notes)
    manifest = provenance(qm, fmt, layers, {"tied": tied, "format_version": 1})
    manifest["notes"] = man_notes
    with output_dir(out, overwrite) as tmp:
        save_safetensors(all_t, tmp, max_shard_size)
        copy_model_files(qm.source_dir, tmp, cfg)
        for fname, d in (extra_json or {}).items():
            (tmp / fname).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp, manifest, FOREIGN)
    return Path(out)


# ---- reading -------------------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    return read_json(Path(path) / "config.json", "model config")


def quant_config(path: Path, extra_names: tuple[str, ...] = ()) -> tuple[dict | None, Path | None]:
    """config.json's quantization_config, else the first of `extra_names` present -> (dict, file)."""
    p = Path(path)
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            q = json.loads(cfg.read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            q = None
        if isinstance(q, dict):
            return q, cfg
    for name in extra_names:
        f = p / name
        if f.is_file():
            try:
                q = json.loads(f.read_text())
            except (OSError, ValueError):
                return {}, f
            return (q if isinstance(q, dict) else {}), f
    return None, None


def manifest_of(path: Path, verify_files: bool) -> dict:
    """Our manifest when the directory has one (checked against its sha256s), else {} (a peer's)."""
    return read_if_present(path, verify_files)


def quantized_modules(files) -> list[str]:
    return sorted(k[: -len(".qweight")] for k in files.keys() if k.endswith(".qweight"))


def linear_shape(model, name: str, where) -> tuple[int, int]:
    import torch.nn as nn
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise LowbitError(f"{where}: quantized layer {name} is not in the model built from config.json") from None
    if not isinstance(mod, nn.Linear):
        raise LowbitError(f"{where}: tensor {name}.qweight belongs to a {type(mod).__name__}, not a Linear")
    return int(mod.out_features), int(mod.in_features)


def take(files, key: str, dtype: torch.dtype, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """One tensor of an exact dtype and shape, or a LowbitError naming the file and tensor."""
    t = files.get(key)
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise LowbitError(f"{where}: tensor {key}: expected {str(dtype).replace('torch.', '')} "
                          f"{tuple(shape)}, got {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}")
    return t


def fill_float_rest(model, files, dtype: torch.dtype, path: Path, tied: dict, quantized: set[str]) -> None:
    """Every tensor not read as part of a quantized layer, then ties: ours from the manifest,
    a peer's (transformers drops a tied lm_head.weight) from config.json's tie_word_embeddings."""
    from lowbit.export.common import retie
    for key in files.unused():
        t = files.get(key)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LowbitError(f"{path}: tensor {key} contains NaN/inf")
        set_tensor(model, key, t.to(dtype) if t.is_floating_point() else t, str(path))
    from lowbit.export.common import tie_by_config
    retie(model, tied, quantized)
    tie_by_config(model)


def dynamic_rule(dynamic: dict | None, name: str) -> dict | None:
    """GPTQModel's per-module overrides: {"+:regex" | "regex": {bits, group_size, ...},
    "-:regex": {}} matched (re.match) on the full module name, first match wins. -> the
    overrides, {} when nothing matches, None when a "-:" rule keeps the module in float."""
    for pat, over in (dynamic or {}).items():
        neg = pat.startswith("-:")
        rx = pat[2:] if neg or pat.startswith("+:") else pat
        try:
            hit = re.match(rx, name)
        except re.error as e:
            raise LowbitError(f"quantization_config.dynamic: pattern {pat!r} is not a valid regex ({e})") from None
        if hit:
            return None if neg else dict(over or {})
    return {}


def module_regex(name: str) -> str:
    return "^" + re.escape(name) + "$"
