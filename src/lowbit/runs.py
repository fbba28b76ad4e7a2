"""The run record: every `lowbit quantize` / `lowbit eval` leaves one entry in a local registry, so a
person can trace what was run, on what, with which versions, and what it measured.

    cache_dir()/runs/<id>.json      one file per run, written atomically (io.atomic_file): two
                                    processes recording at once never tear or interleave an entry
    {lowbit_run_version, id, kind ("quantize" | "eval" | ...), date, model, source_sha256,
     recipe (the Recipe dict), calibration {settings, tokens_sha256}, versions {lowbit, torch,
     transformers, python}, metrics {...}, output (path written, if any), argv}

`lowbit runs` lists them (newest last), `lowbit runs --compare ID ID...` puts their metrics side by
side. LOWBIT_NO_RUNS=1 turns recording off (the test suite does, except where it tests it).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from lowbit.errors import LowbitError

RUN_VERSION = 1


def runs_dir(root: str | Path | None = None) -> Path:
    from lowbit.io import cache_dir
    return Path(root) if root is not None else cache_dir() / "runs"


def _versions() -> dict:
    import platform

    import torch
    from lowbit import __version__
    try:
        import transformers
        tv = transformers.__version__
    except ImportError:
        tv = None
    return {"lowbit": __version__, "torch": torch.__version__, "transformers": tv,
            "python": platform.python_version()}


def record_run(kind: str, *, model: str | None = None, source_sha256: str | None = None, recipe=None,
               calibration: dict | None = None, tokens=None, metrics: dict | None = None,
               output: str | Path | None = None, root: str | Path | None = None) -> dict | None:
    """Append one run to the registry; returns the entry (None when LOWBIT_NO_RUNS=1)."""
    if os.environ.get("LOWBIT_NO_RUNS") == "1":
        return None
    from lowbit.eval.report import _jsonable
    from lowbit.io import atomic_file
    calib = dict(calibration or {})
    if tokens is not None:
        from lowbit.budget.sensitivity import tokens_digest
        calib["tokens_sha256"] = tokens_digest(tokens)
        calib["tokens_shape"] = list(tokens.shape)
    entry = {"lowbit_run_version": RUN_VERSION, "kind": kind,
             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "model": model, "source_sha256": source_sha256,
             "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
             "calibration": calib, "versions": _versions(), "metrics": _jsonable(metrics or {}),
             "output": None if output is None else str(Path(output).resolve()), "argv": list(sys.argv[1:])}
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:8]
    entry["id"] = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{digest}"
    path = runs_dir(root) / f"{entry['id']}.json"
    with atomic_file(path, "w") as fh:
        json.dump(entry, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return entry


def list_runs(root: str | Path | None = None) -> list[dict]:
    """Every readable entry, oldest first; an unreadable file is reported, not skipped silently."""
    d = runs_dir(root)
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.glob("*.json")):
        try:
            e = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LowbitError(f"run registry: {f} is not readable JSON ({err}); move it away") from None
        if e.get("lowbit_run_version") != RUN_VERSION:
            raise LowbitError(f"run registry: {f}: expected lowbit_run_version {RUN_VERSION}, "
                              f"got {e.get('lowbit_run_version')!r}")
        out.append(e)
    return sorted(out, key=lambda e: e["id"])


def find_runs(ids: list[str], root: str | Path | None = None) -> list[dict]:
    """Entries by id or unique id prefix, in the order given."""
    runs = list_runs(root)
    out = []
    for i in ids:
        hits = [e for e in runs if e["id"].startswith(i) or e["id"].endswith(i)]
        if len(hits) != 1:
            raise LowbitError(f"lowbit runs: {i!r} matches {len(hits)} runs; expected exactly one "
                              f"(ids: {', '.join(e['id'] for e in runs[-5:]) or 'none recorded'})")
        out.append(hits[0])
    return out


def _m(e: dict, *keys):
    d = e.get("metrics") or {}
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def format_runs(runs: list[dict]) -> str:
    """One line per run: id, kind, model, recipe, bits/weight, ppl, KL, output."""
    if not runs:
        return "no runs recorded"
    rows = [["id", "kind", "model", "recipe", "bpw", "ppl", "KL", "output"]]
    for e in runs:
        bpw = _m(e, "bits_per_weight") or _m(e, "size", "linear_bits_per_weight")
        ppl = _m(e, "ppl", "ppl")
        kl = _m(e, "kl", "mean")
        rows.append([e["id"], e["kind"], str(e.get("model") or "-"), str((e.get("recipe") or {}).get("name", "-")),
                     "-" if bpw is None else f"{bpw:.3f}", "-" if ppl is None else f"{ppl:.3f}",
                     "-" if kl is None else f"{kl:.4f}", str(e.get("output") or "-")])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def compare_runs(runs: list[dict]) -> str:
    """Metrics side by side (eval.report's table) and the settings that differ."""
    from lowbit.eval.report import format_table
    table = format_table([e.get("metrics") or {} for e in runs], [e["id"] for e in runs])
    keys = [("model", lambda e: e.get("model")), ("source_sha256", lambda e: (e.get("source_sha256") or "")[:16]),
            ("recipe", lambda e: (e.get("recipe") or {}).get("name")),
            ("calibration tokens", lambda e: (e.get("calibration") or {}).get("tokens_sha256", "")[:16]),
            ("lowbit", lambda e: e["versions"].get("lowbit")), ("torch", lambda e: e["versions"].get("torch"))]
    lines = []
    for name, get in keys:
        vals = [str(get(e)) for e in runs]
        mark = "" if len(set(vals)) == 1 else "   <- differs"
        lines.append(f"{name}: {' | '.join(vals)}{mark}")
    return table + "\n\n" + "\n".join(lines)
