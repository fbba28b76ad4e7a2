"""lowbit's compiled CPU kernels (lowbit_cpu.cpp + kern_*.cpp), built with the system C++ compiler.

One shared library holds every ISA variant: kern_avx512.cpp (twice: with and without VNNI),
kern_avx2.cpp and kern_portable.cpp are each compiled with their own target flags
(-mavx512f..., -mavx2 -mfma, none: the compiler vectorises the portable one, NEON on ARM), and
lowbit_cpu.cpp, compiled for the baseline ISA, picks the best variant the CPU reports when the
library loads. So the same build runs on any x86-64 (no -march=native), and any variant this CPU
can execute can be forced to test it:

    LOWBIT_ISA=avx512vnni|avx512|avx2|portable   force a variant (LowbitError if the CPU can't run it)
    LOWBIT_EXT=0  (or LOWBIT_NO_EXT=1)           no extension at all: torch / tiled fallbacks
    ext.set_isa(name), ext.use_isa(name)         the same from Python (tests parametrise on it)

It is compiled once per (sources, flags, torch, Python) into the lowbit cache (cache_dir()/ext)
with plain `g++` (no ninja, no network), then loaded with torch.ops.load_library, so its ops are
`torch.ops.lowbit_cpu.q4_linear` / `u8_linear`. `make install` builds it ahead of time
(`python -m lowbit.nn.ext`); otherwise the first use builds it (~30-60 s). When there is no
compiler, or the build fails, `load()` returns False and says why in `status()`: callers fall
back to torch's own kernels or the tiled path.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SOURCE = HERE / "lowbit_cpu.cpp"
HEADER = HERE / "lowbit_kern.h"
# further torch-facing files, built like SOURCE (baseline ISA, torch headers): step_ops.cpp holds
# nn/step.py's fused block ops (add_rms_norm, rope_kv, silu_mul)
TORCH_SOURCES = [SOURCE, HERE / "step_ops.cpp"]
ISAS = ("avx512vnni", "avx512", "avx2", "portable")   # best first
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_AVX512 = ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
# (object name, source, extra flags): the kernel files, each for its own target
KERNEL_UNITS = [("kern_portable", "kern_portable.cpp", [])]
if _X86:
    KERNEL_UNITS += [("kern_avx2", "kern_avx2.cpp", ["-mavx2", "-mfma"]),
                     ("kern_avx512", "kern_avx512.cpp", _AVX512),
                     ("kern_avx512vnni", "kern_avx512.cpp", _AVX512 + ["-mavx512vnni", "-DLOWBIT_VNNI=1"])]
# CPU flags (/proc/cpuinfo names) each variant needs: only for saying why one can't run here
ISA_NEEDS = {"avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
             "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "avx2": ("avx2", "fma"),
             "portable": ()}
_STATE: dict = {"loaded": None, "why": "not tried", "error": None}
_CFLAGS = ["-O3", "-std=c++17", "-fPIC", "-DNDEBUG"]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def disabled() -> str | None:
    """Why the extension is switched off by the environment, or None."""
    if os.environ.get("LOWBIT_EXT", "").strip().lower() in ("0", "off", "false", "no"):
        return "disabled by LOWBIT_EXT=0"
    if os.environ.get("LOWBIT_NO_EXT") == "1":
        return "disabled by LOWBIT_NO_EXT=1"
    return None


def library_path() -> Path:
    """Where the built library lives: keyed by sources, flags, torch and Python (not the CPU:
    the library is built for baseline x86-64 and picks its variant at run time)."""
    from lowbit.io import cache_dir
    h = hashlib.sha256()
    for f in TORCH_SOURCES + sorted(HERE.glob("*.h")) + sorted({HERE / src for _, src, _ in KERNEL_UNITS}):
        h.update(f.read_bytes())
    h.update(repr((_CFLAGS, KERNEL_UNITS)).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(platform.machine().encode())
    return cache_dir() / "ext" / f"lowbit_cpu-{h.hexdigest()[:16]}.so"


def _compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def _run(cmds: list[list[str]], verbose: bool) -> None:
    """Run compiler commands two at a time (the box has 2 cores); raise with the first failure."""
    procs: list[tuple[list[str], subprocess.Popen]] = []
    errors = []
    for i, cmd in enumerate(cmds):
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        if len(procs) == 2 or i == len(cmds) - 1:
            for c, p in procs:
                _, err = p.communicate()
                if p.returncode != 0:
                    errors.append(f"{' '.join(c[:2])} ... {c[-3]} failed ({p.returncode}):\n{err[-4000:]}")
                elif verbose and err:
                    print(err, file=sys.stderr)
            procs = []
    if errors:
        raise RuntimeError("\n".join(errors))


def build(force: bool = False, verbose: bool = False) -> Path:
    """Compile the sources into the cache (atomic rename) and return the library path."""
    from torch.utils import cpp_extension
    out = library_path()
    if out.is_file() and not force:
        if library_intact(out):
            return out
        log.warning("cached kernel library %s does not match its recorded sha256; rebuilding it", out)
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (looked for $CXX, g++, c++, clang++)")
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmpdir:
        objs, cmds = [], []
        # the torch-facing file: baseline ISA, OpenMP (at::parallel_for is inline OpenMP;
        # libgomp.so.1 resolves to the copy torch has loaded, so one pool, torch.set_num_threads)
        for src in TORCH_SOURCES:
            o = os.path.join(tmpdir, src.stem + ".o")
            cmds.append([cxx, *_CFLAGS, "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
                         "-c", str(src), "-o", o])
            objs.append(o)
        for name, src, flags in KERNEL_UNITS:
            o = os.path.join(tmpdir, name + ".o")
            cmds.append([cxx, *_CFLAGS, *flags, "-c", str(HERE / src), "-o", o])
            objs.append(o)
        _run(cmds, verbose)
        tmp = os.path.join(tmpdir, out.name)
        _run([[cxx, "-shared", "-fopenmp", *objs, "-o", tmp, f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
               "-ltorch", f"-Wl,-rpath,{torch_lib}"]], verbose)
        digest = _sha256(tmp)
        os.replace(tmp, out)
        from lowbit.io import atomic_file
        with atomic_file(_digest_path(out), "w") as fh:
            fh.write(digest + "\n")
    return out


def _sha256(path) -> str:
    from lowbit.io import sha256_file
    return sha256_file(path)


def _digest_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def library_intact(lib: Path) -> bool:
    """The cached library is loaded only when its bytes match the sha256 written beside it when it
    was built (a truncated, edited or swapped .so is rebuilt, never loaded)."""
    try:
        want = _digest_path(lib).read_text().strip()
    except OSError:
        return False
    return not lib.is_symlink() and _sha256(lib) == want


def load() -> bool:
    """Build if needed and load the ops; False (with status() saying why) when unavailable.
    LOWBIT_ISA set to a variant this CPU cannot run raises LowbitError (every call)."""
    if _STATE["error"] is not None:
        raise _STATE["error"]
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]
    why = disabled()
    if why:
        _STATE.update(loaded=False, why=why)
        return False
    try:
        path = build()
        torch.ops.load_library(str(path))
        _STATE.update(loaded=True, why=f"loaded {path}")
    except Exception as e:  # no compiler, missing headers, ABI trouble: fall back, say why
        _STATE.update(loaded=False, why=f"{type(e).__name__}: {e}")
        log.warning("lowbit C++ kernels unavailable, using fallbacks: %s", _STATE["why"])
        return False
    forced = os.environ.get("LOWBIT_ISA", "").strip().lower()
    if forced and forced != "auto":
        try:
            set_isa(forced)
        except LowbitError as e:
            _STATE["error"] = LowbitError(f"LOWBIT_ISA={forced}: {e}")
            raise _STATE["error"] from None
    return True


def status() -> str:
    if _STATE["loaded"]:
        return f"{_STATE['why']} (ISA variant {isa()})"
    return _STATE["why"]


def _ops():
    if not load():
        raise LowbitError(f"lowbit C++ kernels unavailable ({status()})")
    return torch.ops.lowbit_cpu


def isa() -> str:
    """The ISA variant the kernels run now (avx512vnni | avx512 | avx2 | portable)."""
    return _ops().isa()


def decode_pool_spin_us() -> int:
    """0 when the decode GEMVs run on torch's OpenMP pool (at::parallel_for), else how long our
    own pool's workers spin after a call (decode_pool.h; LOWBIT_SPIN_US, or 1000 under
    OMP_WAIT_POLICY=PASSIVE). Fixed for the process at its first read."""
    return int(_ops().decode_pool_spin_us())


def decode_pool_check(runs: int, threads: int) -> int:
    """Run our decode pool `runs` times back to back on `threads` threads, part counts alternating
    small and large, and count the runs that returned with some part not run exactly once
    (0 when the pool keeps its contract; -1 when another thread held the pool)."""
    return int(_ops().decode_pool_check(int(runs), int(threads)))


def isa_status() -> dict[str, str]:
    """variant -> 'ready' or why this machine cannot run it."""
    out = {}
    flags = _cpu_flags()
    for name in ISAS:
        if name != "portable" and not _X86:
            out[name] = f"x86-64 only (this machine is {platform.machine()})"
        elif not load():
            out[name] = f"extension unavailable ({status()})"
        elif torch.ops.lowbit_cpu.isa_supported(name):
            out[name] = "ready"
        else:
            missing = [f for f in ISA_NEEDS[name] if f not in flags]
            out[name] = f"this CPU lacks {', '.join(missing) or 'the OS support it needs'}"
    return out


def set_isa(name: str) -> str:
    """Force a variant ('auto' = the best this CPU runs); LowbitError naming what is missing if
    the CPU cannot run it. Returns the variant now in use."""
    name = name.strip().lower()
    if name not in ISAS + ("auto",):
        raise LowbitError(f"ISA variant: expected one of auto|{'|'.join(ISAS)}, got {name!r}")
    ops = _ops()
    if name != "auto" and not ops.isa_supported(name):
        raise LowbitError(f"ISA variant {name!r} cannot run here: {isa_status()[name]}")
    return ops.set_isa(name)


@contextlib.contextmanager
def use_isa(name: str):
    """with use_isa('avx2'): ... runs the kernels on that variant, then restores the previous one."""
    prev = isa()
    set_isa(name)
    try:
        yield
    finally:
        _ops().set_isa(prev)
