"""The KV cache in int8 / fp8 at long context, against the float cache (issue 19).

    PYTHONPATH=src .venv/bin/python bench/bench_kvcache.py --ctx 2048 8192 --windows 2 --threads 2
    PYTHONPATH=src .venv/bin/python bench/bench_kvcache.py --attend --threads 1   # one block's attention

Quality (lowbit.eval.kvcache.long_context): windows of --ctx tokens of wiki-evaluation, fed
through lowbit's step path --chunk tokens at a time, once with a float cache and once with the
quantized one; perplexity, KL(float cache || kv cache) and top-1 agreement per position, and the
change in NLL / KL by quarter of the window (what reading a deep cache back costs).
Speed: greedy decode of --new-tokens single-token steps after a prefill of ctx tokens (chunked,
untimed), median of --runs, every cache in the same process. Memory: the bytes each cache keeps
(the quantized caches also hold one block's float K/V as scratch, reported separately).
--model w4 quantizes the blocks to w4g128 RTN first (packed kernels), to see the cache's cost
beside 4-bit weights. Results: <work>/kvcache.json (a finished row is not redone).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KVS = ("float", "int8", "fp8")


def decode_speed(sm, ids, ctx: int, kv: str, new_tokens: int, runs: int, chunk: int) -> float:
    import torch
    times = []
    with torch.inference_mode():
        for _ in range(runs):
            cache = sm.new_cache(ctx + new_tokens, kv)
            for p0 in range(0, ctx, chunk):
                logits = sm.step(ids[p0:min(ctx, p0 + chunk)], p0, cache)
            nxt = logits.argmax().view(1)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                nxt = sm.step(nxt, cache.pos, cache).argmax().view(1)
            times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def attend_bench(threads: int) -> int:
    """One block's decode attention (SmolLM2's shape: 9 query heads, 3 kv heads, head_dim 64):
    torch's sdpa on a float cache vs lowbit_cpu.kv_attend on int8 / fp8 codes vs dequantize +
    sdpa, microseconds per call (median of 5 x 50)."""
    import torch
    import torch.nn.functional as F
    from bench_activations import median_us
    from lowbit.nn import ext
    from lowbit.nn.step import KVCache
    if not ext.load():
        print(f"lowbit C++ kernels unavailable: {ext.status()}")
        return 1
    torch.set_num_threads(threads)
    H, G, hd = 9, 3, 64
    g = torch.Generator().manual_seed(0)
    for T in (2048, 8192):
        q = torch.randn(H, hd, generator=g)
        kf, vf = torch.randn(G, T, hd, generator=g), torch.randn(G, T, hd, generator=g)
        fns = {"sdpa fp32": lambda: F.scaled_dot_product_attention(q[None, :, None], kf[None], vf[None], scale=0.125,
                                                                   enable_gqa=True)}
        for kv in ("int8", "fp8"):
            c = KVCache(1, G, T, hd, torch.float32, kv)
            k, v = c.layer(0, 0)
            k.copy_(kf), v.copy_(vf)
            c.commit(0, 0, T)
            fns[f"kv_attend {kv}"] = (lambda c=c: c.attend(0, q, T, 0.125))
            if kv == "int8":
                fns["dequantize + sdpa int8"] = (lambda c=c: (c.layer(0, T), fns["sdpa fp32"]()))
        row = {"positions": T, "threads": threads, "isa": ext.isa()}
        for name, fn in fns.items():
            row[f"{name} us"] = round(median_us(fn, warmup=5), 1)
        print(json.dumps(row), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--kv", nargs="+", default=list(KVS[1:]), choices=KVS[1:])
    ap.add_argument("--model", default="fp32", choices=["fp32", "w4"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--attend", action="store_true", help="only the one-block attention microbenchmark")
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "kvcache"))
    args = ap.parse_args()

    if args.attend:
        return attend_bench(args.threads)
    import torch
    from lowbit import api
    from lowbit.data.text import load_text, tokenize_text
    from lowbit.eval.kvcache import long_context
    from lowbit.models import load_model
    from lowbit.nn import ext
    from lowbit.nn.prepare import prepare_for_inference
    from lowbit.nn.step import step_model

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "kvcache.json"
    res = json.loads(out.read_text()) if out.exists() else {}
    lm = load_model("smollm2-135m")
    if args.model == "w4":
        api.quantize(lm.model, "w4g128-rtn", progress=False)
        prepare_for_inference(lm.model)
    ids = tokenize_text(lm.tokenizer, load_text("wiki-evaluation"))
    sm = step_model(lm.model, True)
    meta = {"machine": f"{platform.processor() or platform.machine()} ({ext.status()})", "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model}
    for ctx in args.ctx:
        for kv in args.kv:
            key = f"{args.model}/{ctx}/{kv}"
            if key in res:
                continue
            t0 = time.perf_counter()
            row = long_context(lm.model, ids, ctx, kv, chunk=args.chunk, windows=args.windows)
            row["eval_seconds"] = round(time.perf_counter() - t0, 1)
            row.update(meta)
            res[key] = row
            out.write_text(json.dumps(res, indent=1))
            print(f"{key}: dppl {row['dppl']:+.4f} kl {row['kl']:.5f} top1 {row['top1']:.4f} "
                  f"by quarter dnll {[round(b['dnll'], 4) for b in row['by_position']]}", flush=True)
        if args.no_speed:
            continue
        key = f"{args.model}/{ctx}/speed"
        if key in res:
            continue
        sp = {kv: decode_speed(sm, ids, ctx, kv, args.new_tokens, args.runs, args.chunk) for kv in KVS}
        res[key] = {"decode_tok_s": sp, **meta,
                    "cache_bytes": {kv: sm.new_cache(ctx, kv).nbytes() for kv in KVS},
                    "scratch_bytes": sm.new_cache(ctx, "int8").scratch_bytes()}
        out.write_text(json.dumps(res, indent=1))
        print(f"{key}: {json.dumps(res[key]['decode_tok_s'])} bytes {json.dumps(res[key]['cache_bytes'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
