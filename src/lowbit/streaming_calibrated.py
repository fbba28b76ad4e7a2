"""Streaming a calibrated recipe (GPTQ, AWQ, ...): one decoder block of the float model at a time.

    quantize_streaming("path/to/hf_dir", "w4g128-gptq", "out/dir")    # lowbit quantize --stream

The model is a skeleton on the meta device (export.common.empty_model). Only the embedding (and
the final norm; lm_head too when a rule quantizes it) is read into it. The calibration windows run
through the embedding front end, and then the calibration block loop (calibration/loop.py) runs
unchanged, except for two hooks (`blocks_io`). Just before block b is worked on, its float
weights are read from the safetensors shards (models/shards.py: pread). When block b is done, its
QuantizedWeights, its other tensors (norms: block-level transforms rewrite them) and the hidden
states entering block b+1 are written to a state directory (calibration/resume.py's layout).
Then the block is moved to the meta device. Once every block is done, the native format's shards
are written in their sorted-name order, each tensor read back from the state directory (one
block's worth cached) or from the source (embedding, final norm, lm_head). The output is byte for
byte what load_model + api.quantize + export write. The state directory is also the resume state:
a killed run restarted with the same arguments goes on after the last finished block (same key
checks as calibration/resume.py). It is deleted once the output is in place. A rotating recipe
reads through transforms/rotate.py's RotatedSource (each block rotated as it is read); block-level
methods (signround) carry the float path's hidden states beside the quantized path's, in the
state too.

Peak memory, roughly:
    one float block (fp32: 4 x its parameters) + its GPTQ temporaries (widest input d_in: the
    float64 Hessian and its one factorised copy, 2 x d_in^2 x 8 bytes) + the calibration activations (n x seq x hidden x 4 bytes, twice
    while a block runs, plus the paused batches' intermediates) + the embedding (fp32) + one
    output shard (max_shard_size) while writing.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lowbit.calibration.resume import Checkpoint, _read_block, run_key
from lowbit.errors import LowbitError


class _WithOverrides:
    """A tensor source whose tensors named in `overrides` (-ft's tuned norms and biases, once it
    has kept them) are read from there: every reader of the source sees the tuned model."""

    def __init__(self, files, overrides: dict):
        self.files, self.overrides = files, overrides

    def __contains__(self, key: str) -> bool:
        return key in self.overrides or key in self.files

    def read(self, key: str) -> torch.Tensor:
        return self.overrides[key] if key in self.overrides else self.files.read(key)

    def __getattr__(self, name: str):
        return getattr(self.files, name)


class _Stream(Checkpoint):
    """The resume state, the spool of finished blocks, and the loop's blocks_io hooks in one."""

    TUNED = "tuned"                             # the state's subdirectory of -ft's layers

    def __init__(self, path, key, model, files, src, prefix: str, dtype, native: bool = True, overrides=None):
        super().__init__(path, key)
        self.model, self.files, self.src, self.prefix, self.dtype = model, files, Path(src), prefix, dtype
        self.native = native                    # False: into a GGUF (ggml blocks; no native tensor plan)
        # layer -> (row for the report, native tensor plan, block, native manifest row)
        self.records: dict[str, tuple] = {}
        self._cache: dict[str, tuple] = {}      # kind -> (block, what block_layers / block_floats read)
        # after -ft (streaming_finetune.py): the tuned layers' files, and the tuned float tensors
        # (norms, biases) by name, which take the place of the state's and (_WithOverrides) the source's
        self.tuned = False
        self.overrides: dict[str, torch.Tensor] = {} if overrides is None else overrides

    def block_layers(self, b: int, tuned: bool | None = None) -> dict:
        """Finished block b's layers from the state (name -> its quantized weight); the last
        block asked for is kept, as the writers take a block's tensors in a row. Once -ft has
        kept its result (or with tuned=True), the tuned ones."""
        tuned = self.tuned if tuned is None else tuned
        f = self.path / (self.TUNED if tuned else "") / f"block-{b:04d}.safetensors"
        return self._spooled("tuned" if tuned else "layers", b, lambda: {n: qw for n, qw, _ in _read_block(f)})

    def block_floats(self, b: int) -> dict:
        """Finished block b's float tensors (norms, biases) from the state, by name (-ft's tuned
        values in place); {} if none."""
        from safetensors.torch import load_file
        f = self.path / f"floats-{b:04d}.safetensors"
        floats = self._spooled("floats", b, lambda: load_file(str(f)) if f.is_file() else {})
        return {k: self.overrides.get(k, t) for k, t in floats.items()}

    def _spooled(self, kind: str, b: int, read):
        if self._cache.get(kind, (None,))[0] != b:
            from lowbit.calibration.paused import trim_heap
            self._cache.pop(kind, None)          # the previous block freed first
            trim_heap()
            self._cache[kind] = (b, read())
        return self._cache[kind][1]

    # blocks_io
    def load(self, b: int, block) -> None:
        from lowbit.streaming import read_block
        read_block(self.model, self.files, f"{self.prefix}.{b}", block, self.dtype, str(self.src))

    def release(self, b: int, block) -> None:
        block.to("meta")

    def inputs_captured(self, head_needed: bool) -> None:
        """The loop has the first block's inputs: the embedding has done its work (the writing
        phase reads it from the source), unless a quantized lm_head is tied to it. Sent to the
        meta device (Llama-2-7B: 0.5 GB fp32)."""
        emb, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if head_needed and out is not None and out.weight is emb.weight:
            return
        emb.to("meta")

    # the state: every finished block's layers are recorded and dropped from memory
    def _record(self, name: str, qw, method: str, block: int) -> None:
        from lowbit.api import layer_row
        from lowbit.export.native import _layer_tensors
        from lowbit.numerics.ggml.weight import GGMLWeight
        from lowbit.numerics.qweight import QuantizedWeight
        from lowbit.numerics.vq import VQWeight
        if not self.native:
            if not isinstance(qw, GGMLWeight):
                raise LowbitError(f"streaming --format gguf: layer {name} came out a {type(qw).__name__}, "
                                  "not ggml blocks (int recipes stream through the native format)")
            self.records[name] = (layer_row(name, qw, method), {}, block, {})
            return
        if not isinstance(qw, (QuantizedWeight, VQWeight)):
            hint = " (ggml types: stream with --format gguf)" if isinstance(qw, GGMLWeight) else ""
            raise LowbitError(f"streaming: layer {name} is a {type(qw).__name__}; the native format "
                              f"streams integer/float schemes and vector codebooks only{hint}")
        t, row = _layer_tensors(name, qw)
        self.records[name] = (layer_row(name, qw, method), {k: (tuple(v.shape), v.dtype) for k, v in t.items()},
                              block, row)

    def restore(self, model, acts, res, swap, fp_acts=None):
        if self.state is None:
            return 0, acts
        for b, fname in enumerate(self.state["files"]):
            for name, qw, method in _read_block(self.path / fname):
                self._record(name, qw, method, b)
                res.layers.append((name, None, method))
        res.notes[:] = list(self.state["notes"])
        self._restore_acts(acts, fp_acts)
        self.saved_layers = len(res.layers)
        return self.blocks_done, acts

    def save(self, block: int, res, acts, fp_acts=None) -> None:
        from lowbit.io import atomic_path
        from safetensors.torch import save_file
        self.path.mkdir(parents=True, exist_ok=True)
        blk = self.model.get_submodule(f"{self.prefix}.{block}")
        quant = {n for n, _, _ in res.layers[self.saved_layers:]}
        floats = {}
        for key, t in blk.state_dict().items():
            full = f"{self.prefix}.{block}.{key}"
            owner, _, leaf = full.rpartition(".")
            if t.is_floating_point() and (owner not in quant or leaf == "bias"):
                floats[full] = t.detach().contiguous()
        with atomic_path(self.path / f"floats-{block:04d}.safetensors") as tmp:
            save_file(floats, str(tmp))
        new = list(range(self.saved_layers, len(res.layers)))
        super().save(block, res, acts, fp_acts)  # state.json last: the block is finished
        for i in new:
            name, qw, method = res.layers[i]
            self._record(name, qw, method, block)
            res.layers[i] = (name, None, method)


def quantize_streaming_calibrated(src: Path, source, recipe, out, *, tokens=None, calibration=None,
                                  max_shard_size=None, overwrite=False, dtype=torch.float32, log=None,
                                  state_dir=None, keep_state=False, files=None, source_sha=None,
                                  transformed=(), untied=False, metrics=None, teacher_files=None,
                                  data_free: bool = False) -> Path:
    """Quantize the Hugging Face directory `src` by a calibrated `recipe`, block by block, into a
    native directory `out`. tokens: (n, seq) calibration windows (default: drawn by the recipe's
    calibration settings, overridden by `calibration`, with the source's tokenizer). files /
    source_sha: the tensor source and its sha256 (streaming.open_source: a GGUF's tensors, with
    `src` its weightless config directory); default src's safetensors shards. A rotating recipe's
    `files` give the rotated model's tensors (streaming.rotated_source): `transformed` are its
    report lines, `untied` whether lm_head is then its own tensor. teacher_files: the float
    model's tensors before any rotation (the -ft teacher; default `files`). data_free: a data-free
    recipe with -ft, run through the block loop for its state (the layers are quantized as without
    calibration), its report and manifest the data-free path's."""
    from lowbit.calibration.paused import trim_heap
    from lowbit.export.common import copy_model_files, empty_model, output_dir, shard_plan, tie_by_config, write_index, write_shard
    from lowbit.export.manifest import provenance, write_manifest
    from lowbit.export.native import FORMAT, FORMAT_VERSION, MANIFEST

    log = log or (lambda _m: None)
    out = Path(out)
    run = calibrate_streamed(src, recipe, out, tokens=tokens, calibration=calibration, dtype=dtype, log=log,
                             state_dir=state_dir, files=files, source_sha=source_sha, transformed=transformed,
                             untied=untied, data_free=data_free)
    stream, model, report, heads, cfg, recipe, sha = (run.stream, run.model, run.report, run.heads, run.cfg,
                                                      run.recipe, run.sha)
    files, prefix, order, t0 = run.files, run.prefix, run.order, run.t0
    if recipe.finetune:                  # end to end, codes fixed: block by block (streaming_finetune.py)
        from lowbit.streaming_finetune import finetune_streamed
        finetune_streamed(run, src, teacher_files if teacher_files is not None else files, dtype, log)
    from lowbit.streaming_activations import activation_rules, stream_activations
    wanted = activation_rules(recipe, list(stream.records))
    act_rows = {}
    if wanted:
        run.read_outside()               # the embedding, released once the loop had its inputs
        act_rows = stream_activations(model, recipe, wanted, run.tokens, cfg.batch_size,
                                      lambda b: _block_io(run, b, dtype, src), log)
    model_float = run.model_float
    trim_heap()
    # the output's tensors: (shape, dtype, where from)
    qnames = set(stream.records)
    plan: dict[str, tuple] = {}
    for name, (_, tplan, b, _) in stream.records.items():
        for k, (shape, dt) in tplan.items():
            plan[k] = (shape, dt, ("layer", name))
        mod_bias = f"{name}.bias"
        if mod_bias in model_float:
            plan[mod_bias] = (model_float[mod_bias][0], dtype,
                              ("floats", b) if b is not None else ("source", None))
    seen, tied = {}, {}
    skel = empty_model(src, dtype)
    skel.config.tie_word_embeddings = skel.config.tie_word_embeddings and not untied
    tie_by_config(skel)
    for key, value in skel.state_dict(keep_vars=True).items():
        if key.rpartition(".")[0] in qnames:
            continue
        if id(value) in seen:
            tied[key] = seen[id(value)]
            continue
        seen[id(value)] = key
        dt = dtype if value.is_floating_point() else value.dtype
        b = _block_index(key, prefix)
        spooled = b is not None and (stream.path / f"floats-{b:04d}.safetensors").is_file()
        plan[key] = (tuple(value.shape), dt, ("floats", b) if spooled else ("source", None))
    del skel
    names = sorted(plan)
    from lowbit.streaming import _nbytes, add_activation_rows, stream_config
    sizes = {k: _nbytes(plan[k][0], plan[k][1]) for k in names}
    def produce(key: str, ready: dict) -> None:
        from lowbit.export.native import _layer_tensors
        shape, dt, (kind, arg) = plan[key]
        if kind == "layer":
            b = stream.records[arg][2]
            qw = heads[arg] if b is None else stream.block_layers(b)[arg]
            t, _ = _layer_tensors(arg, qw)
            for k, v in t.items():
                if (tuple(v.shape), v.dtype) != plan[k][:2]:
                    raise LowbitError(f"streaming: {k} read back as {v.dtype} {tuple(v.shape)}, planned "
                                      f"{plan[k][1]} {plan[k][0]}")
                ready[k] = v
            return
        if kind == "floats":
            t = stream.block_floats(arg).get(key)
            if t is None:
                raise LowbitError(f"streaming: state {stream.path}: tensor {key} is missing; delete it to start over")
        else:
            if key not in files:
                raise LowbitError(f"{src}: tensor {key} is missing")
            t = files.read(key)
            t = t.to(dt) if t.is_floating_point() else t
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LowbitError(f"{src}: tensor {key} contains NaN/inf; refusing to write a broken model")
        if tuple(t.shape) != shape:
            raise LowbitError(f"{src}: tensor {key} has shape {tuple(t.shape)}, config.json implies {shape}")
        ready[key] = t.contiguous()

    shards = shard_plan(sizes, max_shard_size)
    with output_dir(out, overwrite) as tmp:
        ready: dict[str, torch.Tensor] = {}
        for i, keys in enumerate(shards):
            for k in keys:
                if k not in ready:
                    produce(k, ready)
            part = {k: ready.pop(k) for k in keys}
            write_shard(part, tmp, i, len(shards))
            log(f"shard {i + 1}/{len(shards)}: {len(keys)} tensors")
            del part
            trim_heap()
        if len(shards) > 1:
            write_index(tmp, shards, sizes)
        if ready:
            raise LowbitError(f"streaming: tensors produced but not planned: {sorted(ready)[:5]}")
        rows = {}
        for name in sorted(stream.records, key=lambda n: order[n]):
            row = dict(stream.records[name][3])
            row["kind"], row["method"] = "linear", stream.records[name][0]["method"]
            rows[name] = row
        add_activation_rows(rows, report.layers, act_rows)
        qm = SimpleNamespace(recipe=recipe, qweights={}, provenance={
            "source": {"model": str(source), "sha256": sha}, "calibration": dict(report.calibration),
            "notes": list(report.notes), "layers": {}, "metrics": dict(metrics or {})})
        manifest = provenance(qm, FORMAT, rows, {"format_version": FORMAT_VERSION, "tied": tied})
        copy_model_files(src, tmp, stream_config(src, untied))
        write_manifest(tmp, manifest, MANIFEST)
    if not keep_state:
        stream.discard()
    log(f"streamed {len(stream.records)} layer(s) in {time.perf_counter() - t0:.1f} s -> {out}")
    return out


def calibrate_streamed(src: Path, recipe, out: Path, *, tokens=None, calibration=None, dtype=torch.float32, log,
                       state_dir=None, files=None, source_sha=None, transformed=(), untied=False,
                       native: bool = True, extra_stats: dict | None = None,
                       data_free: bool = False) -> SimpleNamespace:
    """The calibration half of a streamed run (quantize_streaming_calibrated's arguments): every
    nn.Linear target quantized block by block, each finished block in the state directory.
    native=False (streaming_gguf): the layers are ggml blocks, and data-free embeddings are left
    out of the loop (`on_read`: the GGUF writer makes them from the source). extra_stats: as
    calibration.quantize_calibrated takes them (an imatrix's means). data_free: the recipe has no
    calibrated method (it streams here for -ft): the report is what api.quantize's data-free path
    gives (no calibration settings, no loop notes, the recipe as given)."""
    from lowbit.api import QuantizeReport, _note_ragged, quantize_targets
    from lowbit.arch import get_blocks, spec_for
    from lowbit.calibration import CalibrationConfig, calibration_tokens, quantize_calibrated
    from lowbit.errors import check_context
    from lowbit.export import _source_sha256
    from lowbit.export.common import empty_model, tie_by_config
    from lowbit.methods import get_method
    from lowbit.models.shards import SafetensorsSource
    from lowbit.recipe import Recipe
    from lowbit.streaming import read_outside_blocks
    from lowbit.transforms import block_level_names

    if not transformed and any(t.get("name") not in block_level_names() for t in recipe.transforms):
        raise LowbitError(f"streaming: recipe {recipe.name!r} has model-level transforms "
                          f"({[t.get('name') for t in recipe.transforms]}), which need the whole model")
    given = files is not None
    overrides: dict[str, torch.Tensor] = {}       # -ft's tuned tensors, once kept
    files = _WithOverrides(files if given else SafetensorsSource(src), overrides)
    model = empty_model(src, dtype)
    model.config.tie_word_embeddings = model.config.tie_word_embeddings and not untied
    tie_by_config(model)
    arch = spec_for(model)
    blocks = get_blocks(model, arch)
    targets = quantize_targets(model, recipe)
    if not targets:
        raise LowbitError(f"recipe {recipe.name!r}: matched no module of this model")
    prefix = arch.blocks
    outside = []
    on_read = []
    for name, mod, rule in targets:
        if not native and isinstance(mod, torch.nn.Embedding) and not get_method(rule.method).needs:
            on_read.append(name)         # a GGUF's embedding: made from the source when written
            continue
        if isinstance(mod, torch.nn.Embedding) or not isinstance(mod, torch.nn.Linear):
            raise LowbitError(f"streaming: layer {name}: only nn.Linear modules are streamed"
                              + ("" if native else " (and data-free embeddings into a GGUF)"))
        if not name.startswith(prefix + "."):
            outside.append(name)
    targets = [t for t in targets if t[0] not in on_read]
    # the parameters outside the blocks: the embedding feeds the calibration; lm_head only if quantized
    sd = model.state_dict(keep_vars=True)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight   # lm_head is the embedding

    def read_outside() -> None:
        read_outside_blocks(model, files, prefix, dtype, str(src),
                            skip=lambda key: key.rpartition(".")[0] == arch.lm_head and
                            (arch.lm_head not in outside or tied))
        tie_by_config(model)
    read_outside()

    cfg = CalibrationConfig.from_dict({**recipe.calibration, **(calibration or {})})
    if tokens is None:
        from lowbit.models import load_tokenizer
        tokens = calibration_tokens(load_tokenizer(src), cfg)
    else:
        cfg.n_samples, cfg.seq_len = int(tokens.shape[0]), int(tokens.shape[1])
    check_context(model.config, cfg.seq_len, "calibration seq_len")
    given_recipe = recipe
    recipe = Recipe.from_dict({**recipe.to_dict(), "calibration": cfg.to_dict()})
    sha = source_sha if given else _source_sha256(src)
    log(f"{src}: {len(blocks)} blocks; embedding read, source sha256 {str(sha)[:12]}; "
        f"{cfg.n_samples} x {cfg.seq_len} calibration tokens")
    state = Path(state_dir) if state_dir else out.parent / f".{out.name}.resume"
    stream = _Stream(state, run_key(recipe, cfg.to_dict(), tokens, sha), model, files, src, prefix, dtype, native,
                     overrides)
    if stream.blocks_done:
        log(f"resume state {state}: {stream.blocks_done} block(s) done")
    t0 = time.perf_counter()
    res = quantize_calibrated(model, recipe, targets, tokens, cfg, log=log, checkpoint=stream, blocks_io=stream,
                              extra_stats=extra_stats)
    for name, qw, method in res.layers:             # layers quantized outside the blocks (lm_head)
        if qw is not None:
            stream._record(name, qw, method, None)
    if data_free:
        recipe = given_recipe
    report = QuantizeReport(recipe, seconds=time.perf_counter() - t0, notes=[] if data_free else list(res.notes),
                            calibration={} if data_free else cfg.to_dict())
    order = {n: i for i, (n, _, _) in enumerate(targets)}
    report.layers = [stream.records[n][0] for n in sorted(stream.records, key=lambda n: order[n])]
    _note_ragged(report)
    report.notes[:0] = list(transformed)
    heads = {n: qw for n, qw, _ in res.layers if qw is not None}
    del res
    model_float = {k: (tuple(t.shape), t.dtype) for k, t in sd.items()}
    del sd
    return SimpleNamespace(stream=stream, model=model, report=report, heads=heads, cfg=cfg, recipe=recipe, sha=sha,
                           files=files, prefix=prefix, order=order, t0=t0, tokens=tokens, on_read=on_read,
                           read_outside=read_outside, model_float=model_float, targets=targets, arch=arch,
                           blocks=blocks)


def _block_io(run, b: int | None, dtype, src) -> tuple[dict, dict]:
    """(float tensors, quantized layers) of block b as the state holds them, the source's floats
    for a block no rule quantized, or (b=None) the layers quantized outside the blocks."""
    from lowbit.streaming import source_floats
    if b is None:
        biases = {f"{n}.bias": run.model.get_submodule(n).bias for n in run.heads}
        return {k: v for k, v in biases.items() if v is not None}, dict(run.heads)
    if not (run.stream.path / f"block-{b:04d}.safetensors").is_file():
        return source_floats(run.model, run.files, f"{run.prefix}.{b}", dtype, str(src)), {}
    return run.stream.block_floats(b), run.stream.block_layers(b)


def _block_index(key: str, prefix: str) -> int | None:
    if not key.startswith(prefix + "."):
        return None
    idx = key[len(prefix) + 1:].partition(".")[0]
    return int(idx) if idx.isdigit() else None

