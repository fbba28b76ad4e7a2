"""Write a Hugging Face causal LM as a GGUF v3 file that llama.cpp loads as its own.

    report = write_gguf(model, "out.gguf", recipe="q4_k_m", hf_dir=..., imatrix=im, source_gguf=...)

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
    m = MIXES.get(recipe.name)
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
        r = gguf.GGUFReader(source_gguf)
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


def write_gguf(model, out: str | Path, recipe: Recipe | str = "q4_k_m", *, hf_dir: str | Path | None = None,
               imatrix=None, imatrix_file: str | None = None, source_gguf: str | Path | None = None,
               tokenizer_pre: str | None = None, refine: bool = False, progress: bool = True) -> GGUFReport:
    """Quantize `model` (an HF causal LM, float weights) by `recipe` and write GGUF v3 to `out`.

    hf_dir: the model's HF directory (tokenizer files); source_gguf: the GGUF it came from, whose
    tokenizer.* / general.* keys are copied. imatrix: an Imatrix keyed by GGUF tensor names.
    Each fallback (a type whose block does not divide the row) is listed in the report.
    refine: run lowbit's block refinement (refine.py) on tensors that have an imatrix; the file
    then differs from llama.cpp's own quantization (lower weighted error, same types and layout).
    """
    import gguf
    from lowbit.io import atomic_path
    from lowbit.export.gguf.vocab import add_hf_tokenizer, kv_from_gguf
    t0 = time.perf_counter()
    config = model.config
    spec = arch_spec(config.model_type)
    facts = model_facts(config)
    recipe = resolve_recipe(recipe, config, imatrix is not None)
    params, rows = plan_tensors(model, recipe, imatrix)
    quantized = any(r.used not in ("F32", "F16", "BF16") for r in rows)
    out = Path(out)
    report = GGUFReport(out, recipe, rows)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch=spec.gguf_arch)
        _general(w, config, source_gguf, _file_type(recipe), quantized)
        _hparams(w, config, spec)
        if source_gguf is not None and tokenizer_pre is None:
            for key, val, vt, sub in kv_from_gguf(source_gguf):
                w.add_key_value(key, val, vt, sub)
        else:
            if hf_dir is None:
                raise LowbitError("GGUF export: need hf_dir (tokenizer files) or source_gguf")
            add_hf_tokenizer(w, hf_dir, int(config.vocab_size), tokenizer_pre)
        if imatrix is not None:
            w.add_string("quantize.imatrix.file", str(imatrix_file or "lowbit"))
            if imatrix.datasets:
                w.add_string("quantize.imatrix.dataset", imatrix.datasets[0])
            w.add_int32("quantize.imatrix.entries_count", len(imatrix.sums))
            w.add_int32("quantize.imatrix.chunks_count", int(imatrix.chunk_count))
        for r in rows:
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
        it = rows
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(rows, desc=f"gguf {recipe.name}", unit="tensor")
        for r in it:
            w.write_tensor_data(_encode(params[r.hf_name], r, facts, spec, imatrix, refine))
        w.close()
    report.seconds = time.perf_counter() - t0
    report.file_bytes = out.stat().st_size
    return report


def _encode(p, r: TensorRow, facts: dict, spec, imatrix, refine: bool = False) -> np.ndarray:
    """One tensor's GGUF bytes (or float array for F32/F16), q/k rows permuted for llama."""
    a = p.detach().float().cpu().numpy()
    heads = qk_heads(r.hf_name, facts["n_head"], facts["n_head_kv"]) if spec.permute_qk else None
    if heads is not None:
        a = permute_qk(a, heads)
    if r.used in ("F32", "F16") and not np.isfinite(a).all():
        raise LowbitError(f"{r.name}: contains NaN/inf; refusing to write it")
    if r.used == "F32":
        return np.ascontiguousarray(a, dtype=np.float32)
    if r.used == "F16":
        return np.ascontiguousarray(a, dtype=np.float16)
    a2 = a.reshape(-1, a.shape[-1])
    imp = imatrix.mean(r.name) if r.imatrix else None
    data = quantize(a2, r.used, imatrix=imp, name=r.name)
    if refine and imp is not None:
        from lowbit.methods.ggml_refine import refine as refine_blocks
        data = refine_blocks(r.used, np.ascontiguousarray(a2, dtype=np.float32), imp, data)
    return data


def export_gguf(source, out: str | Path, type: str | Recipe = "q4_k_m", *, imatrix=None,
                tokenizer_pre: str | None = None, refine: bool = False, progress: bool = True) -> GGUFReport:
    """lowbit export's GGUF path: a model name / .gguf / HF dir (or a LoadedModel) -> GGUF file.

    type: a mix name (mixes.MIXES), a recipe JSON path, or a Recipe; imatrix: an Imatrix or a path
    to an imatrix file (GGUF or legacy .dat, as llama-imatrix writes them)."""
    from lowbit.calibration.imatrix import Imatrix
    from lowbit.models import LoadedModel, load_model
    from lowbit.models.load import resolve_source
    loaded = source if isinstance(source, LoadedModel) else load_model(source)
    kind, path = resolve_source(loaded.source)
    im, im_file = imatrix, None
    if isinstance(imatrix, (str, Path)):
        im, im_file = Imatrix.load(imatrix), str(imatrix)
    return write_gguf(loaded.model, out, type, hf_dir=loaded.path, imatrix=im, imatrix_file=im_file,
                      source_gguf=path if kind == "gguf" else None, tokenizer_pre=tokenizer_pre,
                      refine=refine, progress=progress)
