"""Streaming a recipe of ggml types (q4_k_m, q3_k_m, ... mixes; data-free) straight into a GGUF.

    lowbit quantize HF_DIR --recipe q4_k_m --stream --format gguf --out OUT.gguf

The native format holds no ggml block types, so these recipes cannot go through streaming.py's
native spool. Here the GGUF writer (export/gguf/writer.py) gets a QuantizedModel whose model is
the meta-device skeleton with only its float tensors read (norms; a float lm_head), and whose
qweights quantize each layer from the source when the writer asks for it (one kept at a time).
The writer, lazy (QuantizedModel.lazy), plans the file from the skeleton's shapes and spools each
encoded tensor beside the output until the header is written, so one layer is in memory at a time;
each layer is quantized once. An imatrix (a file, as llama-quantize takes one) weights each
tensor's encoder as api.quantize does. The file is byte for byte what load_model + api.quantize +
export write (tests/test_streaming.py).

A calibrated recipe of ggml types (`q4_k_m-gptq`: GPTQ choosing ggml block codes,
methods/gptq_ggml.py) runs the block loop first, as streaming_calibrated.py does for the native
format (one decoder block of the float model at a time; each finished block's ggml blocks and
rewritten floats in the state directory, which a killed run resumes from); the writer then takes
each layer from that state, and each data-free layer (the token embedding) from the source.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from lowbit.errors import LowbitError
from lowbit.export.common import OnDemandLayers


class QuantizedOnRead(OnDemandLayers):
    """name -> the layer's quantized weight, made from the source when asked for (only the last
    one kept: export.common.OnDemandLayers). describe(name): what its manifest row needs, kept
    for every layer already made."""

    def __init__(self, files, targets: dict, dtype: torch.dtype, where: str, on_made=None, stats: dict | None = None,
                 spooled=None):
        super().__init__(targets)
        self.files, self.targets, self.dtype, self.where, self.on_made = files, targets, dtype, where, on_made
        self.stats = stats or {}              # name -> statistics given from outside (an imatrix's means)
        self.spooled = spooled                # name -> the layer a calibrated run already made, or None
        self._made: dict[str, SimpleNamespace] = {}

    def _make(self, name: str):
        from lowbit.streaming import quantize_from_source
        rule = self.targets[name]
        qw = self.spooled(name) if self.spooled is not None else None
        if qw is None:
            qw = quantize_from_source(self.files, name, rule, self.dtype, self.stats.get(name))
        if name not in self._made:
            self._made[name] = SimpleNamespace(scheme=qw.scheme, shape=qw.shape, bits_per_weight=qw.bits_per_weight,
                                               ragged_last_group=qw.ragged_last_group)
            if self.on_made is not None:
                self.on_made(name, qw, rule.method)
        return qw

    def describe(self, name: str):
        if name not in self._made:
            self[name]
        return self._made[name]


def stream_gguf(source, recipe, out, *, overwrite: bool = False, dtype: torch.dtype = torch.float32,
                log=None, metrics: dict | None = None, imatrix=None, tokens=None, calibration=None,
                state_dir=None, keep_state: bool = False) -> Path:
    """Quantize the checkpoint `source` (streaming.open_source) by a recipe of ggml types into
    the GGUF file `out`, one layer in memory at a time (module docstring). imatrix: an
    importance matrix (calibration.imatrix.Imatrix or a llama-imatrix file), as api.quantize
    takes it: each tensor's encoder weighted by its input means, the mix bound as with one.
    A calibrated recipe (gptq): tokens / calibration as in api.quantize; state_dir the resume
    state (default .OUT.resume beside `out`), deleted at the end unless keep_state."""
    import time

    from lowbit.api import _imatrix, _imatrix_meta, _imatrix_stats, layer_row, quantize_targets
    from lowbit.export import QuantizedModel
    from lowbit.export.common import check_output, empty_model, set_tensor, tie_by_config
    from lowbit.export.gguf.writer import write_quantized
    from lowbit.methods import get_method
    from lowbit.numerics.scheme import GGUF_FORMATS
    from lowbit.presets.gguf_mixes import bind_to_model
    from lowbit.recipe import get_recipe
    from lowbit.streaming import open_source
    from lowbit.streaming_calibrated import _block_index
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    src, files, sha = open_source(source)
    out = Path(out)
    check_output(out, overwrite, single_file=True)
    model = empty_model(src, dtype)
    tie_by_config(model)
    im, im_file = _imatrix(imatrix)
    recipe = bind_to_model(get_recipe(recipe), model, im is not None)
    if recipe.finetune:
        raise LowbitError(f"streaming --format gguf: recipe {recipe.name!r} fine-tunes (finetune), and ggml "
                          "blocks keep their scales inside each block: nothing to tune")
    triples = quantize_targets(model, recipe)
    if not triples:
        raise LowbitError(f"recipe {recipe.name!r}: matched no module of this model")
    for name, _, rule in triples:
        if rule.scheme.format not in GGUF_FORMATS:
            raise LowbitError(f"streaming --format gguf: layer {name} has scheme {rule.scheme.short_name()}, "
                              "not a ggml type (int recipes stream through the native format)")
    targets = {n: r for n, _, r in triples}
    kinds = {n: ("embedding" if isinstance(m, torch.nn.Embedding) else "linear") for n, m, _ in triples}
    stats = _imatrix_stats(model, triples, im)
    run = None
    if any(get_method(r.method).needs for r in targets.values()):
        # the block loop first (streaming_calibrated.py), its layers then read back from the state
        from lowbit.streaming_calibrated import calibrate_streamed
        run = calibrate_streamed(src, recipe, out, tokens=tokens, calibration=calibration, dtype=dtype, log=log,
                                 state_dir=state_dir, files=files, source_sha=sha, native=False, extra_stats=stats)
        recipe = run.recipe                  # the calibration actually used, as api.quantize records it
        del run.model
    blocks = run.stream if run is not None else None
    # the float tensors: everything outside the quantized modules, and their biases (a calibrated
    # run's block-level transforms may have rewritten a block's: those come from its state)
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        tied = id(t) in seen                 # a tied lm_head: the embedding's tensor, listed twice
        seen.add(id(t))
        if not t.is_meta or tied or (owner in targets and leaf == "weight"):
            continue
        b = None if blocks is None else _block_index(key, run.prefix)
        v = None if b is None else blocks.block_floats(b).get(key)
        if v is None:
            if key not in files:
                raise LowbitError(f"{src}: tensor {key} is missing")
            v = files.read(key)
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise LowbitError(f"{src}: tensor {key} contains NaN/inf; refusing to write a broken model")
        set_tensor(model, key, v.to(dtype) if v.is_floating_point() else v, str(src))
    tie_by_config(model)
    rows: dict[str, dict] = {}

    def made(name, qw, method):
        rows[name] = (run.stream.records[name][0] if run is not None and name in run.stream.records
                      else layer_row(name, qw, method))
    def spooled(name: str):
        """The layer the block loop made (read back from its state), or None: made from the source."""
        rec = run.stream.records.get(name) if run is not None else None
        if rec is None:
            return None
        return run.heads[name] if rec[2] is None else run.stream.block_layers(rec[2])[name]
    qweights = QuantizedOnRead(files, targets, dtype, str(src), made, stats, spooled=spooled)
    # data-free: no notes (ggml types have no ragged groups, api.quantize's only data-free note)
    prov = {"source": {"model": str(source), "sha256": sha},
            "calibration": {} if run is None else run.cfg.to_dict(),
            "notes": [] if run is None else list(run.report.notes),
            "layers": rows, "metrics": dict(metrics or {}), "imatrix": _imatrix_meta(im, im_file)}
    qm = QuantizedModel(model, None, Path(src), qweights, kinds, recipe, prov, lazy=True)
    write_quantized(qm, out, progress=False, overwrite=overwrite)
    if run is not None and not keep_state:
        run.stream.discard()
    log(f"streamed {len(targets)} layer(s) into {out} in {time.perf_counter() - t0:.1f} s")
    return out
