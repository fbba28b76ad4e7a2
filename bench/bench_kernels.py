"""Per-layer speed of quantized linears on packed weights vs torch's float and int8 baselines.

    .venv/bin/python bench/bench_kernels.py --threads 2 [--rounds 5] [--json out.json]

Shapes: 4096x4096 and every linear shape of the bundled model (SmolLM2-135M: q/o 576x576, k/v
192x576, gate/up 1536x576, down 576x1536, lm_head 49152x576), batch 1 (decode) and 32.
`--shapes "qwen q|k|v,qwen o_proj,qwen gate|up,qwen down"` times Qwen2.5-1.5B's decode-step calls
("qwen lm_head", 151936x1536: 233 MB of 8-bit codes, the one shape here that streams from DRAM).
Variants, all on the same random weight (N(0, 0.02)):
    fp32 / bf16          F.linear on the float weight
    qdyn-int8            torch.ao.quantization.quantize_dynamic (int8 weights and activations)
    ours-int8 / -int4    lowbit PackedLinear, backend ext: w8 per channel sym / w4 g128 asym, fp32 activations
    torch-int4-bf16      lowbit's torch backend: aten._weight_int4pack_mm_for_cpu with bf16 activations
    ours-*-<isa>[-i8]    with --isas: our kernels on each ISA variant of nn/ext (-i8: int8 decode activations)
Timing: variants are interleaved in `rounds` rounds (so load from other processes hits them alike);
each round times `iters` calls and keeps the median; the table shows the median over rounds and
the ratio to fp32 from the same rounds. Weights are re-read every call but mostly stay in the 32 MiB
L3 here (not the lm_head, nor 4096x4096 in fp32): whole-model decode (bench_decode.py) is the
memory-bound figure.

    .venv/bin/python bench/bench_kernels.py --ternary --isas avx512vnni,avx2 --batches 1

times BitNet b1.58 layers (ternary per tensor, int8 per-token input rounding) on the 2-bit ternary
kernel and on the nibble container they used before, beside our w4g64 with int8 decode activations.

    .venv/bin/python bench/bench_kernels.py --prefill-cpu 128 --rounds 10 [--prefill-shapes smol,qwen]

times the prefill-sized (fused) linears of the bundled model (and of Qwen2.5-1.5B) in CPU time on
one thread: fp32 F.linear vs our w4g128 fp32 GEMM vs the tile + MKL path it replaced vs the int8
prefill GEMM (see prefill_cpu).

    .venv/bin/python bench/bench_kernels.py --prefill-accuracy [--max-tokens 2048]

measures what int8 *prefill* activations cost: the same models and metrics as --act-accuracy, with
every 512-token window through the prefill GEMM (fp32 activations vs rounded per chunk to int8).

    .venv/bin/python bench/bench_kernels.py --act-accuracy [--max-tokens 2048]

instead measures what int8 decode activations cost in accuracy on the bundled model: perplexity
and KL (lowbit.eval, wiki-evaluation, 512-token windows) of the int4 model (w4g128 blocks, w8
per-channel lm_head) and the int8 one (w8 per channel everywhere), with fp32 vs int8 activations
(and "auto": int8 for the 4-bit codes, fp32 for the 8-bit lm_head), KL against both the fp32 model and the same model's fp32-activation kernels. Every row of each
window goes through the decode (GEMV) kernels, one token's activations rounded on their own, as
generate() rounds them one step at a time (GEMV_MAX_M raised for the run).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.nn import ext, kernels
from lowbit.nn.prepare import PackedLinear
from lowbit.numerics.qweight import quantize_weight
from lowbit.numerics.scheme import int_scheme

SHAPES = [("4096x4096", 4096, 4096), ("q/o_proj", 576, 576), ("k/v_proj", 192, 576),
          ("gate/up_proj", 1536, 576), ("down_proj", 576, 1536), ("lm_head", 49152, 576)]
# Qwen2.5-1.5B's decode-step calls (q|k|v and gate|up fused as nn/step.py does), only with --shapes
QWEN_SHAPES = [("qwen q|k|v", 2048, 1536), ("qwen o_proj", 1536, 1536), ("qwen gate|up", 17920, 1536),
               ("qwen down", 1536, 8960), ("qwen lm_head", 151936, 1536)]


def time_call(fn, iters: int) -> float:
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def variants(n: int, k: int, m: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    wb, xb = w.bfloat16(), x.bfloat16()
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data.copy_(w)
    qdyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    q8 = PackedLinear(quantize_weight(w, int_scheme(8, None, symmetric=True)), backend="ext")
    q4 = PackedLinear(quantize_weight(w, int_scheme(4, 128)), backend="ext")
    t4 = PackedLinear(quantize_weight(w, int_scheme(4, 128)), backend="torch")
    return {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb),
            "qdyn-int8": lambda: qdyn(x), "ours-int8": lambda: q8(x), "ours-int4": lambda: q4(x),
            "torch-int4-bf16": lambda: t4(xb)}


def isa_variants(n: int, k: int, m: int, isas: list[str], seed: int = 0) -> dict:
    """ours-int4 / ours-int8 on each ISA variant, fp32 and int8 activations."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    out = {"fp32": lambda: F.linear(x, w)}
    for label, scheme in (("int4", int_scheme(4, 128)), ("int8", int_scheme(8, None, symmetric=True))):
        for act in ("fp32", "int8"):
            lin = PackedLinear(quantize_weight(w, scheme), backend="ext")
            lin.packed.set_act(act)
            for isa in isas:
                def call(lin=lin, isa=isa):
                    ext.set_isa(isa)
                    return lin(x)
                out[f"ours-{label}-{isa}" + ("-i8" if act == "int8" else "")] = call
    return out


def ternary_variants(n: int, k: int, m: int, isas: list[str], seed: int = 0) -> dict:
    """BitNet b1.58 layers (ternary per tensor, int8 per-token input rounding) on the 2-bit kernel
    (TernaryKernel, rounding in C++) and on the nibble container (kernels.TERNARY_T2 = False: fp32
    table GEMV, rounding in torch), beside our w4g64 with int8 decode activations, per ISA."""
    from lowbit.nn.actquant import ActQuant
    from lowbit.numerics.activation import ActScheme
    from lowbit.numerics.scheme import Scheme
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    tok = ActScheme(format="int8", dynamic=True, granularity="token")
    tern = quantize_weight(w, Scheme(bits=2, format="ternary", granularity="tensor"))
    t2 = PackedLinear(tern, backend="ext", act_quant=ActQuant(tok))
    kernels.TERNARY_T2 = False
    tq4 = PackedLinear(tern, backend="ext", act_quant=ActQuant(tok))
    kernels.TERNARY_T2 = True
    w4 = PackedLinear(quantize_weight(w, int_scheme(4, 64)), backend="ext")
    w4.packed.set_act("int8")
    out = {"fp32": lambda: F.linear(x, w)}
    for isa in isas:
        for label, lin in (("w4g64-i8", w4), ("ternary-q4", tq4), ("ternary-t2", t2)):
            def call(lin=lin, isa=isa):
                ext.set_isa(isa)
                return lin(x)
            out[f"{label}-{isa}"] = call
    return out


PREFILL_SHAPES = {"smol": [("q|k|v fused", 960, 576), ("o_proj", 576, 576), ("gate|up fused", 3072, 576),
                           ("down_proj", 576, 1536)],
                  "qwen": [("qwen q|k|v", 2048, 1536), ("qwen o_proj", 1536, 1536),
                           ("qwen gate|up", 17920, 1536), ("qwen down", 1536, 8960)]}


def prefill_cpu(m: int, rounds: int, sets: list[str]) -> None:
    """Prefill-sized linears (the step's fused calls), fp32 F.linear vs our int4 w4g128 fp32 GEMM vs
    the tile + MKL path (fp32 activations both) vs the int8 prefill GEMM. Timed in *process CPU
    time* on one thread, best of `rounds`: on a box shared with other engineers' jobs the wall
    clock of a 2-thread call mostly measures the scheduler, while the CPU time a call uses is its
    own work (cache sharing aside)."""
    torch.set_num_threads(1)
    paths = ("fp32", "fp32-mkl", "int8")
    tot = {nm: 0.0 for nm in ("F.linear",) + paths}
    print("| layer | N x K | M | fp32 F.linear ms | int4 fp32 GEMM ms | vs fp32 | int4 tile + MKL ms | vs fp32 "
          "| int4 int8 GEMM ms | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, n, k in [s for name in sets for s in PREFILL_SHAPES[name]]:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(n, k, generator=g) * 0.02, torch.randn(m, k, generator=g)
        qw = quantize_weight(w, int_scheme(4, 128))
        fns = {"F.linear": lambda: F.linear(x, w)}
        for path in paths:
            lin = PackedLinear(qw, backend="ext")
            lin.packed.set_prefill(path)
            fns[path] = lin
        best = {nm: float("inf") for nm in fns}
        with torch.inference_mode():
            for _ in range(rounds):
                for nm, fn in fns.items():
                    fn() if nm == "F.linear" else fn(x)
                    t = time.process_time()
                    for _ in range(4):
                        fn() if nm == "F.linear" else fn(x)
                    best[nm] = min(best[nm], (time.process_time() - t) / 4)
        for nm in fns:
            tot[nm] += best[nm]
        print(f"| {label} | {n}x{k} | {m} | " + _prefill_cells(best), flush=True)
        if label.startswith("down") or label == "qwen down":
            print(f"| one block | | {m} | " + _prefill_cells(tot))
            tot = {nm: 0.0 for nm in tot}
    print(f"\n1 thread, process CPU time, best of {rounds} rounds, ISA variant {ext.isa()}, torch {torch.__version__}")


def _prefill_cells(t: dict) -> str:
    b = [v * 1e3 for v in t.values()]
    return f"{b[0]:.2f} | " + " | ".join(f"{v:.2f} | {b[0] / v:.2f}x" for v in b[1:]) + " |"


def act_accuracy(max_tokens: int, threads: int, acts: list[str], models: list[str], prefill: bool = False) -> None:
    """prefill=False: decode activations (every row through the GEMV kernels); True: prefill
    activations (every 512-token window through the prefill GEMM)."""
    import copy

    from lowbit import api
    from lowbit.eval import evaluate, evaluate_reference, reference_for
    from lowbit.models import load_model
    from lowbit.nn.prepare import prepare_for_inference
    from lowbit.recipe import Recipe, Rule
    torch.set_num_threads(threads)
    lm = load_model("smollm2-135m")
    kw = dict(max_tokens=max_tokens, kl_max_tokens=max_tokens, progress=False)
    base, ref = evaluate_reference(lm.model, lm.tokenizer, metrics=["ppl"], **kw)
    print(f"fp32 model: ppl {base['ppl']['ppl']:.4f}  ({base['ppl'].get('method', '')})", flush=True)
    recipes = {"int4 (w4g128 + w8c head)": Recipe("w4g128+head-w8c", [Rule(r"lm_head", int_scheme(8, None, symmetric=True)),
                                                                    Rule(r".*", int_scheme(4, 128))], ignore=[]),
               "int8 (w8c all)": Recipe("w8c-all", [Rule(r".*", int_scheme(8, None, symmetric=True))], ignore=[])}
    if not prefill:
        kernels.GEMV_MAX_M = 1 << 30          # every row through the decode kernels (see docstring)
    setter = kernels.set_prefill_activations if prefill else kernels.set_decode_activations
    rows = []
    for label, recipe in recipes.items():
        if label.split()[0] not in models:
            continue
        model = copy.deepcopy(lm.model)
        api.quantize(model, recipe, progress=False)
        prepare_for_inference(model, "ext")
        kernels.set_decode_activations(model, "fp32")
        kernels.set_prefill_activations(model, "fp32")
        r32 = evaluate(model, lm.tokenizer, metrics=["ppl", "kl"], reference=ref, **kw)
        ref_act = reference_for(model, lm.tokenizer, cache=False, **kw)
        rows.append((label, "fp32", r32["ppl"]["ppl"], r32["kl"]["mean"], 0.0, 1.0))
        print(rows[-1], flush=True)
        for act in acts:
            if act == "fp32" or (act == "auto" and "int8 (" in label):   # auto = fp32 for 8-bit codes
                continue
            if prefill and act == "auto":
                continue
            setter(model, act)
            r8 = evaluate(model, lm.tokenizer, metrics=["ppl", "kl"], reference=ref, **kw)
            r8k = evaluate(model, lm.tokenizer, metrics=["kl"], reference=ref_act, **kw)
            rows.append((label, act, r8["ppl"]["ppl"], r8["kl"]["mean"], r8k["kl"]["mean"],
                         r8k["kl"]["top1_agreement"]))
            print(rows[-1], flush=True)
        del model
    print(f"\n{max_tokens} tokens of wiki-evaluation, 512-token windows, threads {threads}, "
          f"ISA variant {ext.isa()}\n")
    print(f"| model | {'prefill' if prefill else 'decode'} activations | ppl | KL vs fp32 model | "
          "KL vs fp32-activation kernel | top-1 vs fp32-activation kernel |")
    print("|---|---|---|---|---|---|")
    print(f"| fp32 | - | {base['ppl']['ppl']:.4f} | 0 | - | - |")
    for label, act, ppl, kl, klk, top1 in rows:
        print(f"| {label} | {act} | {ppl:.4f} | {kl:.5f} | {klk:.5f} | {top1:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--isas", default=None, help="comma list of nn/ext ISA variants to time (or 'all')")
    ap.add_argument("--ternary", action="store_true",
                    help="time BitNet ternary layers (2-bit kernel vs nibble container) beside w4g64, per --isas")
    ap.add_argument("--shapes", default=None, help="comma list of shape labels to keep")
    ap.add_argument("--act-accuracy", action="store_true", help="see the docstring")
    ap.add_argument("--prefill-cpu", type=int, default=0, metavar="M",
                    help="instead: prefill-sized linears at M rows, 1 thread, CPU time (see prefill_cpu)")
    ap.add_argument("--prefill-shapes", default="smol", help="--prefill-cpu: smol and/or qwen")
    ap.add_argument("--prefill-accuracy", action="store_true", help="see the docstring")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--models", default="int4,int8", help="--act-accuracy: int4 and/or int8")
    ap.add_argument("--acts", default="int8,auto", help="--act-accuracy: decode activations to compare with fp32")
    args = ap.parse_args()
    if args.prefill_cpu:
        prefill_cpu(args.prefill_cpu, args.rounds, args.prefill_shapes.split(","))
        return
    if args.act_accuracy or args.prefill_accuracy:
        act_accuracy(args.max_tokens, args.threads, args.acts.split(","), args.models.split(","),
                     prefill=args.prefill_accuracy)
        return
    torch.set_num_threads(args.threads)
    isas = None
    if args.ternary and not args.isas:
        args.isas = ext.isa()
    if args.isas:
        ready = [v for v, why in ext.isa_status().items() if why == "ready"]
        isas = ready if args.isas == "all" else [v for v in args.isas.split(",") if v in ready]
    rows = []
    with torch.inference_mode():
        for label, n, k in SHAPES + (QWEN_SHAPES if args.shapes else []):
            if args.shapes and label not in args.shapes.split(","):
                continue
            for m in [int(b) for b in args.batches.split(",")]:
                fns = (ternary_variants(n, k, m, isas) if args.ternary else
                       isa_variants(n, k, m, isas) if isas else variants(n, k, m))
                # fewer calls for the slow big cases so one round stays around a second
                iters = max(3, min(args.iters, int(args.iters * 2e6 / (n * k * max(m, 4) / 4))))
                per = {name: [] for name in fns}
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        per[name].append(time_call(fn, iters))
                med = {name: statistics.median(v) for name, v in per.items()}
                spread = {name: (max(v) - min(v)) / statistics.median(v) for name, v in per.items()}
                rows.append({"shape": label, "n": n, "k": k, "batch": m,
                             "us": {nm: round(t * 1e6, 1) for nm, t in med.items()},
                             "speedup_vs_fp32": {nm: round(med["fp32"] / t, 2) for nm, t in med.items()},
                             "spread": {nm: round(s, 2) for nm, s in spread.items()}})
                r = rows[-1]
                print(f"{label:13s} {n:5d}x{k:<5d} M={m:<3d} " + "  ".join(
                    f"{nm} {r['us'][nm]:.0f}us (x{r['speedup_vs_fp32'][nm]:.2f})" for nm in fns), flush=True)
    names = list(rows[0]["us"])
    print(f"\nthreads {args.threads}, {args.rounds} rounds, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}; median us per call (speed-up vs fp32)\n")
    print("| layer | N x K | batch | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['shape']} | {r['n']}x{r['k']} | {r['batch']} | " + " | ".join(
            f"{r['us'][nm]:.0f} ({r['speedup_vs_fp32'][nm]:.2f}x)" for nm in names) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "rounds": args.rounds, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
