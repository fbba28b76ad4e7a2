"""Reports: a plain terminal table (one model, or several side by side), a markdown table, and
the JSON record (written atomically).

A record is the dict `lowbit.eval.evaluate` returns:

    {"lowbit_eval_version": 1, "label", "model": {...}, "settings": {...},
     "ppl": PerplexityResult, "kl": KLResult, "size": {...}, "speed": SpeedResult,
     "memory": {...}, "env": {...}}      (metrics not run are absent)
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

EVAL_RECORD_VERSION = 1
MiB = 1 << 20


def env_info() -> dict:
    import transformers
    from lowbit import __version__ as lowbit_version
    return {"lowbit": lowbit_version, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "load_average": _load_average(),
            "machine": f"{platform.system()} {platform.machine()} {_cpu_name()}".strip(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _load_average() -> str | None:
    """1/5/15-minute load average: on a shared box, read speed figures next to it."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _get(rec: dict, *keys):
    cur = rec
    for k in keys:
        if not isinstance(cur, dict) or cur.get(k) is None:
            return None
        cur = cur[k]
    return cur


def _mib(x) -> str:
    return f"{x / MiB:,.1f} MiB"


def _ppl(rec: dict) -> str | None:
    p = rec.get("ppl")
    if not p:
        return None
    band = p["ppl"] * p["nll_stderr"]
    return f"{p['ppl']:.3f} ± {band:.3f}"


# (label, getter -> value or None, formatter)
ROWS: list[tuple[str, Callable[[dict], object], Callable[[object], str]]] = [
    ("size: packed (computed)", lambda r: _get(r, "size", "packed_bytes"), _mib),
    ("size: files on disk", lambda r: _get(r, "size", "disk_bytes"), _mib),
    ("size: source file", lambda r: _get(r, "size", "source_bytes"), _mib),
    ("size: bytes / parameter", lambda r: _get(r, "size", "bytes_per_param"), lambda x: f"{x:.3f}"),
    ("size: bits / weight (linears)", lambda r: _get(r, "size", "linear_bits_per_weight"), lambda x: f"{x:.3f}"),
    ("perplexity", _ppl, str),
    ("  tokens scored", lambda r: _get(r, "ppl", "tokens_scored"), lambda x: f"{x:,}"),
    ("KL mean (nats/token)", lambda r: _get(r, "kl", "mean"), lambda x: f"{x:.5f}"),
    ("KL 99th percentile", lambda r: _get(r, "kl", "p99"), lambda x: f"{x:.5f}"),
    ("top-1 agreement", lambda r: _get(r, "kl", "top1_agreement"), lambda x: f"{100 * x:.2f} %"),
    ("  KL tokens", lambda r: _get(r, "kl", "tokens"), lambda x: f"{x:,}"),
    ("prompt tokens/s", lambda r: _get(r, "speed", "prompt_tokens_per_s"), lambda x: f"{x:,.1f}"),
    ("decode tokens/s", lambda r: _get(r, "speed", "decode_tokens_per_s"), lambda x: f"{x:,.2f}"),
    ("model tensors in memory", lambda r: _get(r, "memory", "model_bytes"), _mib),
    ("peak RSS (process)", lambda r: _get(r, "memory", "peak_rss_bytes"), _mib),
]


def format_table(records: list[dict], labels: list[str] | None = None) -> str:
    """Metrics as rows, one column per record; rows no record has are left out."""
    labels = labels or [r.get("label") or f"model {i}" for i, r in enumerate(records)]
    body = []
    for name, get, fmt in ROWS:
        vals = [get(r) for r in records]
        if all(v is None for v in vals):
            continue
        body.append([name] + ["-" if v is None else fmt(v) for v in vals])
    head = ["metric"] + list(labels)
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)

    def fmt_row(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt_row(head), line, *[fmt_row(r) for r in body]])


def format_methods(record: dict) -> str:
    """The exact method of every metric in the record, one line each."""
    out = []
    for k in ("ppl", "kl", "speed", "size", "memory"):
        m = _get(record, k, "method")
        if m:
            out.append(f"  {k}: {m}")
    return "\n".join(out)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows of plain values; columns = [(key, header)]; None -> '-'."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(k) is None else str(r[k]) for k, _ in columns) + " |")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None  # JSON has no NaN/inf; a metric that produced one is reported as missing
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    return str(x)


def write_json(record: dict, path: str | os.PathLike) -> Path:
    from lowbit.io import atomic_file
    p = Path(path)
    with atomic_file(p, "w") as fh:
        json.dump(_jsonable(record), fh, indent=2, sort_keys=True)
        fh.write("\n")
    return p
