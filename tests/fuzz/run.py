"""Coverage-guided fuzzing of one reader with atheris (libFuzzer for Python).

    python tests/fuzz/run.py TARGET BASE_DIR CORPUS_DIR [libFuzzer flags, e.g. -max_total_time=60]

BASE_DIR holds the valid outputs (targets.build_bases, made when missing). lowbit and gguf-py are
instrumented for coverage; an input that raises anything but LowbitError, runs past
targets.TIME_LIMIT_S or grows the peak RSS past targets.MEM_LIMIT_MB is a crash (libFuzzer writes
it as crash-<sha1> in the working directory and exits non-zero).
"""
from __future__ import annotations

import os
import resource
import signal
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["lowbit", "gguf"]):
    import lowbit.calibration.imatrix  # noqa: F401
    import lowbit.export  # noqa: F401
    import lowbit.export.compressed_tensors  # noqa: F401
    import lowbit.export.gguf.reader  # noqa: F401
    import lowbit.export.gptq  # noqa: F401
    import lowbit.export.native  # noqa: F401
    import lowbit.models  # noqa: F401
    import lowbit.models.gguf_source  # noqa: F401
    import lowbit.recipe  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
import targets  # noqa: E402


class Hang(Exception):
    pass


def main() -> None:
    name, base, corpus = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if not (base / "native").is_dir():
        targets.build_bases(base)
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        (corpus / "seed").write_bytes(targets.seed(name, base))
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    os.environ["LOWBIT_CACHE"] = str(work / "cache")      # GGUF inputs that parse are cached there
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def on_alarm(*_):
        raise Hang(f"input ran past {targets.TIME_LIMIT_S} s")
    signal.signal(signal.SIGALRM, on_alarm)

    def one(data: bytes) -> None:
        signal.alarm(targets.TIME_LIMIT_S)
        try:
            targets.run_target(name, data, base, work)
        finally:
            signal.alarm(0)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
        if grown > targets.MEM_LIMIT_MB:
            raise MemoryError(f"peak RSS grew {grown:.0f} MB (> {targets.MEM_LIMIT_MB} MB)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    atheris.Setup([sys.argv[0], *sys.argv[4:], str(corpus)], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
