"""Whole-model CPU inference: decode and prompt tokens/s and resident memory, lowbit vs float vs llama.cpp.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_decode.py --threads 2 --repeats 3 \
        --gguf Q4_K_M=DIR/smollm2-Q4_K_M.gguf --gguf Q8_0=DIR/smollm2-Q8_0.gguf [--json out.json]
    .venv/bin/python bench/bench_decode.py --profile int4          # where a decode step's time goes
    .venv/bin/python bench/bench_decode.py --load-native DIR --tg 16 --repeats 2   # load path memory

Each variant runs in its own process (so its RSS is its own), variants interleaved `--repeats`
times; figures are medians over repeats (and the best repeat, for a shared box), ratios are
against fp32 from the same repeats.
Our variants all use lowbit.nn.decode.generate (one loop: HF forward + DynamicCache, greedy):
    fp32, bf16         the float model as loaded
    int8               w8 per-channel symmetric RTN on every linear, lm_head included
    int4               w4 g128 asymmetric RTN on the blocks' linears + lm_head int8 per channel
    int4-fp32-head     the w4g128-rtn preset as is (lm_head stays fp32: 28M of 134M weights)
    int4-bf16          int4 with bf16 activations (our kernels accumulate in fp32)
    int4-act-fp32      int4 with fp32 decode activations in every kernel (lowbit.nn.kernels)
    int4-act-int8      int4 with int8 decode activations in every kernel, lm_head too
    int4-pp-int8       int4 with the int8 prefill GEMM (lowbit.nn.kernels.PREFILL_ACT="int8")
                       (plain int4 runs the default, "auto": int8 for the 4-bit layers, fp32 lm_head)
    --native L=DIR     a saved lowbit output read with backend "auto" (e.g. a w2g64-vq model)
    <name>-hf          the same model through the Hugging Face forward + DynamicCache (generate(step=False));
                       without -hf, Llama-family models run lowbit.nn.step (fused q/k/v, gate/up, static KV cache)
LOWBIT_ISA=avx2 (or avx512vnni, avx512, portable) in the environment runs every variant on that
ISA variant of our kernels; the table header says which one ran.
llama.cpp (llama-cpp-python from bench/.venv-llamacpp, bench/peers/llamacpp_ref.py speed): same
thread count, same 16-token decode prompt / pp-token prompt from the bundled evaluation text.
prompt tok/s = pp tokens in one forward into an empty cache; decode tok/s = tg greedy tokens
after a 16-token prompt, EOS ignored. RSS = resident set after setup (ours) and the peak of the
process (wait4 ru_maxrss; for ours it includes quantizing on load, see export.native.read for the
deployment path). "RSS serving" = resident set after the timed runs (every weight page touched;
right after loading, a memory-mapped float checkpoint is only partly resident).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["fp32", "bf16", "int8", "int4", "int4-fp32-head", "int4-bf16", "int4-act-fp32", "int4-act-int8",
            "int4-pp-int8", "fp32-hf", "int4-hf"]
# `make peers` builds it; LOWBIT_LLAMACPP_PY (or --llama-py) points elsewhere (e.g. a venv shared by
# worktrees, or an AVX2-only build: LLAMACPP_VENV=bench/.venv-llamacpp-avx2 in bench/setup_peers.sh)
LLAMA_PY = Path(os.environ.get("LOWBIT_LLAMACPP_PY", ROOT / "bench" / ".venv-llamacpp" / "bin" / "python"))
MODEL = os.environ.get("LOWBIT_BENCH_MODEL", "smollm2-135m")   # or --model


def build_variant(name: str):
    """-> (model, tokenizer) for one variant, kernels attached."""
    import torch

    from lowbit import api
    from lowbit.models import load_model
    from lowbit.nn.prepare import prepare_for_inference
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule, get_recipe

    if name.startswith("native:"):          # --native LABEL=DIR: a saved lowbit output on its kernels
        lm = api.load(name.split(":", 1)[1], backend="auto")
        import gc
        gc.collect()
        return lm.model, lm.tokenizer
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    lm = load_model(MODEL, dtype=dtype)
    model = lm.model
    recipe = None
    if name == "int8":
        recipe = Recipe("w8c-all", [Rule(r".*", int_scheme(8, None, symmetric=True))], ignore=[])
    elif name in ("int4", "int4-bf16", "int4-act-fp32", "int4-act-int8", "int4-pp-int8"):
        recipe = Recipe("w4g128+head-w8c", [Rule(r"lm_head", int_scheme(8, None, symmetric=True)),
                                            Rule(r".*", int_scheme(4, 128))], ignore=[])
    elif name == "int4-fp32-head":
        recipe = get_recipe("w4g128-rtn")
    if recipe is not None:
        api.quantize(model, recipe, progress=False)
        prepare_for_inference(model)
        if "-act-" in name:
            from lowbit.nn.kernels import set_decode_activations
            set_decode_activations(model, name.rsplit("-", 1)[1])
        if name == "int4-pp-int8":
            from lowbit.nn.kernels import set_prefill_activations
            set_prefill_activations(model, "int8")
    import gc
    gc.collect()
    return model, lm.tokenizer


def prompt_ids(tok, n: int):
    import torch

    from lowbit.data.text import load_text
    ids = tok(load_text("wiki-evaluation")[:40000], return_tensors="pt").input_ids[0]
    return torch.as_tensor(ids[:n])[None]


def worker(name: str, threads: int, pp: int, tg: int, runs: int) -> dict:
    import psutil
    import torch

    from lowbit.nn.decode import generate
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    step = False if name.endswith("-hf") else None
    model, tok = build_variant(name.removesuffix("-hf"))
    setup_s = time.perf_counter() - t0
    rss = psutil.Process().memory_info().rss
    long_ids, short_ids = prompt_ids(tok, pp), prompt_ids(tok, 16)
    with torch.inference_mode():
        generate(model, short_ids, 4, step=step)            # warm-up
        generate(model, long_ids, 1, step=step)
        pps, tgs, toks = [], [], None
        for _ in range(runs):
            # prefill: pp tokens into an empty cache, last-position logits
            pps.append(pp / generate(model, long_ids, 1, step=step).prefill_seconds)
            r = generate(model, short_ids, tg + 1, min_new_tokens=tg + 1, step=step)
            tgs.append(r.decode_tokens_per_s)
            toks = r.tokens[:8]
    rss_serving = psutil.Process().memory_info().rss   # every weight page touched by now
    wbytes = weight_bytes_per_token(model)
    from lowbit.nn import ext
    isa = ext.isa() if ext.load() else ext.status()
    from lowbit.nn.vq import table_kernels
    if table_kernels(model):          # the codebooks' lookup tables: i16-vbmi | i16-shuffle | f32
        isa += f", vq tables {table_kernels(model)}"
    return {"isa": isa, "variant": name, "threads": threads, "pp_tok_per_s": statistics.median(pps),
            "tg_tok_per_s": statistics.median(tgs), "rss_mb": rss_serving / 2**20,
            "rss_after_setup_mb": rss / 2**20, "setup_s": setup_s,
            "first_tokens": toks, "loadavg_1m": os.getloadavg()[0], "weight_bytes_per_token": wbytes}


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step must read: every linear's packed codes + qparams (or float weight) and
    the norms; the embedding contributes one row."""
    import torch

    from lowbit.nn.prepare import PackedLinear
    from lowbit.nn.vq import VQLinear
    n = 0
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            n += mod.packed.nbytes()
        elif isinstance(mod, VQLinear):
            n += sum(b.numel() * b.element_size() for b in (mod.indices, mod.scale, mod.codebook))
        elif type(mod) is torch.nn.Linear or "RMSNorm" in type(mod).__name__:
            n += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
    return n


def bandwidth_worker(threads: int, mib: int = 1024, reps: int = 5) -> dict:
    """Read bandwidth: torch.sum over a `mib` MiB fp32 tensor with `threads` threads, best of reps."""
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(reps))
    return {"read_gib_per_s": mib / 1024 / best, "mib": mib, "threads": threads}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def load_worker(kind: str, path: str, threads: int, tg: int) -> dict:
    """Peak memory of a load path, then a short greedy run so every weight page is touched:
    fp32 = load_model (float checkpoint); packed = load_model(DIR, backend='auto') (native dir, no float linears)."""
    import psutil
    import torch

    from lowbit.nn.decode import generate
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if kind == "packed":
        from lowbit.models import load_model
        lm = load_model(path, backend="auto")
    else:
        from lowbit.models import load_model
        lm = load_model(path)
    load_s = time.perf_counter() - t0
    r = generate(lm.model, prompt_ids(lm.tokenizer, 16), tg + 1, min_new_tokens=tg + 1)
    return {"variant": f"load {kind}", "load_s": load_s, "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "tg_tok_per_s": r.decode_tokens_per_s, "pp_tok_per_s": float("nan")}


def run_child(cmd: list[str]) -> tuple[dict, float]:
    """Run a child that prints one JSON object last; -> (that object, its peak RSS in MiB)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({p.returncode}): {out[-2000:]}")
    start = out.rfind("\n{") + 1 if not out.lstrip().startswith("{") else out.index("{")
    return json.loads(out[start:]), usage.ru_maxrss / 1024


def profile(name: str, threads: int, tg: int) -> None:
    """Print where a decode step's time goes (torch profiler, grouped)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    from lowbit.nn.decode import generate
    torch.set_num_threads(threads)
    model, tok = build_variant(name)
    ids = prompt_ids(tok, 16)
    generate(model, ids, 4)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        r = generate(model, ids, tg + 1, min_new_tokens=tg + 1)
    total = r.decode_seconds + r.prefill_seconds
    ev = prof.key_averages()
    groups = {"linear kernels (lowbit_cpu::*, aten::mm/addmm/linear)": 0.0, "attention (sdpa)": 0.0}
    for e in ev:
        key = e.key
        if key.startswith("lowbit_cpu::") or key in ("aten::mm", "aten::addmm", "aten::_weight_int4pack_mm_for_cpu"):
            groups["linear kernels (lowbit_cpu::*, aten::mm/addmm/linear)"] += e.self_cpu_time_total
        elif "scaled_dot_product" in key:
            groups["attention (sdpa)"] += e.self_cpu_time_total
    print(f"{name}: {tg + 1} tokens in {total:.2f} s wall ({r.decode_tokens_per_s:.1f} tok/s decode)")
    for g, us in groups.items():
        print(f"  {g:55s} {us / 1e6:6.2f} s  {100 * us / 1e6 / total:5.1f}% of wall")
    print(f"  {'everything else (HF Python, norms, rotary, cache, dispatch)':55s} "
          f"{total - sum(groups.values()) / 1e6:6.2f} s  "
          f"{100 * (1 - sum(groups.values()) / 1e6 / total):5.1f}% of wall")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2, help="timed runs inside each process")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--gguf", action="append", default=[], metavar="LABEL=PATH",
                    help="a GGUF for llama.cpp to run beside ours (repeatable)")
    ap.add_argument("--native", action="append", default=[], metavar="LABEL=DIR",
                    help="a saved lowbit native directory as a variant (read with backend auto), e.g. vq2=DIR")
    ap.add_argument("--json", default=None)
    ap.add_argument("--llama-py", default=str(LLAMA_PY), help="python of the llama-cpp-python venv for --gguf")
    ap.add_argument("--model", default=MODEL, help="lowbit model name or path (default %(default)s)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile", default=None, metavar="VARIANT")
    ap.add_argument("--load-native", default=None, metavar="DIR",
                    help="instead: peak RSS of load_model(fp32) vs load_model(DIR, backend='auto'), a lowbit native dir")
    ap.add_argument("--load-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["LOWBIT_BENCH_MODEL"] = args.model     # children read it
    MODEL = args.model
    if args.bandwidth_worker:
        print(json.dumps(bandwidth_worker(args.threads)))
        return
    if args.load_worker:
        print(json.dumps(load_worker(args.load_worker[0], args.load_worker[1], args.threads, args.tg)))
        return
    if args.load_native:
        for rep in range(args.repeats):
            for kind, path in (("fp32", "smollm2-135m"), ("packed", args.load_native)):
                res, peak = run_child([sys.executable, __file__, "--load-worker", kind, path,
                                       "--threads", str(args.threads), "--tg", str(args.tg)])
                print(f"[{rep + 1}/{args.repeats}] load {kind:6s} {res['load_s']:6.1f} s  peak RSS {peak:6.0f} MiB  "
                      f"RSS serving {res['rss_mb']:6.0f} MiB  decode {res['tg_tok_per_s']:.1f} tok/s", flush=True)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.pp, args.tg, args.runs)))
        return
    if args.profile:
        profile(args.profile, args.threads, args.tg)
        return
    jobs = [(v, [sys.executable, __file__, "--worker", v, "--threads", str(args.threads), "--pp", str(args.pp),
                 "--tg", str(args.tg), "--runs", str(args.runs)]) for v in args.variants.split(",") if v]
    for spec in args.native:
        label, _, path = spec.partition("=")
        jobs.append((label, [sys.executable, __file__, "--worker", f"native:{path}", "--threads", str(args.threads),
                             "--pp", str(args.pp), "--tg", str(args.tg), "--runs", str(args.runs)]))
    for spec in args.gguf:
        label, _, path = spec.partition("=")
        jobs.append((f"llama.cpp {label}", [args.llama_py, str(ROOT / "bench/peers/llamacpp_ref.py"), "speed",
                                           path, "--threads", str(args.threads), "--tg", str(args.tg),
                                           "--pp", str(args.pp), "--runs", str(args.runs)]))
    results: dict[str, list] = {name: [] for name, _ in jobs}
    for rep in range(args.repeats):
        for name, cmd in jobs:
            res, peak = run_child(cmd)
            res["peak_rss_mb"] = peak
            if "tg_tok_per_s" not in res:
                res["tg_tok_per_s"] = res.get("tg_tok_per_s")
            results[name].append(res)
            print(f"[{rep + 1}/{args.repeats}] {name:22s} pp {res['pp_tok_per_s']:7.1f} tok/s  "
                  f"decode {res['tg_tok_per_s']:6.1f} tok/s  peak RSS {peak:6.0f} MiB  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("pp_tok_per_s", "tg_tok_per_s", "peak_rss_mb")}
           for name, rs in results.items()}
    for name, rs in results.items():
        if "rss_mb" in rs[0]:
            med[name]["rss_mb"] = statistics.median(r["rss_mb"] for r in rs)
        med[name]["tg_runs"] = [round(r["tg_tok_per_s"], 1) for r in rs]
        # best of the repeats too: on a shared box the least-disturbed repeat is the closest to the
        # machine's speed (each child's own figures are medians of its --runs)
        med[name]["tg_best"] = max(r["tg_tok_per_s"] for r in rs)
        med[name]["pp_best"] = max(r["pp_tok_per_s"] for r in rs)
    bw, _ = run_child([sys.executable, __file__, "--bandwidth-worker", "--threads", str(args.threads)])
    base = med.get("fp32")
    isa = max((r[0].get("isa") for r in results.values() if r and r[0].get("isa")), key=len, default="-")
    print(f"\nthreads {args.threads}, {args.repeats} repeats x {args.runs} runs, pp {args.pp}, tg {args.tg}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, lowbit kernels ISA variant {isa}\n")
    print("| variant | decode tok/s | vs fp32 | best decode | vs fp32 | prompt tok/s | vs fp32 | best prompt | vs fp32 "
          "| RSS serving MiB | peak RSS MiB | decode runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m in med.items():
        def rel(key):
            return f"{m[key] / base[key]:.2f}x" if base else "-"
        rss = f"{m['rss_mb']:.0f}" if "rss_mb" in m else "-"
        print(f"| {name} | {m['tg_tok_per_s']:.1f} | {rel('tg_tok_per_s')} | {m['tg_best']:.1f} | {rel('tg_best')} | "
              f"{m['pp_tok_per_s']:.1f} | {rel('pp_tok_per_s')} | {m['pp_best']:.1f} | {rel('pp_best')} | {rss} | "
              f"{m['peak_rss_mb']:.0f} | {m['tg_runs']} |")
    gbs = bw["read_gib_per_s"] * 2**30
    print(f"\nread bandwidth ({args.threads} threads, torch.sum over 1 GiB): {bw['read_gib_per_s']:.1f} GiB/s")
    for name, rs in results.items():
        wb = rs[0].get("weight_bytes_per_token")
        if wb:
            ceil = gbs / wb
            print(f"  {name}: {wb / 1e6:.1f} MB read per token -> ceiling {ceil:.0f} tok/s; "
                  f"measured {med[name]['tg_tok_per_s']:.1f} = {100 * med[name]['tg_tok_per_s'] / ceil:.0f}% of it")
        elif "system_info" in rs[0]:
            print(f"  {name}: {rs[0]['system_info'][:160]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "median": med, "runs": results, "bandwidth": bw}, fh, indent=1)


if __name__ == "__main__":
    main()
