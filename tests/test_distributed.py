"""Distributed perplexity (lowbit.eval.distributed): torchrun starts 2 gloo ranks on this machine,
each scores its share of the windows of the real evaluation text on the bundled model; the
reduced result is the single process's (same thread count per process: the same arithmetic per
window, and the reduction only adds zeros to each window's float64 sums)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError

SEQ, TOKENS = 128, 5 * 128          # 5 windows: an uneven split (rank 0 scores 3, rank 1 scores 2)


@pytest.mark.model
def test_two_gloo_ranks_equal_single_process(smollm2, tmp_path):
    from lowbit.eval.perplexity import eval_windows, score_windows
    out = tmp_path / "ppl.json"
    # a fresh cache: the GGUF's fp32 copy is made under torchrun (transformers saves on rank 0 only:
    # rank 1 once wrote a copy without weights, and both ranks failed on it)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "LOWBIT_CACHE": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "lowbit.eval.distributed", "smollm2-135m", "--seq-len", str(SEQ),
                        "--max-tokens", str(TOKENS), "--threads", "1", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["world_size"] == 2 and rec["backend"] == "gloo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = score_windows(smollm2.model, eval_windows(smollm2.tokenizer, "wiki-evaluation", SEQ, TOKENS),
                               progress=False)
    finally:
        torch.set_num_threads(threads)
    assert rec["windows"] == single.windows == 5
    assert rec["tokens_scored"] == single.tokens_scored == 5 * (SEQ - 1)
    assert rec["nll_mean"] == single.nll_mean          # bit-equal: see the module docstring
    assert rec["ppl"] == single.ppl and rec["nll_stderr"] == single.nll_stderr
    assert 5 < rec["ppl"] < 100


def test_refuses_without_process_group(smollm2):
    from lowbit.eval.distributed import score_windows_distributed
    with pytest.raises(LowbitError, match="not initialised"):
        score_windows_distributed(smollm2.model, torch.zeros(2, 8, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.model
def test_sensitivity_over_two_gloo_ranks_equals_single_process_and_is_found_cached(smollm2, tmp_path, monkeypatch,
                                                                                   capsys):
    """lowbit.budget.distributed: 2 gloo ranks score alternate blocks of the budget's sensitivity
    pass; the gathered table is the single process's, number for number, and `lowbit quantize
    --budget` with the same options takes it from the cache instead of computing it."""
    from lowbit.budget import load_or_compute
    from lowbit.budget.sensitivity import Sensitivity
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.cli import main
    cands = "w4g128-rtn,w8-rtn,w3g64-rtn"
    out = tmp_path / "sens.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "LOWBIT_CACHE": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "lowbit.budget.distributed", "smollm2-135m", "--candidates", cands, "--samples", "4",
                        "--seq-len", "64", "--threads", "1", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rank 1] block 2/30" in r.stderr and "[rank 1] block 3/30" not in r.stderr   # rank 1: odd blocks
    dist_s = Sensitivity.load(out)
    tokens = calibration_tokens(smollm2.tokenizer, CalibrationConfig.from_dict({"n_samples": 4, "seq_len": 64}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = load_or_compute(smollm2.model, tokens, candidates=cands.split(","), cache=False,
                                 source_dir=smollm2.path)
    finally:
        torch.set_num_threads(threads)
    assert dist_s.cost == single.cost and dist_s.output_error == single.output_error
    assert dist_s.nbytes == single.nbytes and dist_s.modules == single.modules
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "c"))
    assert main(["quantize", "smollm2-135m", "--budget", "4.5bpw", "--candidates", cands, "--samples", "4",
                 "--seq-len", "64", "--out", str(tmp_path / "q")]) == 0
    assert "sensitivity: cached" in capsys.readouterr().err
