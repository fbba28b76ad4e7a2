"""The budget's sensitivity pass streamed (budget/streamed.py: one decoder block in memory, the
gradients by a block-by-block backward) on the bundled model's safetensors directory: the same
costs, bytes and plan as the in-memory pass on the loaded model."""
from __future__ import annotations

import pytest
import torch

from lowbit.budget import load_or_compute, parse_budget, solve
from lowbit.budget.streamed import plan_budget_streaming

pytestmark = pytest.mark.model
CANDIDATES = ["w4g128-rtn", "w3g64-rtn"]
BUDGET = "3.9bpw"                      # between the two: a mix


@pytest.fixture(scope="module")
def tokens(smollm2):
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    return calibration_tokens(smollm2.tokenizer, CalibrationConfig.from_dict({"n_samples": 2, "seq_len": 64}))


def test_streamed_sensitivity_and_plan_equal_the_in_memory_ones(smollm2, tokens):
    mem = load_or_compute(smollm2.model, tokens, candidates=CANDIDATES, cache=False, source_dir=smollm2.path)
    plan_m = solve(mem, parse_budget(BUDGET))
    plan_s, sens = plan_budget_streaming(smollm2.path, BUDGET, tokens=tokens, candidates=CANDIDATES, cache=False)
    assert [m["name"] for m in sens.modules] == [m["name"] for m in mem.modules]
    assert sens.nbytes == mem.nbytes and sens.fixed == mem.fixed
    assert sens.meta["gradient_tokens"] == mem.meta["gradient_tokens"]
    # the same sums in the same order: equal up to float64 rounding of identical float32 inputs
    c_s, c_m = torch.tensor(sens.cost, dtype=torch.float64), torch.tensor(mem.cost, dtype=torch.float64)
    assert torch.allclose(c_s, c_m, rtol=1e-9, atol=0), float(((c_s - c_m).abs() / c_m.abs()).max())
    assert torch.equal(torch.tensor(sens.output_error), torch.tensor(mem.output_error))
    assert plan_s.recipe().to_dict() == plan_m.recipe().to_dict()
    assert len(set(plan_s.choice.values())) > 1            # a real mix, not one preset everywhere


@pytest.mark.slow
def test_stream_budget_cli_writes_the_in_memory_bytes(smollm2, tmp_path):
    """`lowbit quantize DIR --stream --budget 3.9bpw` plans on the streamed sensitivity pass and
    streams the plan's recipe: every file, the manifest's budget plan included, equals the
    in-memory command's."""
    import hashlib

    from lowbit.cli import main
    args = ["quantize", str(smollm2.path), "--budget", BUDGET, "--candidates", ",".join(CANDIDATES),
            "--samples", "2", "--seq-len", "64", "--no-sensitivity-cache"]
    assert main(args + ["--out", str(tmp_path / "mem")]) == 0
    assert main(args + ["--stream", "--out", str(tmp_path / "stream")]) == 0

    def digests(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}
    assert digests(tmp_path / "stream") == digests(tmp_path / "mem")


def test_streamed_imatrix_equals_the_whole_model_one(smollm2, tokens):
    """The imatrix `--stream --budget --format gguf` encodes with, collected one decoder block at a
    time from the safetensors directory (calibration.imatrix.collect_imatrix_streamed), is
    collect_imatrix's on the loaded model: the same sums, counts and order, bit for bit."""
    import numpy as np

    from lowbit.calibration.imatrix import collect_imatrix, imatrix_targets
    from lowbit.budget.streamed import streamed_imatrix
    mem = collect_imatrix(smollm2.model, tokens, imatrix_targets(smollm2.model), dataset="wiki", progress=False)
    s = streamed_imatrix(smollm2.path, tokens, "wiki")
    assert list(s.sums) == list(mem.sums) and len(mem.sums) == 7 * smollm2.model.config.num_hidden_layers
    assert s.counts == mem.counts and s.chunk_count == mem.chunk_count and s.datasets == mem.datasets
    for name, v in mem.sums.items():
        assert np.array_equal(s.sums[name], v), name


@pytest.mark.slow
def test_stream_budget_gguf_cli_writes_the_in_memory_bytes(smollm2, tmp_path):
    """`lowbit quantize DIR --stream --budget 6.0bpw --format gguf`: the streamed sensitivity
    pass, an imatrix collected block by block, the plan's ggml types streamed into the GGUF: the
    file equals the in-memory command's, and the sidecars differ only in the files' names."""
    import json
    from pathlib import Path

    from lowbit.cli import main
    args = ["quantize", str(smollm2.path), "--budget", "6.0bpw", "--format", "gguf", "--candidates",
            "gguf-q4_0,gguf-q8_0", "--samples", "2", "--seq-len", "64", "--no-sensitivity-cache"]
    assert main(args + ["--out", str(tmp_path / "mem.gguf")]) == 0
    assert main(args + ["--stream", "--out", str(tmp_path / "stream.gguf")]) == 0
    assert (tmp_path / "stream.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()
    man, ref = (json.loads(Path(f"{tmp_path / n}.gguf.lowbit.json").read_text()) for n in ("stream", "mem"))
    assert list(man.pop("files").values()) == list(ref.pop("files").values())
    assert man == ref and man["gguf"]["imatrix"] and man["metrics"]["budget_plan"]
    used = {v["used"] for k, v in man["gguf"]["tensors"].items() if k.startswith("blk.")}
    assert {"Q4_0", "Q8_0"} <= used                      # a mix of the two
