"""Per-layer speed of quantized linears on packed weights vs torch's float and int8 baselines.

    .venv/bin/python bench/bench_kernels.py --threads 2 [--rounds 5] [--json out.json]

Shapes: 4096x4096 and every linear shape of the bundled model (SmolLM2-135M: q/o 576x576, k/v
192x576, gate/up 1536x576, down 576x1536, lm_head 49152x576), batch 1 (decode) and 32.
Variants, all on the same random weight (N(0, 0.02)):
    fp32 / bf16          F.linear on the float weight
    qdyn-int8            torch.ao.quantization.quantize_dynamic (int8 weights and activations)
    ours-int8 / -int4    lowbit PackedLinear, backend ext: w8 per channel sym / w4 g128 asym, fp32 activations
    torch-int4-bf16      lowbit's torch backend: aten._weight_int4pack_mm_for_cpu with bf16 activations
Timing: variants are interleaved in `rounds` rounds (so load from other processes hits them alike);
each round times `iters` calls and keeps the median; the table shows the median over rounds and
the ratio to fp32 from the same rounds. Weights are re-read every call but mostly stay in the 32 MiB
L3 here (not the lm_head, nor 4096x4096 in fp32): whole-model decode (bench_decode.py) is the
memory-bound figure.
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

from lowbit.nn.prepare import PackedLinear
from lowbit.numerics.qweight import quantize_weight
from lowbit.numerics.scheme import int_scheme

SHAPES = [("4096x4096", 4096, 4096), ("q/o_proj", 576, 576), ("k/v_proj", 192, 576),
          ("gate/up_proj", 1536, 576), ("down_proj", 576, 1536), ("lm_head", 49152, 576)]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for label, n, k in SHAPES:
            for m in [int(b) for b in args.batches.split(",")]:
                fns = variants(n, k, m)
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
