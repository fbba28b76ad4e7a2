"""The one orchestrator: load -> quantize (Recipe) -> evaluate -> export. Kept short on purpose;
the work lives in models/, methods/, calibration/, eval/ and export/. Every CLI command calls it.

    lm = load("smollm2-135m")
    report = quantize(lm.model, "w4g128-gptq", tokenizer=lm.tokenizer)   # calibrated: block by block
    export(lm, report, "out/smollm2-w4g128")                             # lowbit native directory
    export(lm, report, "out/smollm2-gptq", format="gptq")                # any format that holds it
    load("out/smollm2-gptq")                                             # -> the quantized model
    evaluate(lm, reference=...)                                          # ppl, KL, size, speed
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lowbit.arch import is_linear_like, linear_weight
from lowbit.errors import LowbitError, check_context
from lowbit.methods import get_method
from lowbit.models import LoadedModel, load_model  # noqa: F401  (re-exported: lowbit.api.load_model)
from lowbit.nn.qlinear import make_quant_module, set_submodule
from lowbit.recipe import Recipe, get_recipe


@dataclass
class QuantizeReport:
    recipe: Recipe
    layers: list[dict] = field(default_factory=list)   # one row per quantized module
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)   # the CalibrationConfig used (calibrated runs)
    timing: dict = field(default_factory=dict)        # seconds per phase (capture, stats, solve, forward)
    activation_bytes: int = 0                         # calibration activations held at once
    qweights: dict = field(default_factory=dict, repr=False)  # name -> QuantizedWeight (for export)
    imatrix: dict = field(default_factory=dict)       # the importance matrix used (ggml types): file, dataset
    activations: dict = field(default_factory=dict)   # name -> input-activation scheme, scale, outliers
    finetune: dict = field(default_factory=dict)      # the end-to-end fine-tuning's figures (train/tune.py)

    @property
    def ragged(self) -> list[dict]:
        return [r for r in self.layers if r.get("ragged_last_group")]


def quantize_targets(model: nn.Module, recipe: Recipe) -> list[tuple[str, nn.Module, object]]:
    """(name, module, rule) for every module the recipe quantizes, in model order."""
    out = []
    for name, mod in model.named_modules():
        if is_linear_like(mod) or (isinstance(mod, nn.Embedding) and not any(
                True for _ in mod.children())):
            rule = recipe.rule_for(name)
            if rule is None:
                continue
            if isinstance(mod, nn.Embedding) and "embed" not in rule.targets:
                continue  # embeddings only when a rule names them explicitly
            out.append((name, mod, rule))
    return out


def quantize(model: nn.Module, recipe: Recipe | str, *, progress: bool = True, tokenizer=None,
             tokens: torch.Tensor | None = None, calibration: dict | None = None,
             imatrix=None, log=None, checkpoint=None) -> QuantizeReport:
    """Quantize `model` in place by `recipe`.

    Data-free recipes (rtn, ggml) need nothing else. Calibrated methods (gptq, ...) run the
    sequential block loop (lowbit.calibration) on token windows: `tokens` (n, seq) if given, else
    drawn from the recipe's calibration settings (overridden by `calibration`) with `tokenizer`.
    imatrix: an importance matrix (calibration.imatrix.Imatrix or a llama-imatrix file) for ggml
    types, as llama-quantize uses it. GGUF mixes (q4_k_m, ...) are bound to this model's layers.
    Every option is validated before any work starts. checkpoint: a calibration.resume.Checkpoint
    (calibrated recipes): the state is saved after every block and a restart resumes from it.
    """
    from lowbit.presets.gguf_mixes import bind_to_model
    im, im_file = _imatrix(imatrix)
    recipe = bind_to_model(get_recipe(recipe), model, im is not None)
    teacher = None
    from lowbit.presets.gguf_mixes import is_ggml_recipe
    if recipe.finetune and is_ggml_recipe(recipe):
        raise LowbitError(f"recipe {recipe.name!r}: finetune with ggml types: the blocks keep their scales "
                          "inside each block, nothing to tune")
    if recipe.finetune:          # the float model's view of the windows, before anything changes it
        tokens = _calibration_tokens(model, recipe, tokenizer, tokens, calibration, "end-to-end fine-tuning and its teacher")
        from lowbit.train.tune import TuneConfig, teacher_of
        ft = TuneConfig.from_dict(recipe.finetune)
        teacher = teacher_of(model, tokens, ft.batch_size)
    report = _quantize(model, recipe, im, im_file, progress, tokenizer, tokens, calibration, log, checkpoint)
    if teacher is not None:
        _finetune(model, report, tokens, teacher, ft, log)
    return _with_activations(model, report, tokenizer, tokens, calibration)


def _calibration_tokens(model, recipe: Recipe, tokenizer, tokens, calibration, what: str) -> torch.Tensor:
    """The calibration windows (n, seq) the recipe asks for, or `tokens` as given."""
    if tokens is not None:
        return tokens
    if tokenizer is None:
        raise LowbitError(f"recipe {recipe.name!r}: {what} need calibration data: pass tokenizer= (windows "
                          "drawn from the recipe's calibration text) or tokens=")
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    cfg = CalibrationConfig.from_dict({**recipe.calibration, **(calibration or {})})
    check_context(getattr(model, "config", None), cfg.seq_len, "calibration seq_len")
    return calibration_tokens(tokenizer, cfg)


def _finetune(model, report: QuantizeReport, tokens, teacher, cfg, log, runner=None, tuned=None) -> None:
    """recipe.finetune (cfg, its TuneConfig): scales, codebooks and norms tuned end to end, codes
    fixed (train/tune.py). runner / tuned: a streamed run's (streaming_finetune.py) runner and the
    names of its quantized layers (in memory: report.qweights)."""
    from lowbit.train.tune import finetune
    res = finetune(model, tokens, teacher, cfg, qweights=report.qweights, log=log, runner=runner)
    tuned = report.qweights if tuned is None else tuned
    if res.kept:
        for row in report.layers:
            if row["name"] in tuned and not row["method"].endswith("+ft"):
                row["method"] += "+ft"
    if not report.calibration:       # a data-free recipe: the windows are the fine-tuning's
        report.calibration = {"n_samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}
    report.timing["finetune"] = res.seconds
    report.seconds += res.seconds
    report.finetune = {k: v for k, v in res.to_dict().items() if k not in ("seconds", "config")}
    report.notes.append(f"finetune: KL on the {tokens.shape[0]} calibration windows {res.loss_init:.4f} -> "
                        f"{res.loss_final:.4f}" + ("" if res.kept else " (not lower: the start was kept)")
                        + f" ({res.layers} linears, {res.norms} norm tensors, {len(res.epoch_losses)} epochs)")


def _quantize(model, recipe: Recipe, im, im_file, progress, tokenizer, tokens, calibration, log,
              checkpoint) -> QuantizeReport:
    transformed = _transform(model, recipe)
    targets = quantize_targets(model, recipe)
    if not targets:
        raise LowbitError(f"recipe {recipe.name!r}: matched no module of this model")
    extra = _imatrix_stats(model, targets, im)
    calibrated = sorted({r.method for _, _, r in targets if get_method(r.method).needs})
    from lowbit.transforms import block_level_names
    if calibrated or any(t.get("name") in block_level_names() for t in recipe.transforms):
        # block-level transforms (AWQ, SmoothQuant) calibrate too
        rep = _quantize_calibrated(model, recipe, targets, tokenizer, tokens, calibration, log, extra,
                                   checkpoint)
        rep.imatrix = _imatrix_meta(im, im_file)
        rep.notes[:0] = transformed
        return rep
    report = QuantizeReport(recipe, imatrix=_imatrix_meta(im, im_file), notes=list(transformed))
    t0 = time.perf_counter()
    it = targets
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(targets, desc=f"quantize {recipe.name}", unit="layer")
    with torch.no_grad():
        for name, mod, rule in it:
            spec = get_method(rule.method)
            w = linear_weight(mod) if is_linear_like(mod) else mod.weight
            try:
                qw = spec.fn(w, rule.scheme, spec.make_config(rule.method_args), extra.get(name))
            except LowbitError as e:      # name the layer: the method only sees a tensor
                raise LowbitError(f"{name}.weight: {e}") from None
            report.layers.append(layer_row(name, qw, rule.method))
            report.qweights[name] = qw
            if is_linear_like(mod):
                set_submodule(model, name, make_quant_module(qw, getattr(mod, "bias", None)))
            else:  # embedding: a lookup table, stored quantized, served dequantized
                mod.weight.data = qw.dequantize(mod.weight.dtype)
    report.seconds = time.perf_counter() - t0
    _note_ragged(report)
    return report


def _with_activations(model, report: QuantizeReport, tokenizer, tokens, calibration) -> QuantizeReport:
    """Input-activation quantization of the rules that ask for it (calibration/activations.py)."""
    if not any(r.input_activations for r in report.recipe.rules):
        return report
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.calibration.activations import quantize_activations
    cfg = CalibrationConfig.from_dict({**report.recipe.calibration, **(calibration or {})})

    def tokens_fn():
        if tokens is not None:
            return tokens
        if tokenizer is None:
            raise LowbitError(f"recipe {report.recipe.name!r}: static input activations need calibration "
                              "data: pass tokenizer= or tokens=")
        return calibration_tokens(tokenizer, cfg)
    report.activations = quantize_activations(model, report.recipe, tokens_fn, cfg.batch_size)
    for row in report.layers:
        row.update({k: v for k, v in report.activations.get(row["name"], {}).items() if k != "input_scheme"})
    return report


def _transform(model: nn.Module, recipe: Recipe) -> list[str]:
    """The recipe's float rewrites (lowbit.transforms), before any weight is quantized."""
    if not recipe.transforms:
        return []
    from lowbit.transforms import apply_transforms
    with torch.no_grad():
        return [transform_note(d) for d in apply_transforms(model, recipe.transforms)]


def transform_note(done: dict) -> str:
    """The report's line for one applied transform ({"transform": name, **its info})."""
    return f"transform {done['transform']}: " + ", ".join(f"{k}={v}" for k, v in done.items() if k != "transform")


def _note_ragged(report: QuantizeReport) -> None:
    if report.ragged:
        r = report.ragged[0]
        report.notes.append(f"{len(report.ragged)} layer(s) end each row in a shorter group "
                            f"(e.g. {r['name']}: in_features {r['shape'][1]}, last group {r['ragged_last_group']})")


def _imatrix(imatrix):
    if imatrix is None:
        return None, None
    from lowbit.calibration.imatrix import Imatrix
    if isinstance(imatrix, Imatrix):
        return imatrix, None
    return Imatrix.load(imatrix), str(imatrix)


def _imatrix_meta(im, im_file) -> dict:
    if im is None:
        return {}
    return {"file": im_file or "lowbit", "dataset": (im.datasets or [None])[0], "entries": len(im.sums),
            "chunks": int(im.chunk_count)}


def _imatrix_stats(model, targets, im) -> dict:
    """name -> {"imatrix": per-column mean x^2} for the targets the imatrix has (by GGUF name)."""
    if im is None:
        return {}
    from lowbit.arch.gguf_names import NameMap, arch_spec
    cfg = model.config
    names = NameMap(arch_spec(cfg.model_type).gguf_arch, int(cfg.num_hidden_layers))
    out = {}
    for name, _, _ in targets:
        try:
            mean = im.mean(names.to_gguf(f"{name}.weight"))
        except LowbitError:
            mean = None
        if mean is not None:
            out[name] = {"imatrix": mean}
    return out


def _quantize_calibrated(model, recipe: Recipe, targets, tokenizer, tokens, calibration, log,
                         extra: dict | None = None, checkpoint=None) -> QuantizeReport:
    from lowbit.arch import spec_for
    from lowbit.calibration import CalibrationConfig, quantize_calibrated
    cfg = CalibrationConfig.from_dict({**recipe.calibration, **(calibration or {})})
    spec_for(model)  # an unknown architecture fails here, before any calibration work
    if tokens is None:
        tokens = _calibration_tokens(model, recipe, tokenizer, None, calibration, "calibrated method(s)")
    else:
        cfg.n_samples, cfg.seq_len = int(tokens.shape[0]), int(tokens.shape[1])
    check_context(getattr(model, "config", None), cfg.seq_len, "calibration seq_len")
    # the recipe saved with the output records the calibration actually used
    recipe = Recipe.from_dict({**recipe.to_dict(), "calibration": cfg.to_dict()})
    t0 = time.perf_counter()
    if callable(checkpoint):     # a factory: the key needs the final recipe and the tokens
        checkpoint = checkpoint(recipe, cfg.to_dict(), tokens)
    res = quantize_calibrated(model, recipe, targets, tokens, cfg, log=log, extra_stats=extra,
                              checkpoint=checkpoint)
    report = QuantizeReport(recipe, seconds=time.perf_counter() - t0, notes=list(res.notes),
                            calibration=cfg.to_dict(), timing=dict(res.timing),
                            activation_bytes=res.activation_bytes)
    order = {name: i for i, (name, _, _) in enumerate(targets)}
    for name, qw, method in sorted(res.layers, key=lambda r: order.get(r[0], 0)):
        report.layers.append(layer_row(name, qw, method))
        report.qweights[name] = qw
    _note_ragged(report)
    return report


def qat(loaded: LoadedModel, report: QuantizeReport, *, teacher: nn.Module | None = None, config=None,
        log=None, **options):
    """Quantization-aware training of `loaded.model` from its PTQ result (`report` of `quantize`),
    then frozen back into `report.qweights` so `export` writes it like any quantized model
    (lowbit.train.qat). teacher: the float model for the default distillation loss. options:
    QATConfig fields (steps, lr, scale_lr, loss, ...). -> QATResult (loss curve, codes changed)."""
    from lowbit.train.qat import QATConfig, run_qat
    cfg = config or QATConfig(**options)
    return run_qat(loaded.model, report, loaded.tokenizer, cfg, teacher=teacher, log=log)


def load(source, dtype: torch.dtype = torch.float32, backend: str | None = None, *,
         quantization: str | None = None, double_quant: bool = False, compute_dtype=None,
         block_size: int = 64, skip_modules=()) -> LoadedModel:
    """A built-in name, .gguf, HF directory or any quantized output lowbit reads (lowbit.export).

    quantization="nf4" | "fp4" | "int8": bitsandbytes-style loading (load_in_4bit / load_in_8bit):
    every linear but lm_head becomes a Linear4bit / Linear8bit (lowbit.nn.bnb4), with
    double_quant (8-bit absmax constants, blocks of 256), compute_dtype (default: dtype) and
    block_size (64). Quantizes only when asked here; meta["bnb"] holds the byte counts."""
    if quantization is None:
        if double_quant or compute_dtype is not None or skip_modules:
            raise LowbitError("double_quant / compute_dtype / skip_modules: apply with quantization= "
                              "(nf4, fp4 or int8)")
        return load_model(source, dtype=dtype, backend=backend)
    from lowbit.nn.bnb4 import BnbConfig, quantize_model
    cfg = BnbConfig(quantization, bool(double_quant), compute_dtype or dtype, int(block_size),
                    tuple(skip_modules)).check()
    if backend is not None:
        raise LowbitError("backend: the bitsandbytes-style layers have no packed kernels; omit backend")
    lm = load_model(source, dtype=dtype)
    lm.meta["bnb"] = quantize_model(lm.model, cfg)
    return lm


def memory_footprint(loaded) -> int:
    """Bytes of the model's parameters and buffers (transformers' get_memory_footprint)."""
    from lowbit.nn.bnb4 import memory_footprint as _mf
    return _mf(getattr(loaded, "model", loaded))


def export(loaded: LoadedModel, report: QuantizeReport | None, out, format: str = "native", *,
           metrics: dict | None = None, overwrite: bool = False, **options):
    """Write the quantized model in `format` (lowbit.export registry: native, gguf, gptq, awq,
    compressed-tensors, onnx). report=None re-exports a model read back from a quantized output."""
    from lowbit.export import QuantizedModel, get_format
    from lowbit.transforms.rotate import ONLINE_ATTR
    fmt = get_format(format)
    from lowbit.nn.bnb4 import bnb_modules
    if fmt.name != "bnb" and bnb_modules(loaded.model):
        raise LowbitError(f"export {format}: the model holds bitsandbytes-style 4/8-bit layers "
                          "(api.load(quantization=...)), which only --format bnb writes; quantize the float "
                          "model with a recipe for other formats")
    if fmt.name == "bnb" and (report is not None or not bnb_modules(loaded.model)):
        raise LowbitError("export bnb: writes a model loaded with api.load(..., quantization='nf4' | 'fp4' | "
                          "'int8') (it has no 4-bit / 8-bit bitsandbytes-style layer otherwise); pass report=None")
    if getattr(loaded.model, ONLINE_ATTR, None):
        raise LowbitError(f"export {format}: the model rotates down_proj inputs online "
                          f"({getattr(loaded.model, ONLINE_ATTR)}), which no file format holds; "
                          "quantize with transforms [{'name': 'rotate', 'online_down': false}] to export")
    qm = (QuantizedModel.from_report(loaded, report, metrics) if report is not None
          else QuantizedModel.from_loaded(loaded))
    if metrics and report is None:
        qm.provenance["metrics"] = dict(metrics)
    return fmt.write(qm, out, overwrite=overwrite, **options)


def save_quantized(loaded: LoadedModel, report: QuantizeReport, out, metrics: dict | None = None,
                   overwrite: bool = False):
    """Write the quantized model as a lowbit native directory (lowbit.export.native)."""
    return export(loaded, report, out, "native", metrics=metrics, overwrite=overwrite)


def evaluate(loaded: LoadedModel, reference=None, **options) -> dict:
    """lowbit.eval.evaluate on a loaded model (options: metrics, text, seq_len, max_tokens, ...)."""
    from lowbit.eval import evaluate as _evaluate
    return _evaluate(loaded.model, loaded.tokenizer, reference=reference, **options)


def plan_budget(model: nn.Module, budget, *, tokens: torch.Tensor, fmt: str = "native", candidates=None,
                tie: bool | None = None, source_dir=None, calibration: dict | None = None, cache: bool = True,
                log=None):
    """Choose one scheme per linear of `model` (float) under `budget` ("3.5bpw", "90MB" or a
    lowbit.budget.Budget) by measured-loss proxies on `tokens` (lowbit.budget). -> (Plan, Sensitivity);
    plan.recipe() is a plain Recipe for `quantize`. tie: one scheme per shared-input group
    (default: when `fmt` fuses them)."""
    from lowbit.budget import load_or_compute, parse_budget, solve
    from lowbit.budget.solver import TIED_FORMATS
    b = parse_budget(budget) if isinstance(budget, str) else budget
    sens = load_or_compute(model, tokens, candidates=list(candidates) if candidates else None, fmt=fmt,
                           cache=cache, source_dir=source_dir, log=log)
    plan = solve(sens, b, tie=fmt in TIED_FORMATS if tie is None else tie, calibration=calibration)
    return plan, sens


def layer_row(name: str, qw, method: str) -> dict:
    scheme = getattr(qw, "type", None) or qw.scheme.short_name()     # a ggml type, or our scheme
    return {"name": name, "shape": list(qw.shape), "scheme": scheme, "method": method,
            "bits_per_weight": round(qw.bits_per_weight, 4), "ragged_last_group": qw.ragged_last_group,
            **{k: v for k, v in qw.info.items() if isinstance(v, (bool, int, float, str))}}
