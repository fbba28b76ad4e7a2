"""Peak RSS and time of `lowbit quantize --stream` (or any lowbit command) as a subprocess.

    python bench/bench_streaming.py OUT.json -- quantize BIG/llama2-7b-shaped --recipe w4g128-rtn \
        --stream --out BIG/q-rtn

(BIG: any directory outside the repo with ~20 GB free)

A calibrated recipe, streamed block by block (lowbit.streaming_calibrated), in a child process:

    python bench/bench_streaming.py OUT.json --calibrated BIG/llama2-7b-shaped BIG/q-gptq \
        [--recipe w4g128-gptq --samples 16 --seq-len 512]

The random 7B-shaped checkpoint has no tokenizer: the calibration windows are the bundled
tokenizer's (SmolLM2) windows of wiki-calibration, ids taken modulo the checkpoint's vocabulary
(the weights are random, so which ids does not matter; the shapes and the work are the real
ones). The child prints each block's time with its current and peak RSS (VmRSS / VmHWM).

A recipe with `-ft` (its "finetune" options): the peak RSS (VmHWM) is reset when the fine-tuning
starts (/proc/self/clear_refs), so the last log lines' "peak" is the fine-tuning's own; the
getrusage figure stays the whole run's.

The conversion of a native directory to gptq / awq / compressed-tensors, layer by layer (what
`lowbit export` and `--stream --format` do) against reading the model back whole first (api.load
+ api.export, the conversion before native.read_for_export), the same 1 GB shards:

    python bench/bench_streaming.py OUT.json -- export BIG/q-gptq --format gptq --out BIG/q-gptq-gptq
    python bench/bench_streaming.py OUT.json --whole-export BIG/q-gptq gptq BIG/q-gptq-gptq-whole

Peak RSS is the kernel's (getrusage RUSAGE_CHILDREN ru_maxrss of the finished child), the number
BENCHMARKS.md states; `uptime` load is recorded with it (the box is shared).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def _rss() -> str:
    f = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            f[k] = v.strip()
    return f"rss {int(f['VmRSS'].split()[0]) / 2**20:.2f} GiB, peak {int(f['VmHWM'].split()[0]) / 2**20:.2f} GiB"


def child(src: str, dst: str, recipe: str, samples: int, seq_len: int) -> int:
    import json as _json
    from pathlib import Path

    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.models import load_tokenizer
    from lowbit.streaming import quantize_streaming
    vocab = _json.loads((Path(src) / "config.json").read_text())["vocab_size"]
    cfg = CalibrationConfig(n_samples=samples, seq_len=seq_len)
    tokens = calibration_tokens(load_tokenizer("smollm2-135m"), cfg) % vocab
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:8.1f} s] {msg} ({_rss()}; load {os.getloadavg()[0]:.1f})", flush=True)
        if msg.startswith("finetune: the float model"):
            # -ft's own peak from here on: the kernel's peak RSS (VmHWM) restarts at the current RSS
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            print(f"[{time.perf_counter() - t0:8.1f} s] peak RSS reset for the -ft phase ({_rss()})", flush=True)
    quantize_streaming(src, recipe, dst, tokens=tokens, log=log)
    return 0


def main() -> int:
    if sys.argv[1] == "--child":
        a = sys.argv[2:]
        return child(a[0], a[1], a[2], int(a[3]), int(a[4]))
    if sys.argv[1] == "--child-whole":
        from lowbit import api
        src, fmt, dst = sys.argv[2:5]
        from lowbit.export.native import UNSHARDED
        shard = {} if fmt in UNSHARDED else {"max_shard_size": "1GB"}    # gguf / onnx: one file
        api.export(api.load(src), None, dst, fmt, **shard)
        return 0
    out = sys.argv[1]
    if sys.argv[2] == "--whole-export":
        src, fmt, dst = sys.argv[3:6]
        return _measure(out, [__file__, "--child-whole", src, fmt, dst],
                        f"bench/bench_streaming.py OUT --whole-export {src} {fmt} {dst}")
    if sys.argv[2] == "--calibrated":
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--recipe", default="w4g128-gptq")
        p.add_argument("--samples", type=int, default=16)
        p.add_argument("--seq-len", type=int, default=512)
        a = p.parse_args(sys.argv[3:])
        argv = [__file__, "--child", a.src, a.dst, a.recipe, str(a.samples), str(a.seq_len)]
        label = (f"bench/bench_streaming.py --calibrated {a.src} {a.dst} --recipe {a.recipe} "
                 f"--samples {a.samples} --seq-len {a.seq_len}")
    else:
        argv = ["-m", "lowbit", *sys.argv[sys.argv.index("--") + 1:]]
        label = "lowbit " + " ".join(argv[2:])
    return _measure(out, argv, label)


def _measure(out: str, argv: list, label: str) -> int:
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *argv])
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = ru.ru_maxrss * 1024
    rec = {"command": label, "rc": r.returncode, "wall_s": round(wall, 1),
           "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),     # the child's CPU time: wall is the box's load
           "peak_rss_bytes": peak, "peak_rss_gib": round(peak / 2**30, 3),
           "load_before": load0, "load_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": _machine()}
    with open(out, "w") as fh:
        json.dump(rec, fh, indent=1)
    print(json.dumps(rec))
    return r.returncode


def _machine() -> str:
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"


if __name__ == "__main__":
    sys.exit(main())
