"""Integrity of the GGUF-to-fp32 cache: an entry is trusted only when its record
(lowbit_cache.json) names the GGUF's sha256 and every file of the entry matches its stored sha256.

    {"gguf": name, "gguf_sha256": ..., "files": {file name: sha256}}
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lowbit.io import sha256_file

RECORD = "lowbit_cache.json"


def write_record(entry: Path, gguf_name: str, gguf_sha256: str) -> None:
    files = {f.name: sha256_file(f) for f in sorted(Path(entry).iterdir()) if f.is_file() and f.name != RECORD}
    rec = {"gguf": gguf_name, "gguf_sha256": gguf_sha256, "files": files}
    (Path(entry) / RECORD).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")


def cache_entry_ok(entry: Path, gguf_sha256: str) -> str | None:
    """None when the entry can be trusted, else why not."""
    entry = Path(entry)
    try:
        rec = json.loads((entry / RECORD).read_text())
        files = rec["files"]
        if rec["gguf_sha256"] != gguf_sha256:
            return f"made from another GGUF ({rec['gguf_sha256'][:16]})"
        if not isinstance(files, dict) or "config.json" not in files:
            return f"{RECORD} lists no files"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable {RECORD} ({type(e).__name__})"
    present = {f.name for f in entry.iterdir() if f.name != RECORD}
    if present != set(files):
        return f"files differ from the record: {sorted(present ^ set(files))[:5]}"
    for name, digest in sorted(files.items()):
        f = entry / name
        if f.is_symlink() or not f.is_file() or sha256_file(f) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def discard_entry(entry: Path) -> None:
    """Move a bad entry aside (one rename, so a reader never sees it half-deleted), then delete it."""
    entry = Path(entry)
    aside = entry.with_name(f".{entry.name}.bad{os.getpid()}")
    os.replace(entry, aside)
    shutil.rmtree(aside, ignore_errors=True)
