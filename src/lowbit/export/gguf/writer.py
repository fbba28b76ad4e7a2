"""Write a quantized model as a GGUF v3 file that llama.cpp loads as its own.

    report = write_quantized(qm, "out.gguf")       # any QuantizedModel (api.quantize's result)
    report = write_gguf(model, "out.gguf", recipe="q4_k_m", hf_dir=..., imatrix=im, source_gguf=...)
                                                    # = api.quantize(copy, recipe) + write_quantized

The writer never quantizes. Each quantized module's tensor comes from its weight:
  GGMLWeight (methods ggml / gptq on ggml types)  the blocks, unchanged (q/k rows permuted);
  QuantizedWeight ternary (BitNet b1.58)           TQ2_0 / TQ1_0 (ternary_type) where the row is a
      multiple of 256, else Q8_0, else F16: the first that decodes back exactly (ggml_from_ternary);
  QuantizedWeight on an int grid                   written unchanged where its scheme *is* a ggml
      type (int4/int5/int8 symmetric group 32 = Q4_0/Q5_0/Q8_0; asymmetric = Q4_1/Q5_1 when every
      minimum -zero*scale is an fp16 number), proven by decoding the blocks back to exactly our
      dequantized weight; otherwise re-encoded from our dequantized weight with the ggml type of
      its bit width (`reencode`), and the report lists each such tensor with its relative error;
  anything else (norms: F32; float 2-D tensors: F16, or F32 if F16 does not fit).

File layout (GGUF v3, docs/gguf.md of ggml): header, metadata KV, tensor infos, then tensor data,
each tensor aligned to general.alignment (32, the default, not written). We build on gguf-py's
GGUFWriter and stream: tensor infos are declared first (sizes follow from shape and type), then each
tensor is quantized and written in turn, so only one quantized tensor is in memory at a time.

Metadata written:
  general.*        type=model, name and other general.* copied from the source GGUF if any,
                   quantization_version=2 (GGML_QNT_VERSION), file_type (LlamaFileType), quantized_by
  {arch}.*         context_length, embedding_length, block_count, feed_forward_length,
                   attention.head_count(_kv), attention.layer_norm_rms_epsilon, rope.freq_base
                   (+ rope.dimension_count, vocab_size for llama; key/value_length if head_dim differs)
  tokenizer.*      copied from the source GGUF, else built from the HF tokenizer (vocab.py)
  quantize.imatrix.* as llama-quantize records its imatrix (file, dataset, entries, chunks)

Per-tensor types come from a Recipe (mixes.py) with llama.cpp's fallbacks; 1-D tensors stay F32.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.numerics.ggml import quantize
from lowbit.numerics.ggml.types import ggml_type
from lowbit.presets.gguf_mixes import MIXES, bind_mix, fallback_type, mix_recipe
from lowbit.arch.gguf_names import NameMap, arch_spec, module_of, permute_qk, qk_heads
from lowbit.recipe import Recipe, get_recipe

GGML_QNT_VERSION = 2
_FLOAT_FORMATS = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


@dataclass
class TensorRow:
    name: str              # GGUF name
    hf_name: str
    shape: tuple[int, ...]  # HF (out_features, in_features) / (n,)
    wanted: str
    used: str
    nbytes: int
    imatrix: bool = False

    @property
    def fallback(self) -> bool:
        return self.wanted != self.used


@dataclass
class GGUFReport:
    path: Path
    recipe: Recipe
    tensors: list[TensorRow] = field(default_factory=list)
    seconds: float = 0.0
    file_bytes: int = 0
    exact: list[str] = field(default_factory=list)      # int weights written with their codes unchanged
    reencoded: list[dict] = field(default_factory=list)  # {name, scheme, type, rel_rms_error}

    @property
    def fallbacks(self) -> list[TensorRow]:
        return [t for t in self.tensors if t.fallback]

    @property
    def n_weights(self) -> int:
        return int(sum(np.prod(t.shape) for t in self.tensors))

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """All tensor data (norms included) * 8 / all weights, as llama-quantize's "quant size BPW"."""
        return 8.0 * self.tensor_bytes / max(1, self.n_weights)

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.used] = out.get(t.used, 0) + 1
        return out


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def model_facts(config) -> dict:
    n_head = int(config.num_attention_heads)
    return {"n_layers": int(config.num_hidden_layers), "n_head": n_head,
            "n_head_kv": int(_cfg(config, "num_key_value_heads", default=n_head)),
            "hidden": int(config.hidden_size)}


def resolve_recipe(recipe: Recipe | str, config, has_imatrix: bool = False) -> Recipe:
    """A mix name or Recipe, with its layer sets bound to this model."""
    r = mix_recipe(recipe) if isinstance(recipe, str) and recipe.lower() in MIXES else get_recipe(recipe)
    f = model_facts(config)
    return bind_mix(r, f["n_layers"], f["n_head"], f["n_head_kv"], has_imatrix)


def tensor_type(recipe: Recipe, hf_name: str, shape: tuple[int, ...], tied: bool) -> tuple[str, str]:
    """(wanted, used) ggml type names for one HF parameter."""
    if len(shape) < 2:
        return "F32", "F32"
    module = module_of(hf_name)
    rule = recipe.rule_for("lm_head") if tied and module.endswith("embed_tokens") else None
    rule = rule or recipe.rule_for(module)
    if rule is None or rule.scheme is None:
        return "F16", fallback_type("F16", shape[-1])
    fmt = rule.scheme.format
    if fmt in _FLOAT_FORMATS:
        wanted = _FLOAT_FORMATS[fmt]
    else:
        try:
            wanted = ggml_type(fmt).name
        except LowbitError:
            raise LowbitError(f"GGUF export: {hf_name} is assigned scheme format {fmt!r} by recipe "
                              f"{recipe.name!r}; GGUF holds ggml types (q4_k, q8_0, ...) or fp16/fp32") from None
    return wanted, fallback_type(wanted, shape[-1])


def _file_type(recipe: Recipe) -> int:
    """general.file_type: the mix's LlamaFileType; GUESSED for a custom recipe (as llama.cpp marks
    files whose tensor types it did not choose)."""
    import gguf
    m = MIXES.get(recipe.name.removesuffix("-gptqk").removesuffix("-gptq"))
    if m is not None:
        return int(getattr(gguf.LlamaFileType, m.ftype))
    return int(gguf.LlamaFileType.GUESSED)


def _hparams(writer, config, spec) -> None:
    f = model_facts(config)
    rope = _cfg(config, "rope_parameters", "rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise LowbitError(f"GGUF export: rope scaling {rope_type!r} is not supported yet")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or _cfg(config, "rope_theta", default=10000.0)
    head_dim = int(_cfg(config, "head_dim", default=f["hidden"] // f["n_head"]))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(f["hidden"])
    writer.add_block_count(f["n_layers"])
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(f["n_head"])
    writer.add_head_count_kv(f["n_head_kv"])
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if head_dim != f["hidden"] // f["n_head"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if spec.write_vocab_size:
        writer.add_vocab_size(int(config.vocab_size))
    if spec.write_rope_dim:
        writer.add_rope_dimension_count(head_dim)


def _general(writer, config, source_gguf, file_type: int, quantized: bool) -> None:
    import gguf
    writer.add_type("model")
    copied = set()
    if source_gguf is not None:
        from lowbit.export.gguf.header import open_reader
        r = open_reader(source_gguf)
        skip = {"general.architecture", "general.type", "general.file_type", "general.quantization_version",
                "general.alignment", "general.quantized_by"}
        for key, fld in r.fields.items():
            if key.startswith("general.") and key not in skip:
                vt = fld.types[0]
                writer.add_key_value(key, fld.contents(), vt, fld.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
                copied.add(key)
    if "general.name" not in copied:
        writer.add_name(Path(str(_cfg(config, "_name_or_path", default="") or "model")).name or "model")
    writer.add_file_type(file_type)
    if quantized:
        writer.add_quantization_version(GGML_QNT_VERSION)
    writer.add_quantized_by("lowbit")


def plan_tensors(model, recipe: Recipe, imatrix=None) -> tuple[dict, list[TensorRow]]:
    """(parameters to write by HF name, one TensorRow per GGUF tensor) for a *bound* recipe.
    A tied lm_head is not written: token_embd serves as the output and takes the lm_head rule."""
    config = model.config
    names = NameMap(arch_spec(config.model_type).gguf_arch, int(config.num_hidden_layers))
    params = dict(model.state_dict())
    emb = params.get("model.embed_tokens.weight")
    head = params.get("lm_head.weight")
    tied = bool(getattr(config, "tie_word_embeddings", False)) and (
        head is None or (emb is not None and head.data_ptr() == emb.data_ptr()))
    if tied:
        params.pop("lm_head.weight", None)
    rows: list[TensorRow] = []
    for hf_name, p in params.items():
        shape = tuple(p.shape)
        wanted, used = tensor_type(recipe, hf_name, shape, tied)
        gname = names.to_gguf(hf_name)
        has_im = imatrix is not None and used not in ("F32", "F16", "BF16") and imatrix.mean(gname) is not None
        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        rows.append(TensorRow(gname, hf_name, shape, wanted, used, n_rows * ggml_type(used).row_bytes(shape[-1]),
                              has_im))
    return params, rows


# int schemes that are exactly a ggml type: (bits, symmetric) at group 32
EXACT_INT = {(4, True): "Q4_0", (5, True): "Q5_0", (8, True): "Q8_0", (4, False): "Q4_1", (5, False): "Q5_1"}
# re-encoding target by bit width (then llama.cpp's fallback for rows its block does not divide)
REENCODE = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 7: "Q8_0", 8: "Q8_0"}


def ggml_from_int(qw) -> tuple[str, np.ndarray] | None:
    """(ggml type, blocks uint8 (rows, row_bytes)) holding `qw`'s own codes and scales, or None
    when its scheme is not exactly a ggml type. Checked by decoding: the blocks must give back
    exactly qw.dequantize()."""
    import torch

    from lowbit.numerics.ggml import dequantize
    from lowbit.numerics.ggml.grid import code_span
    from lowbit.numerics.ggml.types import fp16_bytes
    sc = qw.scheme
    if sc.format != "int" or sc.granularity != "group" or sc.group_size != 32:
        return None
    rows, cols = qw.shape
    if cols % 32:
        return None
    if qw.g_idx is not None and not torch.equal(qw.g_idx.long(), torch.arange(cols) // 32):
        return None
    t = EXACT_INT.get((sc.bits, bool(sc.symmetric)))
    if t is None:
        return None
    nb = rows * (cols // 32)
    s = qw.scale.float().reshape(-1).numpy()
    if not np.array_equal(s.astype(np.float16).astype(np.float32), s):
        return None
    header = [fp16_bytes(s.astype(np.float32))]
    if not sc.symmetric:
        z = qw.zero_point.float().reshape(-1).numpy()
        m = (-z * s).astype(np.float32)
        if not np.array_equal(m.astype(np.float16).astype(np.float32), m):
            return None
        header.append(fp16_bytes(m))
    elif qw.zero_point is not None and not bool((qw.zero_point == sc.sym_zero).all()):
        return None
    span = code_span(t)
    codes = qw.qdata.reshape(nb, 32).numpy().astype(np.uint8)
    if sc.bits == 8 and not sc.symmetric:
        return None
    blocks = np.concatenate([*header, span.pack(codes)], axis=1).reshape(rows, -1)
    want = qw.dequantize(torch.float32).numpy()
    if not np.array_equal(dequantize(blocks, t, (rows, cols)), want):
        return None
    return t, blocks


TERNARY_TYPES = ("TQ2_0", "TQ1_0")


def ternary_candidates(ternary_type: str, cols: int) -> list[str]:
    """ggml types that may hold a ternary weight exactly, best first: the TQ type when the row is a
    multiple of 256 (llama.cpp's rule), then Q8_0 (32-blocks; exact when scale / 127 is an fp16
    number, nn/bitlinear.gguf_scale), then F16 (exact for any fp16 scale)."""
    t = ternary_type.upper()
    if t not in TERNARY_TYPES:
        raise LowbitError(f"GGUF export: ternary_type {ternary_type!r}: expected one of {', '.join(TERNARY_TYPES)}")
    return [x for x in (t, "Q8_0") if ggml_type(x).fits(cols)] + ["F16"]


def ggml_from_ternary(qw, ternary_type: str = "TQ2_0") -> tuple[str, np.ndarray, float]:
    """(ggml type, blocks (rows, row_bytes), relative RMS error) for a ternary QuantizedWeight: the
    first of ternary_candidates() that decodes back to exactly qw.dequantize() (error 0.0), else the
    first candidate re-encoded, with its error (never silently: the report lists it)."""
    from lowbit.numerics.ggml import dequantize
    w = np.ascontiguousarray(qw.dequantize().numpy(), dtype=np.float32)
    cands = ternary_candidates(ternary_type, w.shape[1])
    for t in cands:
        if t == "F16":
            blocks = w.astype(np.float16)
            back = blocks.astype(np.float32)
        else:
            blocks = quantize(w, t)
            back = dequantize(blocks, t, w.shape)
        if np.array_equal(back, w):
            return t, blocks, 0.0
    t = cands[0]
    blocks = quantize(w, t)
    err = float(np.sqrt(np.mean((dequantize(blocks, t, w.shape) - w) ** 2)) / max(1e-30, np.sqrt(np.mean(w ** 2))))
    return t, blocks, err


def _weight_bytes(qw, hf_name: str, reencode: str | None, report: GGUFReport,
                  ternary_type: str = "TQ2_0") -> tuple[str, str, np.ndarray]:
    """(wanted, used, blocks in HF row order) for one quantized module's weight."""
    from lowbit.numerics.ggml.weight import GGMLWeight
    if isinstance(qw, GGMLWeight):
        return qw.wanted, qw.type, qw.data.numpy()
    if qw.scheme.format == "ternary":
        used, blocks, err = ggml_from_ternary(qw, ternary_type)
        if err == 0.0:
            report.exact.append(hf_name)
        else:
            report.reencoded.append({"name": hf_name, "scheme": qw.scheme.short_name(), "type": used,
                                     "rel_rms_error": err})
        return ternary_type.upper(), used, blocks
    exact = ggml_from_int(qw)
    if exact is not None:
        report.exact.append(hf_name)
        return exact[0], exact[0], exact[1]
    if qw.scheme.format != "int":
        raise LowbitError(f"GGUF export: {hf_name} has scheme {qw.scheme.short_name()} (format "
                          f"{qw.scheme.format}); GGUF holds ggml types and int grids it can re-encode")
    wanted = (reencode or REENCODE[qw.scheme.bits]).upper()
    used = fallback_type(wanted, qw.shape[1])
    w = np.ascontiguousarray(qw.dequantize().numpy(), dtype=np.float32)
    blocks = quantize(w, used, name=hf_name)
    from lowbit.numerics.ggml import dequantize
    err = float(np.sqrt(np.mean((dequantize(blocks, used, w.shape) - w) ** 2)) / max(1e-30, np.sqrt(np.mean(w ** 2))))
    report.reencoded.append({"name": hf_name, "scheme": qw.scheme.short_name(), "type": used,
                             "rel_rms_error": err})
    return wanted, used, blocks


def write_quantized(qm, out: str | Path, *, source_gguf: str | Path | None = None,
                    tokenizer_pre: str | None = None, reencode: str | None = None, overwrite: bool = False,
                    progress: bool = False, max_shard_size=None, ternary_type: str = "TQ2_0") -> GGUFReport:
    """Write a QuantizedModel as GGUF v3 (module docstring: what each tensor becomes).

    source_gguf: the GGUF the model came from (its general.* and tokenizer.* keys are copied;
    default: the provenance's source when it is a GGUF). reencode: the ggml type for int weights
    that are not exactly one (default by bit width, REENCODE). ternary_type: TQ2_0 or TQ1_0 for
    ternary weights (ggml_from_ternary: rows not a multiple of 256 take Q8_0 or F16, exactly)."""
    ternary_candidates(ternary_type, 256)                 # a bad option fails before any work
    from lowbit.export.common import check_output
    from lowbit.export.manifest import provenance, write_sidecar
    if max_shard_size is not None:
        raise LowbitError("GGUF export: max_shard_size is not supported (one file; llama.cpp's gguf-split splits it)")
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite, single_file=True)
    model, config = qm.model, qm.model.config
    spec = arch_spec(config.model_type)
    facts = model_facts(config)
    names = NameMap(spec.gguf_arch, facts["n_layers"])
    if source_gguf is None:
        source_gguf = _source_gguf(qm)
    params = _logical_tensors(model, qm)
    emb, head = params.get("model.embed_tokens.weight"), params.get("lm_head.weight")
    if "lm_head" not in qm.qweights and head is not None and emb is not None and head.data_ptr() == emb.data_ptr():
        params.pop("lm_head.weight")     # tied: token_embd serves as the output, as llama.cpp stores it
    recipe = qm.recipe if qm.recipe is not None else Recipe("custom", [])
    report = GGUFReport(out, recipe)
    with _Blobs(out if getattr(qm, "lazy", False) else None) as data:
        _plan_and_encode(qm, params, names, facts, spec, reencode, report, ternary_type, data)
        _write_file(qm, out, config, spec, recipe, report, data, source_gguf, tokenizer_pre, progress)
    report.seconds = time.perf_counter() - t0
    report.file_bytes = out.stat().st_size
    im_meta = qm.provenance.get("imatrix") or {}
    man = provenance(qm, "gguf", extra={"gguf": {
        "tensors": {r.name: {"hf": r.hf_name, "wanted": r.wanted, "used": r.used} for r in report.tensors},
        "exact_int": report.exact, "reencoded": report.reencoded, "imatrix": im_meta}})
    write_sidecar(out, man)
    return report


class _Blobs:
    """The encoded tensors between encoding and writing (the header, which lists them all, is
    written first): in memory, or for a layer-by-layer conversion (QuantizedModel.lazy) in a
    spool file beside the output (.NAME.tmp<pid>-blobs), appended as each is encoded and read back one at a time while
    the file is written, so only one tensor is ever held. The spool is deleted on the way out."""

    def __init__(self, out: Path | None):
        self.mem: dict[str, np.ndarray] = {}
        self.where: dict[str, tuple[int, np.dtype, tuple]] = {}
        # named as lowbit.io's temporaries (.NAME.tmp<pid>-...): a killed run's spool is deleted by
        # the next write of the same output (io.clean_stale)
        from lowbit.io import tmp_prefix
        self.path = None if out is None else out.parent / f"{tmp_prefix(out)}blobs"
        self.fh = None

    def __enter__(self):
        if self.path is not None:
            self.fh = open(self.path, "w+b")
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()
            self.path.unlink(missing_ok=True)

    def __setitem__(self, name: str, blob: np.ndarray) -> None:
        if self.fh is None:
            self.mem[name] = blob
            return
        self.where[name] = (self.fh.tell(), blob.dtype, blob.shape)
        self.fh.write(memoryview(np.ascontiguousarray(blob)).cast("B"))

    def pop(self, name: str) -> np.ndarray:
        if self.fh is None:
            return self.mem.pop(name)
        off, dt, shape = self.where.pop(name)
        self.fh.flush()
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        return np.fromfile(self.fh.name, dtype=dt, count=n, offset=off).reshape(shape)


def _plan_and_encode(qm, params: dict, names, facts: dict, spec, reencode, report: GGUFReport,
                     ternary_type: str, data: _Blobs) -> None:
    """Every tensor's ggml type and bytes (report.tensors, in file order), its blob into `data`."""
    for hf_name, p in params.items():
        module = module_of(hf_name)
        shape = tuple(p.shape)
        gname = names.to_gguf(hf_name)
        if module in qm.qweights and hf_name.endswith(".weight"):
            wanted, used, blob = _weight_bytes(qm.qweights[module], hf_name, reencode, report, ternary_type)
            im = bool(qm.qweights[module].info.get("imatrix", False)) if hasattr(qm.qweights[module], "info") else False
        else:
            a = p.detach().float().cpu().numpy()
            if not np.isfinite(a).all():
                raise LowbitError(f"GGUF export: tensor {hf_name} contains NaN/inf; refusing to write it")
            wanted = "F32" if len(shape) < 2 else "F16"
            used = wanted if len(shape) < 2 else fallback_type("F16", shape[-1])
            blob, im = (a.astype(np.float32) if used == "F32" else a.astype(np.float16)), False
        heads = qk_heads(hf_name, facts["n_head"], facts["n_head_kv"]) if spec.permute_qk else None
        if heads is not None:
            blob = permute_qk(blob, heads)
        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        report.tensors.append(TensorRow(gname, hf_name, shape, wanted, used,
                                        n_rows * ggml_type(used).row_bytes(shape[-1]), im))
        data[gname] = np.ascontiguousarray(blob)


def _write_file(qm, out: Path, config, spec, recipe: Recipe, report: GGUFReport, data: _Blobs, source_gguf,
                tokenizer_pre, progress: bool) -> None:
    import gguf

    from lowbit.export.gguf.vocab import add_hf_tokenizer, kv_from_gguf
    from lowbit.io import atomic_path
    quantized = any(r.used not in ("F32", "F16", "BF16") for r in report.tensors)
    im_meta = qm.provenance.get("imatrix") or {}
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch=spec.gguf_arch)
        _general(w, config, source_gguf, _file_type(recipe), quantized)
        _hparams(w, config, spec)
        if source_gguf is not None and tokenizer_pre is None:
            for key, val, vt, sub in kv_from_gguf(source_gguf):
                w.add_key_value(key, val, vt, sub)
        else:
            add_hf_tokenizer(w, qm.source_dir, int(config.vocab_size), tokenizer_pre)
        if im_meta:
            w.add_string("quantize.imatrix.file", str(im_meta.get("file") or "lowbit"))
            if im_meta.get("dataset"):
                w.add_string("quantize.imatrix.dataset", im_meta["dataset"])
            w.add_int32("quantize.imatrix.entries_count", int(im_meta.get("entries", 0)))
            w.add_int32("quantize.imatrix.chunks_count", int(im_meta.get("chunks", 0)))
        for r in report.tensors:
            gt = gguf.GGMLQuantizationType[r.used]
            if r.used == "F32":
                w.add_tensor_info(r.name, r.shape, np.dtype(np.float32), r.nbytes)
            elif r.used == "F16":
                w.add_tensor_info(r.name, r.shape, np.dtype(np.float16), r.nbytes)
            else:
                byte_shape = (*r.shape[:-1], r.nbytes // max(1, int(np.prod(r.shape[:-1]))))
                w.add_tensor_info(r.name, byte_shape, np.dtype(np.uint8), r.nbytes, raw_dtype=gt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        it = report.tensors
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=f"gguf {recipe.name}", unit="tensor")
        for r in it:
            w.write_tensor_data(data.pop(r.name))
        w.close()


def _logical_tensors(model, qm) -> dict:
    """The model's tensors by their float names, in state_dict order: a quantized module stands
    for `<module>.weight` (its QuantizedWeight / GGMLWeight) and its bias, not its buffers."""
    out: dict = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in qm.qweights and qm.kinds.get(owner) == "linear":
            if f"{owner}.weight" not in out:
                # a lazy model's layers are read or made when asked for: its skeleton has the shape
                shape = (tuple(model.get_submodule(owner).weight.shape) if getattr(qm, "lazy", False)
                         else qm.qweights[owner].shape)
                out[f"{owner}.weight"] = _Shape(shape)
                b = qm.bias(owner)
                if b is not None:
                    out[f"{owner}.bias"] = b
            continue
        out[key] = value
    return out


class _Shape:
    """Stands for a quantized weight in the tensor plan: only its shape is read."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _source_gguf(qm) -> Path | None:
    from lowbit.models.registry import BUILTIN_MODELS
    src = str((qm.provenance.get("source") or {}).get("model", ""))
    if src in BUILTIN_MODELS:
        try:
            return BUILTIN_MODELS[src].gguf_path()
        except LowbitError:
            return None
    p = Path(src)
    return p if p.is_file() and p.suffix.lower() == ".gguf" else None


def write_gguf(model, out: str | Path, recipe: Recipe | str = "q4_k_m", *, hf_dir: str | Path | None = None,
               imatrix=None, imatrix_file: str | None = None, source_gguf: str | Path | None = None,
               tokenizer_pre: str | None = None, refine: bool = False, progress: bool = True,
               overwrite: bool = True) -> GGUFReport:
    """Quantize a copy of `model` (float weights) by `recipe` with api.quantize, then write it
    (write_quantized). hf_dir: the model's HF directory (config and tokenizer files);
    source_gguf: the GGUF it came from, whose tokenizer.* / general.* keys are copied.
    imatrix: an Imatrix keyed by GGUF tensor names (or a file). refine: lowbit's block
    refinement on tensors that have an imatrix (the bytes then differ from llama.cpp's)."""
    import copy

    from lowbit import api
    from lowbit.export import QuantizedModel
    from lowbit.models.base import LoadedModel
    from lowbit.presets.gguf_mixes import with_refine
    r = with_refine(get_recipe(recipe)) if refine else get_recipe(recipe)
    if hf_dir is None:
        raise LowbitError("GGUF export: need hf_dir (the model's config and tokenizer files)")
    m = copy.deepcopy(model)
    rep = api.quantize(m, r, progress=False, imatrix=imatrix)
    if imatrix_file and rep.imatrix:
        rep.imatrix["file"] = str(imatrix_file)
    lm = LoadedModel(m, None, Path(hf_dir), str(source_gguf or hf_dir))
    qm = QuantizedModel.from_report(lm, rep)
    qm.provenance["imatrix"] = dict(rep.imatrix)
    try:
        return write_quantized(qm, out, source_gguf=source_gguf, tokenizer_pre=tokenizer_pre,
                               overwrite=overwrite, progress=progress)
    finally:
        del m, qm


def export_gguf(source, out: str | Path, type: str | Recipe = "q4_k_m", *, imatrix=None,
                tokenizer_pre: str | None = None, refine: bool = False, progress: bool = True,
                overwrite: bool = True) -> GGUFReport:
    """lowbit export's GGUF path for a float model: a model name / .gguf / HF dir (or a
    LoadedModel) -> quantized by the mix `type` (imatrix: an Imatrix or a file) -> GGUF file."""
    from lowbit.models import LoadedModel, load_model
    from lowbit.models.load import resolve_source
    loaded = source if isinstance(source, LoadedModel) else load_model(source)
    kind, path = resolve_source(loaded.source)
    im_file = str(imatrix) if isinstance(imatrix, (str, Path)) else None
    return write_gguf(loaded.model, out, type, hf_dir=loaded.path, imatrix=imatrix, imatrix_file=im_file,
                      source_gguf=path if kind == "gguf" else None, tokenizer_pre=tokenizer_pre,
                      refine=refine, progress=progress, overwrite=overwrite)
