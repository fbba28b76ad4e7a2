"""lowbit native format: a quantized model as a directory that `load_model(DIR)` reads back.

    DIR/
      config.json             the source model's Hugging Face config, unchanged
      tokenizer*.json, ...    the source's tokenizer files (export.common.MODEL_FILES, no others)
      model.safetensors       every tensor (below); past max_shard_size, transformers' shards
                              model-0000i-of-0000n.safetensors + model.safetensors.index.json
      lowbit.json             the manifest (below; export/manifest.py's fields plus layers, tied)

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

A vector-codebook layer (numerics/vq.py, method vq; "codes_layout": "vq") has instead

    L.weight_codebook    float16  (n, K, d)          n codebooks of K codewords of d columns
    L.weight_indices     uint8    (rows, cols / d)   codeword of each vector ("index_layout" "u8"); with
                                                      K < 256 a log2(K)-bit stream per row, as
                                                      weight_packed ("packed_u8"); int16 when K > 256
    L.weight_scale       float16  (rows, n_groups)   per row and group of group_size columns

    x_hat[r, v d + k] = scale[r, (v d) // g] * codebook[v // (cols / d / n), indices[r, v], k]

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
                           info {loss, damp_percent, act_order, ...},
                           input_scale (static input activations only: the calibrated float32
                           per-tensor scale; the scheme is the recipe rule's input_activations)}}
    tied              {name: the name it shares storage with}
    files             {file name: sha256} for every other file in DIR
    metrics           optional evaluation results

No timestamps or timings are written, so the same recipe, seed and machine give the same bytes.
The directory is built under a temporary name and renamed into place.
One reader (`read`) serves every caller: QuantLinear modules by default, PackedLinear kernels
with `backend=`; the float model is never allocated (a meta skeleton filled tensor by tensor).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.export import Format, register_format
from lowbit.export.common import (OnDemandLayers, TensorFiles, copy_model_files, source_config, empty_model, finish, float_tensors,
                                  output_dir, place_quantized, retie, save_safetensors, scale_for_file,
                                  set_tensor)
from lowbit.export.manifest import provenance, verify, write_manifest

FORMAT = "lowbit-native"
FORMAT_VERSION = 1
MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"
# tensor-name suffixes of one quantized module, and the QuantizedWeight field each holds
QUANT_TENSORS = {"weight_packed": "qdata", "weight_codes": "qdata", "weight_scale": "scale",
                 "weight_zero_point": "zero_point", "weight_g_idx": "g_idx"}
PACKED_BITS = (2, 3, 4)     # code widths stored packed (numerics.packing.pack_bits_u8)


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


def _vq_tensors(name: str, qw) -> tuple[dict, dict]:
    scale, sdt = scale_for_file(qw.scale.contiguous())
    cb16 = qw.codebook.to(torch.float16)
    cb = cb16 if torch.equal(cb16.float(), qw.codebook.float()) else qw.codebook.float().contiguous()
    idx, ilayout = qw.indices.contiguous(), "u8" if qw.codebook_size <= 256 else "i16"
    if qw.index_bits < 8:               # fewer than 256 codewords: a bit stream per row, as codes are
        from lowbit.numerics.packing import _pack_stream
        idx, ilayout = _pack_stream(idx, qw.index_bits, torch.uint8, 1), "packed_u8"
    tensors = {f"{name}.weight_codebook": cb.contiguous(), f"{name}.weight_indices": idx,
               f"{name}.weight_scale": scale}
    row = {"scheme": qw.scheme.to_dict(), "shape": list(qw.shape), "codes_layout": "vq",
           "code_bits": qw.index_bits, "vector_dim": qw.dim, "codebook_size": qw.codebook_size,
           "n_codebooks": qw.n_codebooks, "index_layout": ilayout, "scale_dtype": sdt,
           "codebook_dtype": str(cb.dtype).split(".")[-1], "has_g_idx": False,
           "bits_per_weight": round(qw.bits_per_weight, 6), "ragged_last_group": qw.ragged_last_group,
           "info": _scalar_info(qw.info)}
    return tensors, row


def _read_vq(take, name: str, row: dict, shape: list[int], where):
    from lowbit.numerics.vq import VQWeight
    cb = take(f"{name}.weight_codebook", True)
    idx = take(f"{name}.weight_indices", True)
    scale = take(f"{name}.weight_scale", True)
    try:
        d, K, n = int(row["vector_dim"]), int(row["codebook_size"]), int(row["n_codebooks"])
        g = int(row["scheme"]["group_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise LowbitError(f"{where}: layer {name}: malformed vq manifest row ({type(e).__name__}: {e})") from None
    if row.get("index_layout") == "packed_u8":
        from lowbit.numerics.packing import _unpack_stream
        bits, V = K.bit_length() - 1, shape[1] // max(d, 1)
        if idx.dtype != torch.uint8 or idx.dim() != 2 or idx.shape[0] != shape[0] or not 1 <= bits < 8 \
                or idx.shape[1] * 8 < V * bits:
            raise LowbitError(f"{where}: tensor {name}.weight_indices: expected uint8 ({shape[0]}, >= "
                              f"{-(-V * bits // 8)}) packed {bits}-bit indices, got {idx.dtype} {tuple(idx.shape)}")
        idx = _unpack_stream(idx, bits, V, 1, f"{where}: {name}.weight_indices")
    if tuple(cb.shape) != (n, K, d) or not cb.is_floating_point():
        raise LowbitError(f"{where}: tensor {name}.weight_codebook: expected float ({n}, {K}, {d}), got "
                          f"{cb.dtype} {tuple(cb.shape)}")
    if not bool(torch.isfinite(cb).all()) or not bool(torch.isfinite(scale.float()).all()):
        raise LowbitError(f"{where}: layer {name}: codebook or scale contains NaN/inf")
    if idx.dtype in (torch.uint8, torch.int16) and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= K):
        raise LowbitError(f"{where}: tensor {name}.weight_indices has codewords outside [0, {K})")
    try:
        qw = VQWeight(cb.float(), idx, scale.float(), tuple(shape), g, dict(row.get("info", {})))
    except LowbitError as e:
        raise LowbitError(f"{where}: layer {name}: {e}") from None
    return qw, take(f"{name}.bias", False)


def _layer_tensors(name: str, qw) -> tuple[dict, dict]:
    from lowbit.numerics.packing import pack_bits_u8
    if qw.scheme.format == "vq":
        return _vq_tensors(name, qw)
    bits = qw.scheme.code_bits
    if bits in PACKED_BITS:
        tensors, layout = {f"{name}.weight_packed": pack_bits_u8(qw.qdata, bits, axis=1)}, "packed_u8"
    else:
        tensors, layout = {f"{name}.weight_codes": qw.qdata.to(torch.uint8).contiguous()}, "u8"
    scale, sdt = scale_for_file(qw.scale)
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


def write(qm, out: str | os.PathLike, *, overwrite: bool = False, max_shard_size=None) -> Path:
    """Write a QuantizedModel as a lowbit native directory."""
    for name, qw in qm.qweights.items():
        if qw.scheme.format not in ("int", "nf4", "fp4", "ternary", "fp8_e4m3", "fp8_e5m2", "vq"):
            raise LowbitError(f"native format: layer {name} has scheme {qw.scheme.short_name()} "
                              f"(format {qw.scheme.format}), which this format does not hold; "
                              "ggml block formats go to --format gguf")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    rows = qm.provenance.get("layers", {})
    for name, qw in qm.qweights.items():
        t, row = _layer_tensors(name, qw)
        row["kind"] = qm.kinds[name]
        row["method"] = rows.get(name, {}).get("method")
        if rows.get(name, {}).get("input_scale") is not None:     # static input activations (W8A8)
            row["input_scale"] = float(rows[name]["input_scale"])
        bias = qm.bias(name)
        if bias is not None:
            t[f"{name}.bias"] = bias.contiguous()
        tensors.update(t)
        layers[name] = row
    floats, tied = float_tensors(qm.model, set(layers))
    tensors.update(floats)
    manifest = provenance(qm, FORMAT, layers, {"format_version": FORMAT_VERSION, "tied": tied})
    with output_dir(out, overwrite) as tmp:
        save_safetensors(tensors, tmp, max_shard_size)
        copy_model_files(qm.source_dir, tmp, source_config(qm))
        write_manifest(tmp, manifest, MANIFEST)
    return Path(out)


def save(loaded, report, out: str | os.PathLike, *, metrics: dict | None = None,
         overwrite: bool = False, max_shard_size=None) -> Path:
    """Write `loaded.model` (quantized in place by `report`) as a lowbit native directory."""
    from lowbit.export import QuantizedModel
    return write(QuantizedModel.from_report(loaded, report, metrics), out, overwrite=overwrite,
                 max_shard_size=max_shard_size)


def read_qweight(take, name: str, row: dict, where: str | os.PathLike = WEIGHTS):
    """One quantized layer's QuantizedWeight and bias, whichever codes layout its manifest row
    names. take(key, required) -> tensor or None reads one tensor."""
    from lowbit.numerics.packing import unpack_bits_u8
    from lowbit.numerics.qweight import QuantizedWeight
    from lowbit.numerics.scheme import Scheme

    try:
        layout, shape = row.get("codes_layout"), [int(d) for d in row["shape"]]
        scheme = Scheme.from_dict(row["scheme"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LowbitError(f"{where}: layer {name}: malformed manifest row ({type(e).__name__}: {e})") from None
    if layout == "vq":
        return _read_vq(take, name, row, shape, where)
    if layout == "packed_u8":
        packed = take(f"{name}.weight_packed", True)
        bits = int(row.get("code_bits", 0))
        need = (shape[0], -(-shape[1] * bits // 8))
        if bits not in PACKED_BITS or packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[0] != shape[0] \
                or packed.shape[1] < need[1]:
            raise LowbitError(f"{where}: tensor {name}.weight_packed: expected uint8 {need} for "
                              f"{bits}-bit codes of shape {shape}, got {packed.dtype} {tuple(packed.shape)}")
        codes = unpack_bits_u8(packed, bits, shape[1], axis=1)
    elif layout == "u8":
        codes = take(f"{name}.weight_codes", True)
    else:
        raise LowbitError(f"{where}: layer {name} has codes_layout {layout!r}; this lowbit reads "
                          "'packed_u8', 'u8' and 'vq'")
    scale = take(f"{name}.weight_scale", True).float()
    zero = take(f"{name}.weight_zero_point", False)
    g_idx = take(f"{name}.weight_g_idx", False)
    bias = take(f"{name}.bias", False)
    if not bool(torch.isfinite(scale).all()):
        raise LowbitError(f"{where}: tensor {name}.weight_scale contains NaN/inf")
    if g_idx is not None and g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scale.shape[-1]):
        raise LowbitError(f"{where}: tensor {name}.weight_g_idx has groups outside [0, {scale.shape[-1]})")
    qw = QuantizedWeight(codes, scale, None if zero is None else zero.float(), scheme,
                         None if g_idx is None else g_idx.to(torch.int32), dict(row.get("info", {})))
    if list(qw.shape) != shape:
        raise LowbitError(f"{where}: layer {name} codes have shape {list(qw.shape)}, manifest says {shape}")
    return qw, bias


def read_manifest(path: str | os.PathLike) -> dict:
    from lowbit.export.manifest import read_json
    p = Path(path) / MANIFEST
    m = read_json(p, "lowbit manifest")
    if m.get("format") != FORMAT:
        raise LowbitError(f"{p}: expected format {FORMAT!r}, got {m.get('format')!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise LowbitError(f"{p}: format_version {m.get('format_version')!r} is not supported "
                          f"(this lowbit reads {FORMAT_VERSION})")
    if not isinstance(m.get("layers"), dict):
        raise LowbitError(f"{p}: expected a 'layers' table, got {type(m.get('layers')).__name__}")
    return m


def is_native_dir(path: str | os.PathLike) -> bool:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return True   # ours by name; read_manifest gives the clear error


def read(path: str | os.PathLike, dtype: torch.dtype = torch.float32, backend: str | None = None,
         verify_files: bool = True):
    """A lowbit native directory -> LoadedModel. backend=None: QuantLinear modules (exact reference
    forward); backend="auto"|"ext"|...: PackedLinear kernels, packed layer by layer as read."""
    path = Path(path)
    m = read_manifest(path)
    if verify_files:
        verify(path)
    model = empty_model(path, dtype)
    files = TensorFiles(path)
    qweights = {}
    for name, row in m["layers"].items():
        qw, bias = read_qweight(files.get, name, row, path / WEIGHTS)
        kind = row.get("kind", "linear")
        place_quantized(model, name, qw, bias, kind, dtype, backend, path)
        if kind == "embedding":
            qweights[name] = qw
        del qw
    for key in files.unused():
        t = files.get(key)
        set_tensor(model, key, t.to(dtype) if t.is_floating_point() else t, str(path))
    retie(model, m.get("tied", {}), set(m["layers"]))
    _attach_activations(model, m, path / MANIFEST)
    return finish(model, path, m, FORMAT, extra_meta={"qweights": qweights})


class _LayersOnDisk(OnDemandLayers):
    """name -> QuantizedWeight, read from the directory's safetensors on each use."""

    def __init__(self, take, rows: dict, where: Path):
        super().__init__(rows)
        self._take, self._rows, self._where = take, rows, where

    def _make(self, name: str):
        return read_qweight(self._take, name, self._rows[name], self._where)[0]


def read_for_export(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A native directory as a QuantizedModel to convert to another format without holding it:
    the float tensors (embeddings, norms, a float lm_head) are read, each quantized layer is read
    from disk when a writer asks for it, and QuantizedModel.lazy tells the writers to build one
    layer's tensors at a time (export.common.LayerTensors). The bytes written are those of
    api.export(api.load(path), ...). -> None where the directory holds a quantized embedding
    (served dequantized, so it is loaded whole: use api.load)."""
    from lowbit.export import QuantizedModel, recipe_and_provenance
    path = Path(path)
    m = read_manifest(path)
    verify(path)
    rows = m["layers"]
    if any(r.get("kind", "linear") != "linear" for r in rows.values()):
        return None
    model = empty_model(path, dtype)
    # os.pread, not safetensors' memory map: mapped pages a reader touched stay resident (and count
    # in its RSS) while the file is open, so a map would end up holding the whole directory
    from lowbit.models.shards import SafetensorsSource
    src = SafetensorsSource(path)
    for key in src.keys():
        owner = key.rpartition(".")[0]
        if owner in rows and not key.endswith(".bias"):
            continue                    # a quantized layer's codes / scales: read when asked for
        t = src.read(key)
        set_tensor(model, key, t.to(dtype) if t.is_floating_point() else t, str(path))
    retie(model, m.get("tied", {}), set(rows))
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()]
            if p.is_meta and n.rpartition(".")[0] not in rows]
    if left:
        raise LowbitError(f"{path}: no tensor for {left[:5]} ({len(left)} in all)")
    model.eval()
    model.requires_grad_(False)
    recipe, prov = recipe_and_provenance(m, path, (m.get("source") or {}).get("sha256"))
    # in model order, as a read-back model lists its layers (the manifest's rows are sorted)
    order = {n: rows[n] for n, _ in model.named_modules() if n in rows}
    if len(order) != len(rows):
        raise LowbitError(f"{path / MANIFEST}: layers {sorted(set(rows) - set(order))[:3]} are not modules "
                          "of the model config.json describes")
    return QuantizedModel(model, None, path, _LayersOnDisk(src.get, order, path / WEIGHTS),
                          {n: "linear" for n in order}, recipe, prov, lazy=True)


# converted holding one layer at a time (gguf: each encoded tensor spooled to disk until the
# header, which lists them all, is written; onnx: each initializer written to the external data
# file as the graph is built)
LAYER_BY_LAYER = ("gptq", "awq", "compressed-tensors", "gguf", "onnx")
CONVERT_MAX_SHARD = "1GB"       # the sharded formats' default there: a shard is built in memory
UNSHARDED = ("gguf", "onnx")    # one weights file each: no max_shard_size


def convert(path: str | os.PathLike, out, format: str, *, overwrite: bool = False, max_shard_size=None,
            name_or_path: str | None = None, **options) -> Path:
    """A quantized directory written in another format: a native directory to gptq / awq /
    compressed-tensors / gguf / onnx layer by layer (read_for_export; CONVERT_MAX_SHARD shards unless
    max_shard_size says otherwise), anything else read back whole (api.load) and exported.
    name_or_path: the config's _name_or_path to write with (gguf's general.name is read from it)."""
    from lowbit import api
    from lowbit.export import get_format
    fmt = get_format(format)
    qm = read_for_export(path) if fmt.name in LAYER_BY_LAYER and is_native_dir(path) else None
    loaded = api.load(path) if qm is None else None
    if name_or_path is not None:
        (qm or loaded).model.config._name_or_path = name_or_path
    if qm is not None:
        if fmt.name not in UNSHARDED:
            options["max_shard_size"] = max_shard_size or CONVERT_MAX_SHARD
        elif max_shard_size is not None:
            options["max_shard_size"] = max_shard_size
        return fmt.write(qm, out, overwrite=overwrite, **options)
    if max_shard_size is not None:
        options["max_shard_size"] = max_shard_size
    return api.export(loaded, None, out, fmt.name, overwrite=overwrite, **options)


def _attach_activations(model, manifest: dict, where) -> None:
    """Input-activation quantization (W8A8, W4A8, BitNet's W1.58A8): the scheme comes from the
    recipe's rule for each linear; a static scheme's calibrated per-tensor scale from the layer's
    manifest row ("input_scale", the float32 value as a JSON number: exact)."""
    import math

    rd = manifest.get("lowbit_recipe")
    if not rd:
        return
    from lowbit.nn.actquant import ActQuant
    from lowbit.numerics.activation import ActScheme
    from lowbit.recipe import Recipe
    recipe = Recipe.from_dict(rd)
    for name, row in manifest["layers"].items():
        rule = recipe.rule_for(name) if row.get("kind", "linear") == "linear" else None
        ia = getattr(rule, "input_activations", None)
        if not ia:
            continue
        scheme = ActScheme.from_dict(ia)
        scale = None
        if not scheme.dynamic:
            v = row.get("input_scale")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise LowbitError(f"{where}: layer {name}: static input activations "
                                  f"({scheme.short_name()}) need a positive finite 'input_scale' in its "
                                  f"manifest row, got {v!r}")
            scale = torch.tensor(float(v), dtype=torch.float32)
        model.get_submodule(name).act_quant = ActQuant(scheme, scale)


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, verify: bool = True):
    """Rebuild the quantized model (QuantLinear modules) and tokenizer -> LoadedModel."""
    return read(path, dtype, None, verify)


register_format(Format("native", "lowbit's own directory: every scheme lowbit has, packed codes, "
                       "read straight into CPU kernels", is_native_dir, write, read,
                       holds="int 2-8 bit (any group, ragged, g_idx), nf4/fp4/ternary, fp8, vector codebooks (vq)"))
