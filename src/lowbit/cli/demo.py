"""`lowbit demo` (what `make demo` runs): the bundled model before and after round-to-nearest
4-bit quantization (group 128), measured on real text, with one greedy completion from each.

It uses a smaller token budget than `lowbit eval` (8 windows of 512 instead of 64) so it finishes
in a few minutes on two cores, and says so in its output.
"""
from __future__ import annotations

import sys
import time

DEMO_SEQ_LEN = 512
DEMO_MAX_TOKENS = 4096
DEMO_SPEED = {"prompt_len": 64, "new_tokens": 16, "runs": 3, "warmup": 1}


def register(sub) -> None:
    p = sub.add_parser("demo", help="quantize the bundled model (RTN 4-bit g128) and show what it cost",
                       description="Load the bundled SmolLM2-135M-Instruct, quantize it with round-to-"
                                   "nearest 4-bit group 128, and print size, perplexity, KL, top-1 "
                                   "agreement, tokens/s and a greedy completion before and after.")
    p.add_argument("--model", default="smollm2-135m", help="model to quantize (default: %(default)s)")
    p.add_argument("--recipe", default="w4g128-rtn", help="data-free recipe (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=DEMO_MAX_TOKENS,
                   help="perplexity/KL token budget (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=DEMO_SEQ_LEN, help="window length (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=DEMO_SPEED["new_tokens"],
                   help="tokens to generate per speed run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=DEMO_SPEED["runs"], help="timed speed runs (default: %(default)s)")
    p.add_argument("--json", metavar="OUT", help="also write both records as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def run(args) -> int:
    import copy

    import torch

    from lowbit import api
    from lowbit.eval import (evaluate, evaluate_reference, format_table, prepare_for_inference,
                             write_json)
    from lowbit.eval.memory import peak_rss_bytes
    from lowbit.models import resolve_source

    t0 = time.perf_counter()
    progress = not args.no_progress
    n_windows = args.max_tokens // args.seq_len
    speed = {**DEMO_SPEED, "new_tokens": args.new_tokens, "runs": args.runs}
    settings = dict(text="wiki-evaluation", seq_len=args.seq_len, max_tokens=args.max_tokens,
                    kl_max_tokens=args.max_tokens, speed=speed, progress=progress)
    _say(f"lowbit demo: {args.model} in fp32 vs {args.recipe}, measured on the bundled Wikipedia "
         "evaluation text")
    _say(f"  budget: {n_windows} windows of {args.seq_len} tokens ({n_windows * (args.seq_len - 1):,} "
         "scored tokens) for perplexity and for KL/top-1 -- smaller than `lowbit eval`'s default "
         "(64 windows) so the demo takes a few minutes; run `lowbit eval` for the full figures")
    _say(f"  speed: batch 1, greedy, KV cache; {speed['prompt_len']}-token prompt, {speed['new_tokens']} "
         f"new tokens, median of {speed['runs']} runs after a warm-up; torch threads {torch.get_num_threads()}")

    _say("\n[1/4] loading the model (the first run dequantizes the GGUF to fp32 once, ~20 s, and caches it)")
    kind, src = resolve_source(args.model)
    lm = api.load_model(args.model)
    _say(f"  {lm.model.config.model_type}, {sum(p.numel() for p in lm.model.parameters()):,} parameters, "
         f"from {src.name if hasattr(src, 'name') else src}")

    _say("\n[2/4] evaluating the fp32 model (its log-probs become the KL reference)")
    base, ref = evaluate_reference(lm.model, lm.tokenizer, label="fp32",
                                   metrics=["ppl", "size", "speed", "memory"], path=lm.path,
                                   source_path=src if kind == "gguf" else None, **settings)

    _say(f"\n[3/4] quantizing a copy with {args.recipe}")
    qmodel = copy.deepcopy(lm.model)
    rep = api.quantize(qmodel, args.recipe, progress=progress)
    _say(f"  {len(rep.layers)} linear layers quantized in {rep.seconds:.1f} s "
         f"({rep.recipe.description or rep.recipe.name})")
    for note in rep.notes:
        _say(f"  note: {note}")
    inf = prepare_for_inference(qmodel)
    _say(f"  inference path: {inf['path']}")

    _say(f"\n[4/4] evaluating the {args.recipe} model against the fp32 reference")
    quant = evaluate(qmodel, lm.tokenizer, label=args.recipe, reference=ref,
                     metrics=["ppl", "kl", "size", "speed", "memory"], **settings)

    for r in (base, quant):  # one process holds both models: its peak belongs to neither column
        r["memory"].pop("peak_rss_bytes", None)
    _say("\n" + format_table([base, quant], ["fp32", args.recipe]))
    _say(_summary(base, quant, args.recipe))
    prompt = base["speed"]["prompt_text"]
    _say("\ngreedy completion of the first "
         f"{speed['prompt_len']} tokens of the evaluation text:\n  prompt: ...{prompt[-160:]!r}")
    _say(f"  fp32          : {base['speed']['completion_text']!r}")
    _say(f"  {args.recipe:14s}: {quant['speed']['completion_text']!r}")
    _say(f"\nprocess peak RSS {peak_rss_bytes() / (1 << 20):,.0f} MiB; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        _say(f"wrote {write_json({'fp32': base, args.recipe: quant}, args.json)}")
    return 0


def _summary(base: dict, quant: dict, name: str) -> str:
    sb, sq = base["size"], quant["size"]
    pb, pq = base["ppl"]["ppl"], quant["ppl"]["ppl"]
    k = quant["kl"]
    vb, vq = base["speed"], quant["speed"]
    lines = [
        f"\n{name}: {sb['packed_bytes'] / sq['packed_bytes']:.2f}x smaller packed "
        f"({sq['linear_bits_per_weight']:.3f} bits/weight in the linears, scales included; embeddings and "
        "norms stay fp32)",
        f"  perplexity {pb:.3f} -> {pq:.3f} ({100 * (pq / pb - 1):+.2f} %), KL mean {k['mean']:.4f} nats, "
        f"p99 {k['p99']:.4f}, top-1 agreement {100 * k['top1_agreement']:.2f} %",
        f"  decode {vb['decode_tokens_per_s']:.2f} -> {vq['decode_tokens_per_s']:.2f} tokens/s, prompt "
        f"{vb['prompt_tokens_per_s']:.1f} -> {vq['prompt_tokens_per_s']:.1f} tokens/s "
        f"({quant['inference']['path']})",
    ]
    if quant["inference"].get("with_kernel", 0) == 0 and quant["inference"].get("quant_linears"):
        lines.append("  (slower than fp32 today: the quantized layers run the reference path that "
                     "dequantizes every weight on each forward; packed CPU kernels replace it)")
    return "\n".join(lines)
