"""lowbit's compiled CPU kernels (lowbit_cpu.cpp), built with the system C++ compiler.

The extension is compiled once per (source, torch version, CPU flags) into the lowbit cache
(cache_dir()/ext) with plain `g++` (no ninja, no network), then loaded with
torch.ops.load_library, so its ops are `torch.ops.lowbit_cpu.q4_linear` / `u8_linear`.
`make install` builds it ahead of time (`python -m lowbit.nn.ext`); otherwise the first use
builds it (~20-40 s). When there is no compiler, or the build fails, `load()` returns False and
says why in `status()`: callers fall back to torch's own kernels or the tiled path.

LOWBIT_NO_EXT=1 turns it off (to test the fallbacks).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("lowbit_cpu.cpp")
_STATE: dict = {"loaded": None, "why": "not tried"}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def library_path() -> Path:
    """Where the built library lives: keyed by source, torch and CPU, since it is built -march=native."""
    from lowbit.io import cache_dir
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_cpu_flags().encode())
    return cache_dir() / "ext" / f"lowbit_cpu-{h.hexdigest()[:16]}.so"


def _compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def build(force: bool = False, verbose: bool = False) -> Path:
    """Compile lowbit_cpu.cpp into the cache (atomic rename) and return the library path."""
    from torch.utils import cpp_extension
    out = library_path()
    if out.is_file() and not force:
        return out
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (looked for $CXX, g++, c++, clang++)")
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".so", dir=out.parent)
    os.close(fd)
    # -fopenmp: at::parallel_for is inline OpenMP; libgomp.so.1 resolves to the copy torch has
    # already loaded (same soname), so there is one thread pool, sized by torch.set_num_threads.
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DNDEBUG", *includes, str(SOURCE), "-o", tmp,
           f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({res.returncode}):\n{res.stderr[-4000:]}")
        if verbose and res.stderr:
            print(res.stderr, file=sys.stderr)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> bool:
    """Build if needed and load the ops; False (with status() saying why) when unavailable."""
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]
    if os.environ.get("LOWBIT_NO_EXT") == "1":
        _STATE.update(loaded=False, why="disabled by LOWBIT_NO_EXT=1")
        return False
    try:
        path = build()
        torch.ops.load_library(str(path))
        _STATE.update(loaded=True, why=f"loaded {path}")
    except Exception as e:  # no compiler, missing headers, ABI trouble: fall back, say why
        _STATE.update(loaded=False, why=f"{type(e).__name__}: {e}")
        log.warning("lowbit C++ kernels unavailable, using fallbacks: %s", _STATE["why"])
    return _STATE["loaded"]


def status() -> str:
    return _STATE["why"]
