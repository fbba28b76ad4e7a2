"""lowbit native format: a quantized model as a directory that `load_model(DIR)` reads back.

    DIR/
      config.json             the source model's Hugging Face config, unchanged
      tokenizer*.json, ...    copied from the source (whatever tokenizer files it has)
      model.safetensors       every tensor (below)
      lowbit.json             the manifest (below)

Tensors in model.safetensors, for a quantized module named L (a linear: rows = out_features,
cols = in_features; an embedding: rows = vocab, cols = hidden):

    L.weight_packed      uint8    (rows, ceil(cols * b / 8))   codes of b = 2, 3 or 4 bits, packed
                                                      along each row by numerics.packing.pack_bits_u8
                                                      ("codes_layout": "packed_u8"): one little-endian
                                                      bit stream per row, value c at bits
                                                      [c*b, (c+1)*b); 4-bit: byte j = v[2j] | v[2j+1] << 4;
                                                      3-bit rows are padded to whole 8-value runs
    L.weight_codes       uint8    (rows, cols)       other widths (8-bit, 5-7 bit): one code per weight,
                                                      unpacked ("codes_layout": "u8"), as QuantizedWeight.qdata
    L.weight_scale       float16  qparam_shape        (rows, n_groups) for groups, (rows, 1) per
                                                      channel, (1, 1) per tensor; float32 if some
                                                      scale is not exactly an fp16 number
    L.weight_zero_point  uint8    qparam_shape        integer zero points in code units, int formats
                                                      (float16 for other formats; absent if none)
    L.weight_g_idx       int32    (cols,)             group of each input column; only for act-order
                                                      with dynamic groups (GPTQ desc_act layout)
    L.bias               source dtype                 if the module has one

    x_hat[r, c] = (codes[r, c] - zero[r, g(c)]) * scale[r, g(c)],  g(c) = g_idx[c] or c // group_size

A group size that does not divide cols gives a shorter last group (n_groups = ceil(cols / g));
the manifest row says so ("ragged_last_group"). Every other tensor of the model (norms,
embeddings kept in float, biases of float layers) is stored under its state_dict name and dtype;
a tensor tied to one already written (lm_head.weight = model.embed_tokens.weight) is stored once
and listed in "tied".

lowbit.json:

    format "lowbit-native", format_version 1, lowbit_version
    lowbit_recipe     the Recipe, with the calibration settings used (Recipe.load(DIR/lowbit.json))
    source            {model, sha256}: what was quantized (the GGUF's or safetensors' sha256)
    calibration       CalibrationConfig of the run ({} for data-free recipes)
    layers            {L: {kind, scheme, method, shape, bits_per_weight, ragged_last_group,
                           codes_layout, code_bits, scale_dtype, zero_dtype, has_g_idx,
                           info {loss, damp_percent, act_order, ...}}}
    tied              {name: the name it shares storage with}
    files             {file name: sha256} for every other file in DIR
    metrics           optional evaluation results

No timestamps or timings are written, so the same recipe, seed and machine give the same bytes.
The directory is built under a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from lowbit.errors import LowbitError

FORMAT = "lowbit-native"
FORMAT_VERSION = 1
MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"
# tensor-name suffixes of one quantized module, and the QuantizedWeight field each holds
QUANT_TENSORS = {"weight_packed": "qdata", "weight_codes": "qdata", "weight_scale": "scale",
                 "weight_zero_point": "zero_point", "weight_g_idx": "g_idx"}
PACKED_BITS = (2, 3, 4)     # code widths stored packed (numerics.packing.pack_bits_u8)
_COPY_SKIP = {WEIGHTS, MANIFEST, "model.safetensors.index.json", "lowbit_source.txt"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _source_sha256(loaded) -> str | None:
    if getattr(loaded, "source_sha256", None):
        return loaded.source_sha256
    shards = sorted(Path(loaded.path).glob("*.safetensors"))
    if not shards:
        return None
    if len(shards) == 1:
        return _sha256(shards[0])
    return hashlib.sha256("".join(_sha256(s) for s in shards).encode()).hexdigest()


def _scale_tensor(scale: torch.Tensor) -> tuple[torch.Tensor, str]:
    s16 = scale.to(torch.float16)
    if torch.equal(s16.float(), scale.float()):
        return s16, "float16"
    return scale.float().contiguous(), "float32"


def _zero_tensor(zero: torch.Tensor, scheme) -> tuple[torch.Tensor, str]:
    if scheme.format == "int":
        z = zero.round()
        if torch.equal(z, zero) and float(z.min()) >= 0 and float(z.max()) <= 255:
            return z.to(torch.uint8), "uint8"
    z16 = zero.to(torch.float16)
    if torch.equal(z16.float(), zero.float()):
        return z16, "float16"
    return zero.float().contiguous(), "float32"


def _scalar_info(info: dict) -> dict:
    return {k: v for k, v in sorted(info.items()) if isinstance(v, (bool, int, float, str))}


def _layer_tensors(name: str, qw) -> tuple[dict, dict]:
    from lowbit.numerics.packing import pack_bits_u8
    bits = qw.scheme.code_bits
    if bits in PACKED_BITS:
        tensors, layout = {f"{name}.weight_packed": pack_bits_u8(qw.qdata, bits, axis=1)}, "packed_u8"
    else:
        tensors, layout = {f"{name}.weight_codes": qw.qdata.to(torch.uint8).contiguous()}, "u8"
    scale, sdt = _scale_tensor(qw.scale)
    tensors[f"{name}.weight_scale"] = scale
    zdt = None
    if qw.zero_point is not None:
        tensors[f"{name}.weight_zero_point"], zdt = _zero_tensor(qw.zero_point, qw.scheme)
    if qw.g_idx is not None:
        tensors[f"{name}.weight_g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    row = {"scheme": qw.scheme.to_dict(), "shape": list(qw.shape), "codes_layout": layout, "code_bits": bits,
           "scale_dtype": sdt, "zero_dtype": zdt, "has_g_idx": qw.g_idx is not None,
           "bits_per_weight": round(qw.bits_per_weight, 6), "ragged_last_group": qw.ragged_last_group,
           "info": _scalar_info(qw.info)}
    return tensors, row


def save(loaded, report, out: str | os.PathLike, *, metrics: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write `loaded.model` (quantized in place by `report`) as a lowbit native directory."""
    from safetensors.torch import save_file

    import lowbit
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output {out}: already exists; choose a new directory or pass overwrite=True")
    if not report.qweights:
        raise LowbitError("save: the report holds no quantized weights (nothing was quantized)")
    model = loaded.model
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    rows = {r["name"]: r for r in report.layers}
    for name, qw in report.qweights.items():
        t, row = _layer_tensors(name, qw)
        mod = model.get_submodule(name)
        row["kind"] = "embedding" if isinstance(mod, nn.Embedding) else "linear"
        row["method"] = rows.get(name, {}).get("method")
        bias = getattr(mod, "bias", None)
        if isinstance(bias, torch.Tensor):
            t[f"{name}.bias"] = bias.detach().contiguous()
        tensors.update(t)
        layers[name] = row
    quantized = set(layers)
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized:
            continue                  # codes / scales / bias of a quantized module: written above
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().contiguous()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": lowbit.__version__,
        "lowbit_recipe": report.recipe.to_dict(),
        "source": {"model": str(loaded.source), "sha256": _source_sha256(loaded)},
        "calibration": dict(report.calibration), "layers": layers, "tied": tied,
        "notes": list(report.notes), "metrics": dict(metrics or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # one metadata key only: safetensors keeps the header's metadata in a hash map, so with two
        # keys their order (and the file's bytes) changed from one save to the next
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        src = Path(loaded.path)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in _COPY_SKIP and not f.name.endswith(".safetensors"):
                shutil.copyfile(f, tmp / f.name)
        manifest["files"] = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out.exists():                   # overwrite: swap in the new directory, then drop the old
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def retie(model, manifest: dict) -> None:
    """Point every tensor the manifest lists as tied (stored once) at the tensor it shares,
    e.g. lm_head.weight -> model.embed_tokens.weight; a tied name that is itself a quantized
    layer keeps its own (quantized) module."""
    for key, target in manifest.get("tied", {}).items():
        owner, _, leaf = key.rpartition(".")
        if owner in manifest["layers"]:
            continue
        src_owner, _, src_leaf = target.rpartition(".")
        setattr(model.get_submodule(owner), leaf, getattr(model.get_submodule(src_owner), src_leaf))


def loaded(model, path: Path, manifest: dict):
    """The LoadedModel every native loader returns: eval mode, no grads, the directory's tokenizer."""
    from transformers import AutoTokenizer
    from lowbit.models.load import LoadedModel
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=AutoTokenizer.from_pretrained(path), path=path, source=str(path),
                       source_sha256=manifest.get("source", {}).get("sha256"), meta={"manifest": manifest})


def read_qweight(take, name: str, row: dict, where: str | os.PathLike = WEIGHTS):
    """One quantized layer's QuantizedWeight and bias, whichever codes layout its manifest row
    names. take(key, required) -> tensor or None reads one tensor from model.safetensors (a dict
    pop, or safe_open's get_tensor), so every loader (this one, nn.load_packed) shares the layout
    code."""
    from lowbit.numerics.packing import unpack_bits_u8
    from lowbit.numerics.qweight import QuantizedWeight
    from lowbit.numerics.scheme import Scheme

    layout = row.get("codes_layout")
    if layout == "packed_u8":
        codes = unpack_bits_u8(take(f"{name}.weight_packed", True), int(row["code_bits"]),
                               int(row["shape"][1]), axis=1)
    elif layout == "u8":
        codes = take(f"{name}.weight_codes", True)
    else:
        raise LowbitError(f"{where}: layer {name} has codes_layout {layout!r}; this lowbit reads "
                          "'packed_u8' and 'u8'")
    scale = take(f"{name}.weight_scale", True).float()
    zero = take(f"{name}.weight_zero_point", False)
    g_idx = take(f"{name}.weight_g_idx", False)
    bias = take(f"{name}.bias", False)
    qw = QuantizedWeight(codes, scale, None if zero is None else zero.float(), Scheme.from_dict(row["scheme"]),
                         g_idx, dict(row.get("info", {})))
    if list(qw.shape) != list(row["shape"]):
        raise LowbitError(f"{where}: layer {name} codes have shape {list(qw.shape)}, manifest says {row['shape']}")
    return qw, bias


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{p}: not a readable lowbit manifest ({e})") from e
    if m.get("format") != FORMAT:
        raise LowbitError(f"{p}: expected format {FORMAT!r}, got {m.get('format')!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise LowbitError(f"{p}: format_version {m.get('format_version')!r} is not supported "
                          f"(this lowbit reads {FORMAT_VERSION})")
    return m


def is_native_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, verify: bool = True):
    """Rebuild the quantized model (QuantLinear modules) and tokenizer -> LoadedModel."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.models.load import _dtype_kw
    from lowbit.nn.qlinear import QuantLinear, set_submodule

    path = Path(path)
    m = read_manifest(path)
    wfile = path / WEIGHTS
    if verify:
        for fname, digest in m.get("files", {}).items():
            f = path / fname
            if not f.is_file():
                raise LowbitError(f"{path}: file {fname} listed in {MANIFEST} is missing")
            if _sha256(f) != digest:
                raise LowbitError(f"{f}: sha256 does not match {MANIFEST} (file changed or truncated)")
    tensors = load_file(str(wfile))
    config = AutoConfig.from_pretrained(path)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, **_dtype_kw(dtype))

    def take(key: str, required: bool):
        if key not in tensors:
            if required:
                raise LowbitError(f"{wfile}: tensor {key} is missing")
            return None
        return tensors.pop(key)

    for name, row in m["layers"].items():
        qw, bias = read_qweight(take, name, row, wfile)
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"{path}: quantized layer {name} does not exist in the model built from config.json") from None
        if row.get("kind") == "embedding":
            mod.weight.data = qw.dequantize(dtype)
        else:
            set_submodule(model, name, QuantLinear(qw, bias))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise LowbitError(f"{wfile}: tensors {unexpected[:5]} do not belong to the model built from config.json")
    retie(model, m)
    # tied tensors were set just above; quantized layers' buffers came from their rows
    missing = [k for k in missing if k not in m.get("tied", {}) and k.rpartition(".")[0] not in m["layers"]]
    if missing:
        raise LowbitError(f"{wfile}: tensors {missing[:5]} are missing")
    return loaded(model, path, m)
