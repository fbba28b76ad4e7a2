"""`lowbit quantize MODEL --recipe w4g128-gptq --out DIR [--format gptq]`: quantize and write it.

The output is written by the formats layer (lowbit.export): the lowbit native directory by
default, or any format that can hold the recipe's result (gptq, awq, compressed-tensors, gguf,
onnx). Progress is printed per decoder block; `lowbit eval OUT`
(or `load_model(OUT)`) reads the result.
Calibration options override the recipe's (defaults: lowbit.calibration.CalibrationConfig).
"""
from __future__ import annotations

import sys
import time

from lowbit.cli.argtypes import positive_int


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model by a recipe and save it (lowbit native format)",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", help="built-in name (smollm2-135m), .gguf file or Hugging Face directory")
    p.add_argument("--recipe", default="w4g128-gptq",
                   help="preset (w4g128-gptq, w3g128-gptq, w8-rtn, w2g64-gptq-actorder, ...) or recipe JSON")
    p.add_argument("--out", required=True, help="output directory or file (must not exist unless --overwrite)")
    p.add_argument("--format", default="native",
                   help="output format: native (default), gptq, awq, compressed-tensors, gguf, onnx")
    p.add_argument("--max-shard-size", default=None,
                   help="split safetensors weights into shards of at most this size (e.g. 2GB; default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier lowbit output (never any other path)")
    g = p.add_argument_group("calibration (calibrated methods only)")
    g.add_argument("--samples", type=positive_int, help="number of token windows (default 128)")
    g.add_argument("--seq-len", type=positive_int, help="tokens per window (default 512)")
    g.add_argument("--seed", type=int, help="which windows are drawn (default 0)")
    g.add_argument("--calib-text", help="wiki-calibration (default), a .txt file or a directory")
    g.add_argument("--batch-size", type=positive_int, help="windows per forward pass (default 8)")
    g.add_argument("--no-true-sequential", action="store_true",
                   help="collect a block's statistics in one float pass")
    g.add_argument("--no-pause-forward", action="store_true",
                   help="re-run each block per linear group instead of pausing every batch's forward "
                        "(same result, ~2.5x the forward compute, less memory)")
    p.add_argument("--stream", action="store_true",
                   help="from a safetensors directory: data-free recipes read, quantize and write one tensor "
                        "at a time, calibrated ones (gptq) one decoder block at a time (the float model is "
                        "never in memory; native shards of --max-shard-size, default 1GB here; another "
                        "--format is converted from that native output)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the resume state of an earlier killed run of this --out and start over")
    p.add_argument("--no-resume", action="store_true",
                   help="keep no resume state (calibrated recipes save one after every block, beside --out "
                        "as .OUT.resume, so the same command restarted after a kill goes on from there)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    b = p.add_argument_group("budget (lowbit.budget: the schemes chosen for you)")
    b.add_argument("--budget", help="choose one scheme per linear by measured-loss proxies under this budget: "
                                    "bits per weight of the quantized linears' file bytes (3.5bpw) or the whole "
                                    "output's size (90MB, 85MiB); replaces --recipe")
    b.add_argument("--candidates", help="comma-separated schemes to choose from: preset-grammar names, or "
                                        "gguf-<type> with --format gguf (default: lowbit.budget.DEFAULT_CANDIDATES; "
                                        "GGUF_CANDIDATES for gguf)")
    b.add_argument("--tie-shared-inputs", action="store_true",
                   help="one scheme per shared-input group (q/k/v, gate/up), as fused kernels need")
    b.add_argument("--save-recipe", help="also write the chosen recipe as JSON here (readable, editable)")
    b.add_argument("--no-sensitivity-cache", action="store_true", help="recompute the sensitivity table")
    q = p.add_argument_group("quantization-aware training (lowbit.train.qat), after the recipe's PTQ")
    q.add_argument("--qat-steps", type=positive_int, help="train this many steps on wiki-calibration windows "
                                                         "(fake quantization, STE), then write the result")
    q.add_argument("--qat-lr", type=float, default=1e-3, help="latent-weight learning rate (default 1e-3)")
    q.add_argument("--qat-scale-lr", type=float, default=1e-4,
                   help="LSQ scale learning rate (default 1e-4; 0 keeps the PTQ scales)")
    q.add_argument("--qat-loss", choices=("kd", "ce"), default="kd",
                   help="kd: KL to the float model's logits (default); ce: next-token loss")
    q.add_argument("--qat-batch", type=positive_int, default=4, help="windows per step (default 4)")
    q.add_argument("--qat-seq", type=positive_int, default=256, help="tokens per window (default 256)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from lowbit import api
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.export import get_format
    from lowbit.methods import get_method
    from lowbit.models import load_tokenizer
    from lowbit.recipe import get_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = get_recipe(args.recipe)          # a bad recipe or format fails before the model is loaded
    fmt = get_format(args.format)
    out = Path(args.out)
    from lowbit.export.common import check_output
    check_output(out, args.overwrite, single_file=bool(fmt.suffix))
    overrides = {k: v for k, v in {"n_samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
                                   "text": args.calib_text, "batch_size": args.batch_size}.items()
                 if v is not None}
    if args.no_true_sequential:
        overrides["true_sequential"] = False
    if args.no_pause_forward:
        overrides["pause_forward"] = False
    if args.stream:
        return _run_streaming(args, recipe, fmt, out, overrides)

    def log(msg: str) -> None:
        print(f"[lowbit quantize] {msg}", file=sys.stderr, flush=True)

    tokens = None
    if args.budget:
        from lowbit.budget import parse_budget
        from lowbit.budget.sizing import check_format
        parse_budget(args.budget)
        check_format(fmt.name)
        cfg = CalibrationConfig.from_dict(overrides)
        tokens = calibration_tokens(load_tokenizer(args.model), cfg)
    elif recipe.finetune or any(get_method(r.method).needs for r in recipe.rules if r.scheme is not None):
        # draw the calibration windows first: too short a text fails before the model is loaded
        # (a -ft recipe fine-tunes on them, data-free methods included)
        cfg = CalibrationConfig.from_dict({**recipe.calibration, **overrides})
        tokens = calibration_tokens(load_tokenizer(args.model), cfg)
    t0 = time.perf_counter()
    loaded = api.load_model(args.model)
    plan = None
    if args.budget:
        t1 = time.perf_counter()
        cands = args.candidates.split(",") if args.candidates else None
        plan, _ = api.plan_budget(loaded.model, args.budget, tokens=tokens, fmt=fmt.name, candidates=cands,
                                  tie=True if args.tie_shared_inputs else None, source_dir=loaded.path,
                                  calibration=cfg.to_dict(), cache=not args.no_sensitivity_cache, log=log)
        recipe = plan.recipe()
        log(f"budget {args.budget}: plan in {time.perf_counter() - t1:.1f} s; {recipe.description}")
        if args.save_recipe:
            recipe.save(args.save_recipe)
            log(f"recipe written to {args.save_recipe}")
    log(f"loaded {args.model} ({time.perf_counter() - t0:.1f} s); recipe {recipe.name}: {recipe.description}")
    ckpt = None
    if tokens is not None and not args.no_resume:
        ckpt = _checkpoint(out, loaded, args.fresh, log)
    imatrix = None
    if plan is not None and fmt.name == "gguf":
        # the plan's costs were measured with llama.cpp's encoders weighted by each input's mean x^2:
        # the same importance (an imatrix of the same calibration windows) encodes the file
        from lowbit.calibration.imatrix import collect_imatrix, imatrix_targets
        imatrix = collect_imatrix(loaded.model, tokens, imatrix_targets(loaded.model),
                                  dataset=str(cfg.text), progress=False)
    report = api.quantize(loaded.model, recipe, tokens=tokens, calibration=overrides, progress=False, log=log,
                          checkpoint=ckpt, imatrix=imatrix)
    if args.qat_steps:
        from lowbit.train.qat import QATConfig
        teacher = api.load_model(args.model).model if args.qat_loss == "kd" else None
        cfg = QATConfig(steps=args.qat_steps, lr=args.qat_lr, scale_lr=args.qat_scale_lr or None,
                        loss=args.qat_loss, batch_size=args.qat_batch, seq_len=args.qat_seq)
        res = api.qat(loaded, report, teacher=teacher, config=cfg, log=log)
        del teacher
        log(f"qat: {args.qat_steps} steps in {res.seconds:.0f} s, loss {res.train.losses[0]:.4f} -> "
            f"{res.train.losses[-1]:.4f}, {res.freeze['codes_changed'] * 100:.2f} % of codes changed")
    opts = {"max_shard_size": args.max_shard_size} if args.max_shard_size else {}
    metrics = {"budget_plan": plan.to_dict()} if plan is not None else None
    path = api.export(loaded, report, out, fmt.name, overwrite=args.overwrite, metrics=metrics, **opts)
    for ck in getattr(ckpt, "made", []):       # the output is in place: the state is not needed
        ck.discard()
    n = len(report.layers)
    bpw = sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in report.layers) / \
        max(1, sum(r["shape"][0] * r["shape"][1] for r in report.layers))
    print(f"quantized {n} layer(s) with {recipe.name} in {report.seconds:.1f} s "
          f"({bpw:.3f} bits per weight in quantized layers) -> {path}")
    for note in report.notes:
        print(f"note: {note}")
    run_metrics = {"bits_per_weight": bpw, "seconds": report.seconds}
    if plan is not None:
        from lowbit.budget.sizing import file_payload_bytes
        real = file_payload_bytes(path)
        run_metrics.update(plan={k: v for k, v in plan.to_dict().items() if k != "choice"}, file=real)
        print(f"budget {args.budget}: predicted {plan.total_bytes:,} bytes ({plan.linear_bytes:,} in quantized "
              f"linears, {plan.bits_per_weight:.3f} bpw), predicted KL {plan.predicted_kl:.4f}; written "
              f"{real['total_bytes']:,} bytes ({real['payload_bytes']:,} tensor data)")
    from lowbit.runs import record_run
    record_run("quantize", model=args.model, source_sha256=loaded.source_sha256, recipe=report.recipe,
               calibration=report.calibration, tokens=tokens, metrics=run_metrics, output=path)
    return 0


def _checkpoint(out, loaded, fresh: bool, log):
    """A factory api.quantize calls with the final recipe, calibration and tokens: the resume state
    beside `out` (.OUT.resume); --fresh drops an earlier one first."""
    import shutil

    from lowbit.calibration.resume import Checkpoint, run_key
    from lowbit.export import _source_sha256
    path = out.parent / f".{out.name}.resume"
    if fresh and path.exists():
        shutil.rmtree(path)
        log(f"--fresh: dropped the resume state {path}")
    source = loaded.source_sha256 or _source_sha256(loaded.path)

    def make(recipe, calibration, tokens):
        ck = Checkpoint(path, run_key(recipe, calibration, tokens, source))
        make.made.append(ck)
        return ck
    make.made = []
    return make


def _run_streaming(args, recipe, fmt, out, overrides: dict) -> int:
    import shutil

    from lowbit.streaming import STREAM_MAX_SHARD, quantize_streaming

    def log(m):
        print(f"[lowbit quantize] {m}", file=sys.stderr, flush=True)
    metrics, imatrix = None, None
    if args.budget:
        # the sensitivity pass streamed too (budget/streamed.py): one block in memory at a time
        from lowbit.budget import parse_budget
        from lowbit.budget.sizing import check_format
        from lowbit.budget.streamed import plan_budget_streaming
        from lowbit.calibration import CalibrationConfig, calibration_tokens
        from lowbit.models import load_tokenizer
        parse_budget(args.budget)
        check_format(fmt.name)
        cfg = CalibrationConfig.from_dict(overrides)
        tokens = calibration_tokens(load_tokenizer(args.model), cfg)
        t1 = time.perf_counter()
        cands = args.candidates.split(",") if args.candidates else None
        plan, _ = plan_budget_streaming(args.model, args.budget, tokens=tokens, fmt=fmt.name, candidates=cands,
                                        tie=True if args.tie_shared_inputs else None, calibration=cfg.to_dict(),
                                        cache=not args.no_sensitivity_cache, log=log)
        recipe = plan.recipe()
        log(f"budget {args.budget}: plan in {time.perf_counter() - t1:.1f} s (streamed); {recipe.description}")
        if args.save_recipe:
            recipe.save(args.save_recipe)
            log(f"recipe written to {args.save_recipe}")
        metrics = {"budget_plan": plan.to_dict()}
        if fmt.name == "gguf":
            # as without --stream: the plan's costs were measured with llama.cpp's encoders weighted
            # by each input's mean x^2, so an imatrix of the same windows encodes the file; collected
            # here one decoder block at a time
            from lowbit.budget.streamed import streamed_imatrix
            imatrix = streamed_imatrix(args.model, tokens, str(cfg.text))
            log(f"imatrix of {tokens.shape[0]} windows collected block by block")
    state = out.parent / f".{out.name}.resume"
    if (args.fresh or args.no_resume) and state.exists():
        # the streamed run always keeps its finished blocks there (they are its spool): these two
        # options only drop an earlier run's
        shutil.rmtree(state)
        log(f"dropped the resume state {state}")
    # native: shards of 1GB unless told (streaming writes one shard at a time); another format is
    # converted from the streamed native output with that format's own default, as without --stream
    shard = args.max_shard_size or (STREAM_MAX_SHARD if fmt.name == "native" else None)
    path = quantize_streaming(args.model, recipe, out, max_shard_size=shard, overwrite=args.overwrite,
                              calibration=overrides, state_dir=state, log=log, format=fmt.name, metrics=metrics,
                              imatrix=imatrix)
    print(f"quantized {args.model} with {recipe.name}, streamed -> {path}")
    return 0
