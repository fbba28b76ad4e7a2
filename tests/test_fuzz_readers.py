"""Hostile input for every reader (tests/fuzz/targets.py): the kept corpus replayed in the fast
suite (tests/fuzz/corpus/<target>/: seeds, inputs the coverage-guided fuzzer found interesting,
and every crash it ever found, now fixed); atheris for a fixed time per reader in the slow suite.
The only allowed outcomes are success or LowbitError."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "fuzz"
sys.path.insert(0, str(HERE))
import targets  # noqa: E402

CORPUS = HERE / "corpus"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-base")
    targets.build_bases(root)
    return root


def _inputs(name: str) -> list[Path]:
    d = CORPUS / name
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


FAST = [t for t in targets.TARGETS if t != "gguf"]   # the gguf target runs transformers' loader: slow


@pytest.mark.parametrize("name", FAST)
def test_corpus_replay(name, bases, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    files = _inputs(name)
    assert files, f"no corpus for {name} in {CORPUS / name}"
    for f in files:                     # raises (fails the test) on anything but LowbitError
        targets.run_target(name, f.read_bytes(), bases, tmp_path / "w")


@pytest.mark.slow
def test_corpus_replay_gguf_loader(bases, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    files = _inputs("gguf")
    assert files, f"no corpus for gguf in {CORPUS / 'gguf'}"
    for f in files:                     # raises (fails the test) on anything but LowbitError
        targets.run_target("gguf", f.read_bytes(), bases, tmp_path / "w")


@pytest.mark.slow
@pytest.mark.parametrize("name", targets.TARGETS)
def test_atheris_fixed_time(name, bases, tmp_path):
    pytest.importorskip("atheris", reason="atheris (coverage-guided fuzzer) not installed: pip install atheris")
    seconds = int(os.environ.get("LOWBIT_FUZZ_SECONDS", "60"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in _inputs(name):
        (corpus / f.name).write_bytes(f.read_bytes())
    r = subprocess.run([sys.executable, str(HERE / "run.py"), name, str(bases), str(corpus),
                        f"-max_total_time={seconds}", "-rss_limit_mb=0", f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, timeout=seconds + 600, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    done = re.findall(r"#(\d+)\s+DONE", r.stderr)
    print(f"{name}: {done[-1] if done else '?'} executions in {seconds} s, rc {r.returncode}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert done and int(done[-1]) > 0
