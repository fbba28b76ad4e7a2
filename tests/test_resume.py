"""Resume after a kill: the same command restarted goes on from the last finished block and gives
the same bytes as a run never interrupted; a changed recipe, source or calibration set is refused
with the reason. The real bundled model, GPTQ, few calibration windows."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit import api
from lowbit.calibration.resume import Checkpoint, run_key
from lowbit.errors import LowbitError
from lowbit.models import LoadedModel
from lowbit.numerics.scheme import int_scheme
from lowbit.recipe import Recipe, Rule

pytestmark = pytest.mark.model
CALIB = {"n_samples": 2, "seq_len": 32, "batch_size": 1}


def three_blocks(damp: float = 0.01) -> Recipe:
    return Recipe(name="gptq-b0-2", rules=[Rule(r"model\.layers\.[0-2]\.", int_scheme(4, 64), "gptq",
                                                {"damp_percent": damp})])


def tree_digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir())}


class Killed(Exception):
    pass


def _run(smollm2, out, ckpt_dir=None, kill_at=None, recipe=None, source="src", seed=0):
    """One run; kill_at=k raises after block k's state is saved (the state a SIGKILL then leaves).
    A refused resume raises before anything is changed, so refusals run on the shared model."""
    model = smollm2.model if out is None else copy.deepcopy(smollm2.model)

    def log(msg):
        if kill_at and msg.startswith(f"block {kill_at}/"):
            raise Killed(msg)

    def make(rec, cal, tokens):
        return Checkpoint(ckpt_dir, run_key(rec, cal, tokens, source))
    rep = api.quantize(model, recipe or three_blocks(), tokenizer=smollm2.tokenizer,
                       calibration={**CALIB, "seed": seed}, progress=False, log=log,
                       checkpoint=make if ckpt_dir else None)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    return api.export(lm, rep, out, "native")


@pytest.mark.slow
def test_resume_after_interrupt_gives_same_bytes_and_refuses_changes(smollm2, tmp_path):
    whole = _run(smollm2, tmp_path / "whole")
    ck = tmp_path / "ck"
    with pytest.raises(Killed):
        _run(smollm2, tmp_path / "r", ck, kill_at=2)         # blocks 0 and 1 saved, then "killed"
    assert (ck / "state.json").is_file() and len(list(ck.glob("block-*"))) == 2
    with pytest.raises(LowbitError, match="the recipe changed"):
        _run(smollm2, None, ck, recipe=three_blocks(0.02))
    with pytest.raises(LowbitError, match="the source model"):
        _run(smollm2, None, ck, source="other")
    with pytest.raises(LowbitError, match="calibration token windows"):
        _run(smollm2, None, ck, seed=1)
    resumed = _run(smollm2, tmp_path / "r", ck)
    assert tree_digest(resumed) == tree_digest(whole)


def _tiny_llama_runs(tmp_path, rec, other_tokens_refused: bool, hidden: int = 64):
    """A 4-block Llama (transformers' class, random weights) quantized by `rec` without a
    checkpoint, then interrupted after block 2 and resumed on a fresh copy. -> (whole, resumed,
    the state the interrupted run left)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    ck = tmp_path / "ck"

    def run(kill_at=None, seed_tokens=tokens):
        def log(msg):
            if kill_at and msg.startswith(f"block {kill_at}/"):
                raise Killed(msg)
        return api.quantize(copy.deepcopy(base), rec, tokens=seed_tokens, progress=False, log=log,
                            checkpoint=lambda r, c, t: Checkpoint(ck, run_key(r, c, t, "tiny")))
    whole = api.quantize(copy.deepcopy(base), rec, tokens=tokens, progress=False)
    with pytest.raises(Killed):
        run(kill_at=2)
    state = json.loads((ck / "state.json").read_text())
    assert state["blocks_done"] == 2
    if other_tokens_refused:
        with pytest.raises(LowbitError, match="calibration token windows"):
            run(seed_tokens=tokens.flip(0))
    return whole, run(), state


def test_resume_tiny_llama_same_qweights(tmp_path):
    """Fast: the same loop on a 4-block Llama (transformers' class, random weights): interrupted after
    block 2, resumed on a fresh copy, every code, scale and zero equals the uninterrupted run's."""
    import torch
    rec = Recipe(name="t", rules=[Rule(r"layers\.", int_scheme(4, 32), "gptq")])
    whole, resumed, _ = _tiny_llama_runs(tmp_path, rec, other_tokens_refused=True)
    assert list(resumed.qweights) == list(whole.qweights) and resumed.notes == whole.notes
    for n, qw in whole.qweights.items():
        r = resumed.qweights[n]
        assert torch.equal(r.qdata, qw.qdata) and torch.equal(r.scale, qw.scale) and torch.equal(r.zero_point, qw.zero_point)


def test_resume_a_vq_run_gives_the_same_codebooks(tmp_path):
    """The resume state holds vector codebooks (methods/vq.py): the same interrupted tiny run
    equals the uninterrupted one, index for index."""
    import torch

    from lowbit.numerics.vq import VQWeight, vq_scheme
    rec = Recipe(name="t", rules=[Rule(r"layers\.", vq_scheme(2, 32), "vq", {"kmeans_iters": 3})])
    whole, resumed, _ = _tiny_llama_runs(tmp_path, rec, other_tokens_refused=False)
    assert list(resumed.qweights) == list(whole.qweights)
    for n, vw in whole.qweights.items():
        r = resumed.qweights[n]
        assert isinstance(r, VQWeight)
        assert torch.equal(r.indices, vw.indices) and torch.equal(r.codebook, vw.codebook)
        assert torch.equal(r.scale, vw.scale)


def test_resume_a_gptq_ggml_run_gives_the_same_blocks(tmp_path):
    """The resume state holds ggml blocks (GPTQ with a ggml type, methods/gptq_ggml.py): the
    interrupted run resumed equals the uninterrupted one byte for byte, type for type (Q4_K:
    every width here is a multiple of its 256-weight block)."""
    import torch

    from lowbit.numerics.ggml.weight import GGMLWeight
    from lowbit.presets.gguf_mixes import ggml_scheme
    rec = Recipe(name="t", rules=[Rule(r"layers\.", ggml_scheme("Q4_K"), "gptq")])
    whole, resumed, _ = _tiny_llama_runs(tmp_path, rec, other_tokens_refused=False, hidden=256)
    assert list(resumed.qweights) == list(whole.qweights)
    assert {qw.type for qw in whole.qweights.values()} == {"Q4_K"}
    for n, qw in whole.qweights.items():
        r = resumed.qweights[n]
        assert isinstance(r, GGMLWeight) and (r.type, r.wanted, r.shape) == (qw.type, qw.wanted, qw.shape)
        assert torch.equal(r.data, qw.data) and r.info == qw.info


def test_resume_a_signround_run_gives_the_same_rounding(tmp_path):
    """SignRound trains each block against the float model's outputs, so the state carries the
    float path's hidden states beside the quantized path's (fpacts-*.safetensors): the resumed
    run's codes, scales and zeros equal the uninterrupted run's."""
    import torch
    rec = Recipe(name="t", rules=[Rule(r"layers\.", int_scheme(3, 32), "signround", {"iters": 5})])
    whole, resumed, state = _tiny_llama_runs(tmp_path, rec, other_tokens_refused=False)
    assert state["fp_acts"] == "fpacts-0001.safetensors"
    assert list(resumed.qweights) == list(whole.qweights)
    assert any(not qw.info["signround_kept_init"] for qw in whole.qweights.values())   # it tuned something
    for n, qw in whole.qweights.items():
        r = resumed.qweights[n]
        assert torch.equal(r.qdata, qw.qdata) and torch.equal(r.scale, qw.scale) and torch.equal(r.zero_point, qw.zero_point)
        assert r.info == qw.info


def _cli(out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "lowbit", "quantize", "smollm2-135m", "--recipe", "w4g128-gptq",
            "--samples", "4", "--seq-len", "64", "--batch-size", "2", "--threads", "2", "--out", str(out), *extra]


@pytest.mark.slow
def test_sigkill_at_three_random_points_then_same_bytes(tmp_path):
    """The real CLI, SIGKILLed at three random moments (loading, mid-blocks, saving: wherever they
    fall), restarted with the same command each time: the final directory is byte-identical."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    t0 = time.perf_counter()
    subprocess.run(_cli(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=1800)
    full = time.perf_counter() - t0
    rng = random.Random(int(os.environ.get("LOWBIT_KILL_SEED", "23")))
    out = tmp_path / "killed"
    # three distinct points of progress: after block b's log line, a random extra delay (so the kill
    # lands inside a block, inside the state write, or in the next block), then SIGKILL
    points = sorted(rng.sample(range(2, 29, 3), 3))        # 3 blocks apart at least
    kills = []
    for b in points:
        p = subprocess.Popen(_cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in p.stderr:
            if f"block {b}/" in line:
                time.sleep(rng.uniform(0.0, 2.0))
                os.kill(p.pid, signal.SIGKILL)
                kills.append(b)
                break
        p.wait()
        assert not out.exists(), f"the run meant to die after block {b} finished"
    r = subprocess.run(_cli(out), env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    print(f"uninterrupted {full:.0f} s; SIGKILL after blocks {kills} (+0-2 s)")
    assert tree_digest(out) == tree_digest(tmp_path / "whole")
    assert kills == points
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # state + temp dirs gone
