"""One vector-codebook linear's decode call (one row of x) on each table path and ISA variant:
float tables (gathers), 16-bit tables on AVX2 byte shuffles (<= 64 codewords), 16-bit tables on
VBMI byte permutes. Random weights (g64, one codebook), hot cache, 1 thread.

    .venv/bin/python bench/bench_vq_linear.py            # best of 7 rounds of 100 calls, in us

A path this CPU or variant lacks is left out. Decode of whole models: bench_decode.py --native.
"""
from __future__ import annotations

import argparse
import time

import torch

from lowbit.nn import ext
from lowbit.nn.vq import VQLinear
from lowbit.numerics.vq import VQWeight

SHAPES = [(1536, 576, 2, 64), (576, 1536, 2, 64), (8960, 1536, 2, 64), (1536, 576, 8, 16), (1536, 576, 4, 256),
          (576, 1536, 4, 256), (1536, 576, 4, 128)]


def random_vq(N: int, K_in: int, d: int, Kc: int, gs: int = 64, seed: int = 0) -> VQWeight:
    g = torch.Generator().manual_seed(seed)
    return VQWeight(torch.randn(1, Kc, d, generator=g), torch.randint(0, Kc, (N, K_in // d), generator=g, dtype=torch.uint8),
                    torch.rand(N, -(-K_in // gs), generator=g) + 0.1, (N, K_in), gs)


def best_us(f, calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--isas", default="avx512vnni,avx2")
    a = ap.parse_args()
    if not ext.load():
        raise SystemExit(f"the compiled kernels are not loaded: {ext.status()}")
    op = torch.ops.lowbit_cpu
    torch.set_num_threads(1)
    isas = [i for i in a.isas.split(",") if ext.isa_status().get(i) == "ready"]
    modes = {"float": (False, False), "shuffles": (True, False), "VBMI": (True, True)}
    print(f"1 thread, best of {a.rounds} rounds of {a.calls} calls, us per call")
    print("| out x in, codewords | " + " | ".join(f"{i}: {m}" for i in isas for m in modes) + " |")
    print("|---|" + "---:|" * (len(isas) * len(modes)))
    for N, K, d, Kc in SHAPES:
        m = VQLinear(random_vq(N, K, d, Kc))
        x = torch.randn(1, K)
        cells = []
        for isa in isas:
            with ext.use_isa(isa), torch.inference_mode():
                for name, (i16, vbmi) in modes.items():
                    prev, prev_vbmi = op.set_vq_i16(i16), op.set_vq_vbmi(vbmi)
                    try:
                        kern = op.vq_kernel(Kc)
                        ran = {"float": "f32", "shuffles": "i16-shuffle", "VBMI": "i16-vbmi"}[name]
                        cells.append(f"{best_us(lambda: m(x), a.calls, a.rounds):.1f}" if kern == ran else "-")
                    finally:
                        op.set_vq_i16(prev)
                        op.set_vq_vbmi(prev_vbmi)
        print(f"| {N} x {K}, {Kc} of {d} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
