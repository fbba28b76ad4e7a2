"""Quality of round-to-nearest on the bundled model: fp32 vs RTN 8/4/3-bit, group 128 and per channel
(and w4 g32/g64, where the bundled model's Q4_1 origin shows), at `lowbit eval`'s default settings.

    .venv/bin/python bench/bench_eval.py                # full: 64 windows of 512, KL on the first 8 (~30-60 min)
    .venv/bin/python bench/bench_eval.py --quick        # 4 windows of 256, four configs (~2 min)

Prints a markdown table (BENCHMARKS.md "Evaluation of the bundled model") and, with --json, every
record. The fp32 model is evaluated once; its log-probs on the KL windows come from that same pass
and are the reference for every row. Each quantized model is a fresh copy of the fp32 one.
Besides lowbit's default perplexity (every token after the first of each window) the table gives
the llama.cpp-convention perplexity (second half of each window) from the same forward pass, for
like-for-like comparison with `llama-perplexity -c 512`.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import sys
import time

# libgomp's default (spinning) wait policy collapses when the two cores are shared (measured 6x
# slower forward passes at load 8-10); must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from lowbit import api  # noqa: E402
from lowbit.eval import (DEFAULT_KL_MAX_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, evaluate,
                         evaluate_reference, markdown_table, write_json)  # noqa: E402
from lowbit.eval.report import env_info  # noqa: E402

FULL = ["w8-rtn", "w8g128-rtn", "w4g128-rtn", "w4-rtn", "w3g128-rtn", "w3-rtn", "w4g64-rtn", "w4g32-rtn"]
QUICK = ["w8-rtn", "w4g128-rtn", "w3g128-rtn"]


class SecondHalfNLL:
    """NLL of the positions llama.cpp scores (j >= L/2), from a pass that scores every position."""

    def __init__(self, seq_len: int):
        self.start = seq_len // 2
        self.nll = 0.0
        self.n = 0

    def __call__(self, i, logprobs, targets):
        lp = logprobs[self.start:]
        t = targets[self.start:]
        self.nll += float(-lp.gather(1, t.view(-1, 1)).double().sum())
        self.n += t.numel()

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.n)


def row(name: str, rec: dict, base_ppl: float | None, half: SecondHalfNLL, seconds: float) -> dict:
    p = rec["ppl"]["ppl"]
    kl = rec.get("kl")
    bits = rec["size"]["linear_bits_per_weight"]
    return {
        "config": name,
        "ppl": f"{p:.3f}",
        "dppl": "-" if base_ppl is None else f"{p - base_ppl:+.3f} ({100 * (p / base_ppl - 1):+.2f} %)",
        "ppl_half": f"{half.ppl:.3f}",
        "kl_mean": "-" if not kl else f"{kl['mean']:.5f}",
        "kl_p99": "-" if not kl else f"{kl['p99']:.4f}",
        "top1": "-" if not kl else f"{100 * kl['top1_agreement']:.2f} %",
        "bpw": f"{bits:.3f}",
        "bpp": f"{8 * rec['size']['bytes_per_param']:.2f}",
        "seconds": f"{seconds:.0f}",
    }


COLUMNS = [("config", "config"), ("ppl", "PPL"), ("dppl", "Δ PPL vs fp32"),
           ("ppl_half", "PPL (llama.cpp 2nd-half)"), ("kl_mean", "KL mean"), ("kl_p99", "KL p99"),
           ("top1", "top-1"), ("bpw", "bits/weight (linears)"), ("bpp", "bits/param (model)"),
           ("seconds", "s")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small budget, four configs (for make bench / CI)")
    ap.add_argument("--configs", help="comma-separated recipe names (default: the full list)")
    ap.add_argument("--json", metavar="OUT", help="write every record to OUT")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        seq_len, max_tokens, kl_tokens, configs = 256, 1024, 512, QUICK
    else:
        seq_len, max_tokens, kl_tokens, configs = DEFAULT_SEQ_LEN, DEFAULT_MAX_TOKENS, DEFAULT_KL_MAX_TOKENS, FULL
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    progress = not args.no_progress
    settings = dict(text="wiki-evaluation", seq_len=seq_len, max_tokens=max_tokens, kl_max_tokens=kl_tokens,
                    progress=progress)
    t_all = time.perf_counter()
    lm = api.load_model("smollm2-135m")
    half = SecondHalfNLL(seq_len)
    t0 = time.perf_counter()
    base, ref = evaluate_reference(lm.model, lm.tokenizer, metrics="ppl,size", label="fp32",
                                   consumers=[half], **settings)
    rows = [row("fp32", base, None, half, time.perf_counter() - t0)]
    records = {"fp32": base}
    print(f"fp32: ppl {base['ppl']['ppl']:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    for name in configs:
        t0 = time.perf_counter()
        q = copy.deepcopy(lm.model)
        rep = api.quantize(q, name, progress=False)
        half = SecondHalfNLL(seq_len)
        rec = evaluate(q, lm.tokenizer, metrics="ppl,kl,size", reference=ref, label=name,
                       consumers=[half], **settings)
        rec["quantize_notes"] = rep.notes
        records[name] = rec
        rows.append(row(name, rec, base["ppl"]["ppl"], half, time.perf_counter() - t0))
        print(f"{name}: ppl {rec['ppl']['ppl']:.3f} KL {rec['kl']['mean']:.5f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        del q
        gc.collect()
    env = env_info()
    print(f"command: python bench/bench_eval.py{' --quick' if args.quick else ''}"
          f"{' --configs ' + args.configs if args.configs else ''}")
    print(f"machine: {env['machine']}, {env['cpu_count']} cores, torch {env['torch']} "
          f"({env['threads']} threads, OMP_WAIT_POLICY={env['omp_wait_policy']}), transformers {env['transformers']}; "
          f"date {env['date']}; load average {env['load_average']}; "
          f"total {time.perf_counter() - t_all:.0f} s")
    print(f"perplexity: {base['ppl']['method']}")
    print(f"KL: {records[configs[0]]['kl']['method'] if configs else '-'}")
    print()
    print(markdown_table(rows, COLUMNS))
    if args.json:
        write_json({"env": env, "records": records, "rows": rows}, args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    sys.exit(main())
