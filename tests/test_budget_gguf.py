"""A size budget for GGUF (lowbit.budget, fmt="gguf"): candidates are GGUF tensor types encoded by
llama.cpp's own block encoders, each module's bytes are its GGUF tensor's bytes, and
`lowbit quantize --budget ... --format gguf` writes a file whose per-tensor types are the plan's,
whose tensor bytes are the predicted ones to the byte, and which llama.cpp's layout readers load."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lowbit.errors import LowbitError


def test_gguf_candidates_are_checked_against_the_format():
    from lowbit.budget.sensitivity import GGUF_CANDIDATES, candidate_rule, check_candidates, default_candidates
    r = candidate_rule("gguf-q4_k")
    assert r.method == "ggml" and r.scheme.format == "q4_k"
    with pytest.raises(LowbitError, match="gguf-q9_z"):
        candidate_rule("gguf-q9_z")
    with pytest.raises(LowbitError, match="holds ggml types only"):
        check_candidates("gguf", ["gguf-q4_k", "w4g128-rtn"])
    with pytest.raises(LowbitError, match="for --format gguf"):
        check_candidates("native", ["gguf-q4_k"])
    assert default_candidates("gguf") == GGUF_CANDIDATES
    check_candidates("gguf", GGUF_CANDIDATES)


@pytest.mark.slow
@pytest.mark.model
def test_cli_quantize_gguf_budget(tmp_path, capsys):
    """Between Q4_0 (4.5 bits per weight) and Q8_0 (8.5) a 6.0 bpw budget mixes both; the file has
    the plan's type per tensor, the plan's tensor bytes exactly, and decodes to a model far closer
    to the float one than uniform Q4_0."""
    from lowbit.budget.sizing import file_payload_bytes
    from lowbit.cli import main
    from lowbit.export.gguf.reader import load_gguf, tensor_types
    from lowbit.models import load_model
    os.environ["LOWBIT_CACHE"] = str(tmp_path / "cache")
    try:
        out = tmp_path / "mix.gguf"
        rc = main(["quantize", "smollm2-135m", "--budget", "6.0bpw", "--format", "gguf", "--candidates",
                   "gguf-q4_0,gguf-q8_0", "--samples", "2", "--seq-len", "64", "--out", str(out),
                   "--save-recipe", str(tmp_path / "mix.json")])
        assert rc == 0
        text = capsys.readouterr().out
        assert "budget 6.0bpw: predicted" in text
    finally:
        os.environ.pop("LOWBIT_CACHE", None)
    rules = json.loads((tmp_path / "mix.json").read_text())["rules"]
    assert rules[-1]["targets"] == "^lm_head$"          # the output / tied embedding as llama.cpp's mixes
    types = tensor_types(out)
    blk = {k: v for k, v in types.items() if k.startswith("blk.") and k.endswith(".weight") and "norm" not in k}
    assert len(blk) == 30 * 7 and set(blk.values()) == {"Q4_0", "Q8_0"}
    assert types["token_embd.weight"] == "Q8_0"          # Q6_K's fallback on 576 columns
    # the plan's bytes are the file's tensor bytes, to the byte; its bits per weight within budget
    line = next(x for x in text.splitlines() if x.startswith("budget 6.0bpw: predicted"))
    nums = [int(t.replace(",", "")) for t in line.replace("(", " ").split() if t.replace(",", "").isdigit()]
    predicted_total, linear, _written_total, written_payload = nums[0], nums[1], nums[-2], nums[-1]
    f = file_payload_bytes(out)
    assert f["payload_bytes"] == written_payload and f["total_bytes"] == _written_total
    weights = sum(int(m.weight.numel()) for n, m in load_model("smollm2-135m").model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert 8 * linear / weights <= 6.0
    # the whole file (header estimated from the tokenizer) within 1% of the prediction
    assert abs(f["total_bytes"] - predicted_total) <= 0.01 * f["total_bytes"]
    # decoded by lowbit's GGUF reader: at 6.0 bpw the mix (mostly Q8_0) is far closer to the float
    # model than uniform Q4_0 (its cheapest candidate) on the same tokens
    import copy

    from lowbit import api
    model, tok, _ = load_gguf(out)
    ids = tok("The quick brown fox jumps over the lazy dog. It was not amused.", return_tensors="pt").input_ids
    ref = load_model("smollm2-135m").model
    q40 = copy.deepcopy(ref)
    api.quantize(q40, "q4_0", progress=False)

    def kl(m):
        with torch.no_grad():
            p = torch.log_softmax(ref(input_ids=ids).logits.float(), -1)
            q = torch.log_softmax(m(input_ids=ids).logits.float(), -1)
        assert torch.isfinite(q).all()
        return float((p.exp() * (p - q)).sum(-1).mean())
    k_mix, k_q40 = kl(model), kl(q40)
    assert k_mix < k_q40 / 2, (k_mix, k_q40)
