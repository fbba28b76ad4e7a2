"""Streaming quantization: a checkpoint larger than memory, quantized tensor by tensor.

    quantize_streaming("path/to/hf_dir", "w4g128-rtn", "out/dir")     # lowbit quantize --stream

The float model never exists: its skeleton is built on the meta device (names, shapes, which
modules the recipe targets), each source tensor is read on its own from the safetensors shards
(models/shards.py: pread, no memory map), quantized by the recipe's data-free method exactly as
api.quantize does, turned into the native format's tensors (export/native.py), and written as
soon as its output shard is complete. Output names are written in sorted order (the order
save_safetensors uses), which visits one decoder block after another, so peak memory is one
output shard plus one layer's temporaries: set by max_shard_size (default 1GB here).

The output is the native format, byte for byte what the in-memory path (load_model, quantize,
export with the same max_shard_size) writes for the same source. Calibrated recipes (gptq, awq,
signround) are streamed one decoder block at a time by streaming_calibrated.py. A rotation
(transforms rotate) is applied as each tensor is read (rotated_source).
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from lowbit.errors import LowbitError

STREAM_MAX_SHARD = "1GB"
# formats a streamed run converts its native output to, layer by layer (export.native.convert),
# byte-identical to the in-memory export (tests/test_streaming.py)
STREAM_CONVERTED = ("gptq", "awq", "compressed-tensors", "gguf", "onnx")


def _plan_layer(name: str, shape: tuple[int, int], scheme) -> dict[str, tuple[tuple, torch.dtype]]:
    """The native tensors a quantized linear becomes, by shape and dtype, before any data."""
    from lowbit.export.native import PACKED_BITS
    rows, cols = shape
    bits = scheme.code_bits
    out = {}
    if bits in PACKED_BITS:
        out[f"{name}.weight_packed"] = ((rows, -(-cols * bits // 8)), torch.uint8)
    else:
        out[f"{name}.weight_codes"] = ((rows, cols), torch.uint8)
    qshape = {"tensor": (1, 1), "channel": (rows, 1), "group": (rows, -(-cols // max(1, scheme.group_size)))}
    if scheme.granularity not in qshape:
        raise LowbitError(f"streaming: layer {name}: granularity {scheme.granularity!r} is not streamed")
    out[f"{name}.weight_scale"] = (qshape[scheme.granularity], torch.float16)
    # a zero point is stored whenever the scheme's codec gives one: symmetric int grids give their
    # fixed midpoint (8 at 4 bits), written like any other zero
    from lowbit.numerics.affine import qparams_from_range
    probe = qparams_from_range(torch.full((1, 1), -1.0), torch.full((1, 1), 1.0), scheme)
    if probe.zero is not None:
        out[f"{name}.weight_zero_point"] = (qshape[scheme.granularity], torch.uint8)
    return out


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def quantize_streaming(source: str | os.PathLike, recipe, out: str | os.PathLike, *,
                       max_shard_size: str | int | None = None, overwrite: bool = False,
                       dtype: torch.dtype = torch.float32, log=None, tokens: torch.Tensor | None = None,
                       calibration: dict | None = None, state_dir=None, keep_state: bool = False,
                       format: str = "native", metrics: dict | None = None, imatrix=None) -> Path:
    """Quantize the Hugging Face directory `source` by `recipe` into a native directory.
    Calibrated recipes go block by block (streaming_calibrated.py): tokens / calibration as in
    api.quantize; state_dir holds the finished blocks and is the resume state (default
    .OUT.resume beside `out`), deleted at the end unless keep_state. Another `format`: see
    _stream_then_convert. metrics: recorded in the manifest (the CLI's budget plan).
    max_shard_size: default STREAM_MAX_SHARD for native, the format's own default otherwise.
    imatrix: for a recipe of ggml types into a GGUF (streaming_gguf.py)."""
    if format != "native":
        return _stream_then_convert(source, recipe, out, format, max_shard_size=max_shard_size,
                                    overwrite=overwrite, dtype=dtype, log=log, tokens=tokens,
                                    calibration=calibration, state_dir=state_dir, keep_state=keep_state,
                                    metrics=metrics, imatrix=imatrix)
    if imatrix is not None:
        raise LowbitError("streaming: an imatrix applies to recipes of ggml types streamed with --format gguf")
    if max_shard_size is None:
        max_shard_size = STREAM_MAX_SHARD
    import time

    from lowbit.api import QuantizeReport, _note_ragged, layer_row, quantize_targets
    from lowbit.calibration.paused import trim_heap
    from lowbit.export.common import (copy_model_files, empty_model, output_dir, shard_plan, tie_by_config,
                                      write_index, write_shard)
    from lowbit.export.manifest import provenance, write_manifest
    from lowbit.export.native import FORMAT, FORMAT_VERSION, MANIFEST, _layer_tensors
    from lowbit.methods import get_method
    from lowbit.recipe import get_recipe

    log = log or (lambda _m: None)
    recipe = get_recipe(recipe)
    from lowbit.export.common import check_output
    src, files, source_sha = open_source(source)
    check_output(out, overwrite)
    float_files = files                # the -ft teacher: the float model before any rotation
    files, transformed, untied = rotated_source(files, src, recipe, dtype)
    skeleton = empty_model(src, dtype)
    if untied:                         # the rotated model's lm_head is its own tensor
        skeleton.config.tie_word_embeddings = False
    tie_by_config(skeleton)            # a tied lm_head is the embedding, as the loaded model has it
    targets = quantize_targets(skeleton, recipe)
    if not targets:
        raise LowbitError(f"recipe {recipe.name!r}: matched no module of this model")
    from lowbit.transforms import block_level_names
    calibrated = any(get_method(r.method).needs for _, _, r in targets) or any(
        t.get("name") in block_level_names() for t in recipe.transforms)
    if calibrated or recipe.finetune:        # -ft needs the block loop's state (data-free: as without calibration)
        from lowbit.streaming_calibrated import quantize_streaming_calibrated
        return quantize_streaming_calibrated(src, source, recipe, out, tokens=tokens, calibration=calibration,
                                             max_shard_size=max_shard_size, overwrite=overwrite, dtype=dtype,
                                             log=log, state_dir=state_dir, keep_state=keep_state,
                                             files=files, source_sha=source_sha, transformed=transformed,
                                             untied=untied, metrics=metrics, teacher_files=float_files,
                                             data_free=not calibrated)
    for name, mod, rule in targets:
        if isinstance(mod, torch.nn.Embedding) or rule.scheme.format != "int" or not isinstance(mod, torch.nn.Linear):
            from lowbit.numerics.scheme import GGUF_FORMATS
            hint = " (ggml types: stream with --format gguf)" if rule.scheme.format in GGUF_FORMATS else ""
            raise LowbitError(f"streaming: layer {name}: only integer schemes on nn.Linear are streamed into the "
                              f"native format{hint}")
    t_start = time.perf_counter()
    qnames = {n for n, _, _ in targets}
    rules = {n: r for n, _, r in targets}
    # every output tensor by name: (shape, dtype, producer)
    plan: dict[str, tuple] = {}
    for name, mod, rule in targets:
        for k, (shape, dt) in _plan_layer(name, (mod.out_features, mod.in_features), rule.scheme).items():
            plan[k] = (shape, dt, name)
        if mod.bias is not None:
            plan[f"{name}.bias"] = (tuple(mod.bias.shape), dtype, name)
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, value in skeleton.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in qnames:
            continue
        if id(value) in seen:
            tied[key] = seen[id(value)]
            continue
        seen[id(value)] = key
        plan[key] = (tuple(value.shape), dtype if value.is_floating_point() else value.dtype, None)
    names = sorted(plan)
    sizes = {k: _nbytes(plan[k][0], plan[k][1]) for k in names}
    report = QuantizeReport(recipe, notes=list(transformed))
    layers: dict[str, dict] = {}
    ready: dict[str, torch.Tensor] = {}

    def produce(key: str) -> None:
        layer = plan[key][2]
        if layer is None:
            t = files.read(key) if key in files else None
            if t is None:
                raise LowbitError(f"{src}: tensor {key} is missing")
            if tuple(t.shape) != plan[key][0]:
                raise LowbitError(f"{src}: tensor {key} has shape {tuple(t.shape)}, config.json implies "
                                  f"{plan[key][0]}")
            t = t.to(plan[key][1]) if t.is_floating_point() else t
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LowbitError(f"tensor {key}: contains NaN/inf; refusing to write a broken model")
            ready[key] = t.contiguous()
            return
        rule = rules[layer]
        qw = quantize_from_source(files, layer, rule, dtype, key=weight_key(skeleton, layer, files))
        t, row = _layer_tensors(layer, qw)
        row["kind"] = "linear"
        row["method"] = rule.method
        if f"{layer}.bias" in plan:
            t[f"{layer}.bias"] = files.read(f"{layer}.bias").to(dtype).contiguous()
        for k, v in t.items():
            if k not in plan or (tuple(v.shape), v.dtype) != plan[k][:2]:
                raise LowbitError(f"streaming: {k} came out {v.dtype} {tuple(v.shape)}, planned "
                                  f"{plan.get(k, (None, None))[1]} {plan.get(k, (None,))[0]} (scales not "
                                  "fp16? stream with the in-memory path instead)")
            ready[k] = v
        layers[layer] = row
        report.layers.append(layer_row(layer, qw, rule.method))

    from lowbit.streaming_activations import activation_rules
    wanted = activation_rules(recipe, [n for n, _, _ in targets])
    act_rows = _data_free_activations(src, files, recipe, rules, wanted, tokens, calibration, dtype, log) \
        if wanted else {}
    shards = shard_plan(sizes, max_shard_size)       # exactly as save_safetensors splits them
    with output_dir(out, overwrite) as tmp:
        for i, keys in enumerate(shards):
            for k in keys:
                if k not in ready:
                    produce(k)
            part = {k: ready.pop(k) for k in keys}
            write_shard(part, tmp, i, len(shards))
            log(f"shard {i + 1}/{len(shards)}: {len(keys)} tensors")
            del part
            trim_heap()        # hand freed pages back (glibc keeps them otherwise: RSS creeps up)
        if len(shards) > 1:
            write_index(tmp, shards, sizes)
        if ready:
            raise LowbitError(f"streaming: tensors produced but not planned: {sorted(ready)[:5]}")
        order = {n: i for i, (n, _, _) in enumerate(targets)}
        report.layers.sort(key=lambda r: order[r["name"]])
        _note_ragged(report)
        qm = SimpleNamespace(recipe=recipe, qweights={}, provenance={
            "source": {"model": str(source), "sha256": source_sha}, "calibration": {},
            "notes": list(report.notes), "layers": {}, "metrics": dict(metrics or {})})
        rows = {n: layers[n] for n, _, _ in targets}
        add_activation_rows(rows, report.layers, act_rows)
        manifest = provenance(qm, FORMAT, rows, {"format_version": FORMAT_VERSION, "tied": tied})
        copy_model_files(src, tmp, stream_config(src, untied))
        write_manifest(tmp, manifest, MANIFEST)
    log(f"streamed {len(targets)} layer(s) in {time.perf_counter() - t_start:.1f} s -> {out}")
    return Path(out)


def _data_free_activations(src: Path, files, recipe, rules: dict, wanted: dict, tokens, calibration,
                           dtype: torch.dtype, log) -> dict[str, dict]:
    """A data-free run's static input scales (streaming_activations): the embedding read into a
    skeleton, each block re-quantized from the source for the pass."""
    from lowbit.export.common import empty_model
    from lowbit.streaming_activations import needs_pass, requantized_blocks, stream_activations
    if not needs_pass(wanted):
        return stream_activations(None, recipe, wanted, None, 0, None)
    from lowbit.arch import spec_for
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.errors import check_context
    model = empty_model(src, dtype)
    prefix = spec_for(model).blocks
    head = f"{spec_for(model).lm_head}."
    read_outside_blocks(model, files, prefix, dtype, str(src), skip=lambda key: key.startswith(head))
    cfg = CalibrationConfig.from_dict({**recipe.calibration, **(calibration or {})})
    if tokens is None:
        from lowbit.models import load_tokenizer
        tokens = calibration_tokens(load_tokenizer(src), cfg)
    check_context(model.config, int(tokens.shape[1]), "calibration seq_len")
    log(f"input activations: {len(wanted)} layer(s), {tokens.shape[0]} x {tokens.shape[1]} tokens")
    return stream_activations(model, recipe, wanted, tokens, cfg.batch_size,
                              requantized_blocks(files, str(src), model, prefix, rules, dtype), log)


def add_activation_rows(rows: dict, report_rows: list[dict], act_rows: dict) -> None:
    """The input-activation results into the manifest's layer rows (a static scale, as
    export/native.py writes it) and the report's."""
    for name, r in act_rows.items():
        if r.get("input_scale") is not None:
            rows[name]["input_scale"] = float(r["input_scale"])
    for row in report_rows:
        row.update({k: v for k, v in act_rows.get(row["name"], {}).items() if k != "input_scheme"})


def rotated_source(files, src: Path, recipe, dtype: torch.dtype) -> tuple[object, list[str], bool]:
    """The recipe's model-level transforms on a streamed source: a rotation (the only one there is)
    is applied to each tensor as it is read (transforms/rotate.py RotatedSource), with the values
    rotate_model gives the whole model. -> (tensor source, the report's transform lines, whether
    the rotation untied lm_head from the embedding)."""
    from lowbit.api import transform_note
    from lowbit.export.common import empty_model
    from lowbit.transforms import make_transforms
    model_level = make_transforms(recipe.transforms)
    if not model_level:
        return files, [], False
    if [name for name, _, _ in model_level] != ["rotate"]:
        raise LowbitError(f"streaming: recipe {recipe.name!r}: model-level transforms "
                          f"{[name for name, _, _ in model_level]}: only one rotate is streamed")
    from lowbit.transforms.rotate import RotatedSource
    rs = RotatedSource(files, empty_model(src, dtype), model_level[0][2], dtype, str(src))
    return rs, [transform_note({"transform": "rotate", **rs.info})], bool(rs.info["untied_lm_head"])


def stream_config(src: Path, untied: bool) -> dict:
    """The output's config.json: the source's, saying tie_word_embeddings false where a rotation
    untied lm_head (as export.common.source_config writes it for the in-memory path)."""
    import json
    cfg = json.loads((Path(src) / "config.json").read_text())
    if untied and cfg.get("tie_word_embeddings", True):
        cfg["tie_word_embeddings"] = False
    return cfg


def read_block(model, files, base: str, block, dtype: torch.dtype, where: str, check_finite: bool = True) -> None:
    """Fill `block` (the skeleton's module at `base`) with its tensors from `files`, the ones it
    still has on the meta device, floating ones as `dtype`."""
    from lowbit.export.common import set_tensor
    for full, v in source_floats(model, files, base, dtype, where).items():
        set_tensor(model, full, v, where, check_finite)


def source_floats(model, files, base: str, dtype: torch.dtype, where: str, skip=()) -> dict:
    """The tensors of the skeleton's module `base` still on the meta device, read from `files`, by
    full name, floating ones as `dtype`; the weights of the layers in `skip` (quantized) left out."""
    out = {}
    for key, t in model.get_submodule(base).state_dict(keep_vars=True).items():
        full = f"{base}.{key}"
        owner, _, leaf = full.rpartition(".")
        if not t.is_meta or (owner in skip and leaf == "weight"):
            continue
        if full not in files:
            raise LowbitError(f"{where}: tensor {full} is missing")
        v = files.read(full)
        out[full] = v.to(dtype) if v.is_floating_point() else v
    return out


def read_outside_blocks(model, files, prefix: str, dtype: torch.dtype, where: str, skip=None) -> None:
    """Fill the skeleton's tensors outside the decoder blocks (embedding, final norm, lm_head)
    that are still on the meta device from `files`; skip(key) leaves one out."""
    from lowbit.export.common import set_tensor
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(prefix + ".") or not t.is_meta or (skip is not None and skip(key)):
            continue
        if key not in files:
            raise LowbitError(f"{where}: tensor {key} is missing")
        v = files.read(key)
        set_tensor(model, key, v.to(dtype) if v.is_floating_point() else v, where)


def weight_key(model: torch.nn.Module, layer: str, files) -> str:
    """The key `layer`'s weight is read under from `files`: its own, or for an output head tied to
    the embedding in the config (a tied checkpoint holds the tensor once) the embedding's."""
    own = f"{layer}.weight"
    if own in files or not getattr(model.config, "tie_word_embeddings", False):
        return own
    emb = model.get_input_embeddings()
    if model.get_submodule(layer) is model.get_output_embeddings() and emb is not None:
        for name, mod in model.named_modules():
            if mod is emb:
                return f"{name}.weight"
    return own


def quantize_from_source(files, layer: str, rule, dtype: torch.dtype, stats: dict | None = None,
                         key: str | None = None):
    """Layer `layer`'s weight read from `files` (under `key`, default its own; weight_key) and
    quantized by its rule's data-free method, the error naming the tensor (as api.quantize does)."""
    from lowbit.methods import get_method
    spec = get_method(rule.method)
    w = files.read(key or f"{layer}.weight").to(dtype)
    try:
        return spec.fn(w, rule.scheme, spec.make_config(rule.method_args), stats)
    except LowbitError as e:
        raise LowbitError(f"{layer}.weight: {e}") from None


def open_source(source) -> tuple[Path, object, str | None]:
    """A float checkpoint to stream -> (config dir, tensor source, source sha256).
    A Hugging Face directory is read from its safetensors shards (models/shards.py). A GGUF
    (a path or a built-in name) is read tensor by tensor from the file itself
    (models/gguf_source.py), its config and tokenizer from a cached weightless directory; the
    sha256 is the GGUF's, as the in-memory path records it."""
    from lowbit.models import resolve_source
    from lowbit.models.shards import SafetensorsSource
    kind, src = resolve_source(source)
    if kind == "gguf":
        from transformers import AutoConfig

        from lowbit.models.gguf_source import GGUFSource, gguf_meta_dir
        meta, digest = gguf_meta_dir(src)
        return meta, GGUFSource(src, AutoConfig.from_pretrained(meta)), digest
    from lowbit.export import _source_sha256, detect_format
    if detect_format(src) is not None:
        raise LowbitError(f"streaming: {src} is already a quantized output")
    return src, SafetensorsSource(src), _source_sha256(src)


def _stream_then_convert(source, recipe, out, format: str, *, max_shard_size, overwrite: bool, log,
                         state_dir, **kw) -> Path:
    """Any other output format: stream into a native directory beside `out` (.OUT.native), then
    write it through the export layer's writer for that format (the same bytes as the in-memory
    path), then delete it. Every format is converted layer by layer (native.convert: the float
    tensors, one quantized layer and the shard being written are in memory; 1 GB shards unless
    max_shard_size says otherwise; gguf and onnx, one weights file each, write or spool each
    tensor as it is made). The float model never exists."""
    import shutil

    from lowbit.export import get_format
    from lowbit.export.common import check_output
    fmt = get_format(format)
    from lowbit.presets.gguf_mixes import is_ggml_recipe
    from lowbit.recipe import get_recipe
    imatrix = kw.pop("imatrix", None)
    if fmt.name == "gguf" and is_ggml_recipe(get_recipe(recipe)):
        # ggml block types: no native spool can hold them, so straight into the GGUF
        from lowbit.streaming_gguf import stream_gguf
        if max_shard_size is not None:
            raise LowbitError("GGUF export: max_shard_size is not supported (one file; llama.cpp's gguf-split splits it)")
        return stream_gguf(source, recipe, out, overwrite=overwrite, dtype=kw.get("dtype", torch.float32),
                           log=log, metrics=kw.get("metrics"), imatrix=imatrix, tokens=kw.get("tokens"),
                           calibration=kw.get("calibration"), state_dir=state_dir,
                           keep_state=kw.get("keep_state", False))
    if imatrix is not None:
        raise LowbitError("streaming: an imatrix applies to recipes of ggml types streamed with --format gguf")
    if fmt.name not in STREAM_CONVERTED:
        raise LowbitError(f"streaming: --format {fmt.name} is not streamed (converted: native, "
                          f"{', '.join(STREAM_CONVERTED)}); stream the native format, then `lowbit export` it")
    out = Path(out)
    check_output(out, overwrite, single_file=bool(fmt.suffix))
    spool = out.parent / f".{out.name}.native"
    state = Path(state_dir) if state_dir else out.parent / f".{out.name}.resume"
    # overwrite=True replaces only an earlier lowbit output there (a run killed while converting)
    quantize_streaming(source, recipe, spool, max_shard_size=STREAM_MAX_SHARD, overwrite=True, log=log,
                       state_dir=state, **kw)
    from lowbit.export.native import convert
    from lowbit.models import resolve_source
    try:
        # the config's path is the source's, as load_model gives it (gguf's general.name is read from it)
        path = convert(spool, out, fmt.name, overwrite=overwrite, max_shard_size=max_shard_size,
                       name_or_path=str(resolve_source(source)[1]))
    except LowbitError as e:             # the streamed work is kept: it may have taken hours
        raise LowbitError(f"{e}. The streamed native output is kept at {spool}: convert it with "
                          f"`lowbit export {spool} --format ...`, or delete it") from None
    shutil.rmtree(spool)
    if log:
        log(f"converted the streamed native output to {fmt.name} -> {path}")
    return path
