"""Time the numerics primitives on a 4096x4096 fp32 Gaussian matrix, one row per format.

    python bench/bench_primitives.py                  # 4096x4096, median of 7 runs
    python bench/bench_primitives.py --quick          # 1024x1024, median of 3 (what `make bench` runs)
    python bench/bench_primitives.py --out FILE.md    # also write the table to FILE.md

Columns: quantize = choose_qparams (min-max / absmean) + quantize to uint8 codes; dequantize =
codes -> fp32; pack / unpack = the packer a kernel or exporter would use for that code width.
"x fp16 cast" divides by the time of `w.to(torch.float16)` measured in the same run (the
baseline; absolute times on a shared machine are for orientation only). SQNR is of the
dequantized weight against the original, on the same matrix. Writes nothing but stdout unless
--out is given.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowbit.numerics import Scheme, choose_qparams, dequantize, int_scheme, quantize, sqnr_db  # noqa: E402
from lowbit.numerics.packing import (pack_bits_u8, pack_int32, pack_ternary_5per_u8, unpack_bits_u8,  # noqa: E402
                                     unpack_int32, unpack_ternary_5per_u8)
from lowbit.numerics.qweight import QuantizedWeight  # noqa: E402


def _packers(bits_or_kind):
    """(name, pack(codes), unpack(packed, n)) along the input axis (axis 1 of (out, in))."""
    if bits_or_kind == "ternary":
        return ("5 trits/u8", lambda c: pack_ternary_5per_u8(c, axis=1),
                lambda p, n: unpack_ternary_5per_u8(p, n, axis=1))
    b = bits_or_kind
    if b == 8:
        return ("u8 (none)", lambda c: pack_bits_u8(c, 8, axis=1), lambda p, n: unpack_bits_u8(p, 8, n, axis=1))
    if b in (2, 4):
        return (f"{b}-bit u8", lambda c: pack_bits_u8(c, b, axis=1), lambda p, n: unpack_bits_u8(p, b, n, axis=1))
    return (f"{b}-bit int32", lambda c: pack_int32(c, b, axis=1), lambda p, n: unpack_int32(p, b, n, axis=1))


CASES = [
    ("int8 per-channel sym", Scheme(bits=8, symmetric=True, granularity="channel"), 8),
    ("int4 g128 asym", int_scheme(4, 128), 4),
    ("int4 g128 asym -> int32 (GPTQ)", int_scheme(4, 128), ("int32", 4)),
    ("int3 g128 asym", int_scheme(3, 128), 3),
    ("int2 g64 asym", int_scheme(2, 64), 2),
    ("nf4 g64", Scheme(format="nf4", granularity="group", group_size=64), 4),
    ("fp4 (e2m1) g32", Scheme(format="fp4", granularity="group", group_size=32), 4),
    ("ternary g128 (absmean)", Scheme(format="ternary", granularity="group", group_size=128), "ternary"),
    ("fp8_e4m3 per-channel", Scheme(format="fp8_e4m3", granularity="channel"), 8),
    ("fp8_e5m2 per-channel", Scheme(format="fp8_e5m2", granularity="channel"), 8),
]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def run(n: int, repeats: int) -> str:
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    base = median_ms(lambda: w.to(torch.float16), repeats)
    lines = [f"| format | bits/weight | SQNR dB | quantize ms | dequantize ms | packer | pack ms | unpack ms "
             f"| quantize x fp16 cast |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, scheme, pk in CASES:
        def q():
            qp = choose_qparams(w, scheme)
            return qp, quantize(w, qp, scheme)
        qp, codes = q()
        t_q = median_ms(q, repeats)
        t_dq = median_ms(lambda: dequantize(codes, qp, scheme), repeats)
        if isinstance(pk, tuple):
            b = pk[1]
            pname, pack, unpack = (f"{b}-bit int32", lambda c: pack_int32(c, b, axis=1),
                                   lambda p, m: unpack_int32(p, b, m, axis=1))
        else:
            pname, pack, unpack = _packers(pk)
        packed = pack(codes)
        assert torch.equal(unpack(packed, n), codes), name       # the bench checks what it times
        t_p = median_ms(lambda: pack(codes), repeats)
        t_u = median_ms(lambda: unpack(packed, n), repeats)
        qw = QuantizedWeight(codes, qp.scale, qp.zero, scheme)
        db = sqnr_db(w, qw.dequantize())
        lines.append(f"| {name} | {qw.bits_per_weight:.3f} | {db:.2f} | {t_q:.1f} | {t_dq:.1f} | {pname} "
                     f"| {t_p:.1f} | {t_u:.1f} | {t_q / base:.1f} |")
    head = (f"Matrix {n}x{n} fp32 N(0,1), median of {repeats} runs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.machine()} ({os.cpu_count()} CPUs), {date.today()}. "
            f"Baseline w.to(float16): {base:.1f} ms. Load average at the end: "
            f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024x1024 and 3 runs")
    ap.add_argument("--size", type=int, default=None, help="matrix side (default 4096, --quick 1024)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per timing (default 7, --quick 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, like CI)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.size or (1024 if args.quick else 4096)
    repeats = args.repeats or (3 if args.quick else 7)
    table = run(n, repeats)
    print(table)
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + f".tmp{os.getpid()}")
        tmp.write_text(table)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
