"""`lowbit eval`: perplexity, KL / top-1 against a reference, size, speed and memory of a model.

    lowbit eval smollm2-135m                                  the bundled fp32 model
    lowbit eval smollm2-135m --recipe w4g128-rtn              quantize in this process, KL vs the original
    lowbit eval path/to/hf_dir --ref smollm2-135m --json out.json
    lowbit eval path/to/lowbit_native_dir --ref smollm2-135m   a model written by `lowbit quantize`

Quantized layers run on packed kernels (lowbit.nn.prepare.prepare_for_inference), as a user runs
them; --backend reference measures QuantLinear's dequantize-then-matmul path instead.
"""
from __future__ import annotations

import sys

from lowbit.cli.argtypes import positive_int


def register(sub) -> None:
    from lowbit.eval import DEFAULT_KL_MAX_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, SCORE_MODES
    from lowbit.eval.harness import DEFAULT_SPEED
    p = sub.add_parser("eval", help="measure perplexity, KL/top-1 vs a reference, size, speed, memory",
                       description="Evaluate a model on real text. Prints a table and, with --json, "
                                   "writes the full record (every metric states its exact method).")
    p.add_argument("model", help="built-in name (e.g. smollm2-135m), .gguf file or Hugging Face directory")
    p.add_argument("--ref", metavar="MODEL", help="reference model for KL and top-1 agreement "
                   "(its log-probs are computed once and cached under the lowbit cache dir)")
    p.add_argument("--recipe", metavar="RECIPE", help="quantize MODEL in this process with a data-free "
                   "recipe (e.g. w4g128-rtn) before evaluating; KL is then measured against MODEL itself "
                   "unless --ref is given")
    p.add_argument("--text", default="wiki-evaluation",
                   help="named text (wiki-evaluation, wiki-calibration), a UTF-8 file or a directory "
                        "(default: %(default)s)")
    p.add_argument("--seq-len", type=positive_int, default=DEFAULT_SEQ_LEN, help="window length in tokens (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="perplexity token budget: the first max_tokens // seq_len windows (default: %(default)s)")
    p.add_argument("--score", choices=SCORE_MODES, default="all",
                   help="'all': every token after the first of each window; 'second-half': llama.cpp's "
                        "llama-perplexity convention (default: %(default)s)")
    p.add_argument("--kl-tokens", type=int, default=DEFAULT_KL_MAX_TOKENS,
                   help="KL / top-1 token budget, the first windows of the perplexity ones (default: %(default)s)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated subset of ppl,kl,size,speed,memory (default: all; kl only with "
                        "--ref or --recipe)")
    p.add_argument("--speed-prompt-len", type=int, default=DEFAULT_SPEED["prompt_len"])
    p.add_argument("--speed-new-tokens", type=int, default=DEFAULT_SPEED["new_tokens"])
    p.add_argument("--speed-runs", type=int, default=DEFAULT_SPEED["runs"])
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-cache", action="store_true", help="recompute the reference log-probs, don't cache them")
    p.add_argument("--backend", default="auto", choices=("auto", "ext", "torch", "tiled", "reference"),
                   help="how quantized layers run: packed kernels (auto: the fastest available here; "
                        "see lowbit.nn.kernels) or 'reference' (QuantLinear's dequantize-then-matmul) "
                        "(default: %(default)s)")
    p.add_argument("--json", metavar="OUT", help="write the record as JSON to OUT (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import gc

    import torch

    from lowbit.errors import LowbitError
    from lowbit.eval import (evaluate, format_methods, format_table, parse_metrics, reference_for,
                             write_json)
    from lowbit.models import load_model, resolve_source

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json:
        from lowbit.export.common import check_writable
        check_writable(args.json, single_file=True)     # before the run, not after it
    have_ref = bool(args.ref or args.recipe)
    if args.metrics is None:
        metrics = [m for m in parse_metrics(None) if m != "kl" or have_ref]
    else:
        metrics = list(parse_metrics(args.metrics))
        if "kl" in metrics and not have_ref:
            raise LowbitError("--metrics kl needs a reference: --ref MODEL, or --recipe (KL against "
                              "MODEL itself before quantization)")
    progress = not args.no_progress
    common = dict(text=args.text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                  kl_max_tokens=args.kl_tokens, score=args.score)
    kind, src = resolve_source(args.model)   # clear error for a missing model before any work
    lm = load_model(args.model)
    from lowbit.errors import check_context
    check_context(lm.model.config, args.seq_len, "--seq-len")      # windows past the context are garbage
    ref = None
    if "kl" in metrics and args.ref:
        ref_lm = load_model(args.ref)
        ref = reference_for(ref_lm.model, ref_lm.tokenizer, cache=not args.no_cache, progress=progress, **common)
        del ref_lm
        gc.collect()
    label = args.model
    if args.recipe:
        from lowbit import api
        if "kl" in metrics and ref is None:
            ref = reference_for(lm.model, lm.tokenizer, cache=not args.no_cache, progress=progress, **common)
        rep = api.quantize(lm.model, args.recipe, progress=progress)
        label = f"{args.model} {rep.recipe.name}"
        for note in rep.notes:
            print(f"note: {note}", file=sys.stderr)
    if args.backend != "reference":
        from lowbit.nn.prepare import prepare_for_inference
        from lowbit.nn.qlinear import QuantLinear
        if any(isinstance(m, QuantLinear) for m in lm.model.modules()):
            prepare_for_inference(lm.model, args.backend)
    kl_acc = None
    if ref is not None:   # per-token KL for the histogram in `lowbit report`
        from lowbit.eval.kl import KLAccumulator
        kl_acc = KLAccumulator(ref)
    rec = evaluate(lm.model, lm.tokenizer, metrics=metrics, reference=ref, label=label, consumers=[kl_acc] if kl_acc else (),
                   path=None if args.recipe else lm.path, source_path=src if kind == "gguf" else None,
                   speed={"prompt_len": args.speed_prompt_len, "new_tokens": args.speed_new_tokens,
                          "runs": args.speed_runs},
                   cache=not args.no_cache, progress=progress, **common)
    rec["command"] = ["lowbit", "eval", *sys.argv[2:]] if sys.argv[1:2] == ["eval"] else None
    if args.recipe:
        rec["recipe"] = rep.recipe.to_dict()
        rec["quantize_notes"] = rep.notes
    if kl_acc is not None and kl_acc.kl:
        from lowbit.eval.report_html import kl_histogram
        rec["kl_histogram"] = kl_histogram(torch.cat(kl_acc.kl))
    from lowbit.runs import record_run
    record_run("eval", model=args.model, source_sha256=lm.source_sha256,
               recipe=rec.get("recipe") or (lm.meta.get("manifest") or {}).get("lowbit_recipe"),
               metrics={k: rec[k] for k in ("ppl", "kl", "size", "speed", "memory") if k in rec},
               output=args.json)
    print(format_table([rec], [label]))
    print("method:")
    print(format_methods(rec))
    if "speed" in rec:
        print(f"greedy completion of the speed prompt: {rec['speed']['completion_text']!r}")
    if args.json:
        print(f"wrote {write_json(rec, args.json)}")
    return 0
