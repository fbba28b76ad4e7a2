"""The ground floor: the user cache directory, atomic files and directories, hashing.

LOWBIT_CACHE overrides the location (default: $XDG_CACHE_HOME/lowbit or ~/.cache/lowbit).
Every entry is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written entry that a later run would trust. Temporary siblings are named
.NAME.tmp<pid>-<random>: the next write of NAME deletes those whose process is gone (a run killed
mid-save leaves nothing behind for long).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowbit"


def tmp_prefix(final: Path) -> str:
    return f".{Path(final).name}.tmp{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: Path) -> list[Path]:
    """Delete the temporary siblings of `final` (.NAME.tmp<pid>-*, .NAME.old<pid>, .NAME.bad<pid>)
    left by processes that no longer run. -> what was deleted."""
    import re
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pat = re.compile(re.escape(f".{final.name}.") + r"(?:tmp|old|bad)(\d+)(?:-.*)?")
    gone = []
    for p in final.parent.iterdir():
        m = pat.fullmatch(p.name)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            gone.append(p)
    return gone


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory next to `final`; rename it to `final` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(final), dir=final.parent))
    try:
        yield tmp
        if final.exists():  # another process won the race; theirs is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "wb"):
    """Yield a file handle on a temporary sibling of `final`; rename into place on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(final), dir=final.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(final: str | Path):
    """Yield a temporary path next to `final`; on success rename it to `final`, else delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(final), suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()
