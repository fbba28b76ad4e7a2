"""Peak RSS and time of `lowbit quantize --stream` (or any lowbit command) as a subprocess.

    python bench/bench_streaming.py OUT.json -- quantize BIG/llama2-7b-shaped --recipe w4g128-rtn \
        --stream --out BIG/q-rtn

(BIG: any directory outside the repo with ~20 GB free)

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


def main() -> int:
    out, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lowbit", *argv])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    rec = {"command": "lowbit " + " ".join(argv), "rc": r.returncode, "wall_s": round(wall, 1),
           "peak_rss_bytes": peak, "peak_rss_gib": round(peak / 2**30, 3),
           "load_before": load0, "load_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(out, "w") as fh:
        json.dump(rec, fh, indent=1)
    print(json.dumps(rec))
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
