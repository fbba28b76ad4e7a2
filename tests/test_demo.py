"""`lowbit demo` end to end on the real bundled model, with a tiny budget (the full demo is `make demo`)."""
from __future__ import annotations

import json

import pytest

from lowbit.cli import main


@pytest.mark.slow   # ~1-2 min: quantizes the model and times the reference (dequantizing) decode path
@pytest.mark.model
def test_demo_prints_before_after_table_note_and_completions(tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--max-tokens", "128", "--seq-len", "128", "--new-tokens", "3", "--runs", "1",
               "--no-progress", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("fp32", "w4g128-rtn", "perplexity", "KL mean", "top-1 agreement", "decode tokens/s",
                   "bits / weight", "last group 64", "smaller than `lowbit eval`'s default",
                   "greedy completion", "inference path"):
        assert needle in text, needle
    rec = json.loads(out.read_text())
    base, quant = rec["fp32"], rec["w4g128-rtn"]
    assert base["ppl"]["tokens_scored"] == quant["ppl"]["tokens_scored"] == 127
    assert quant["kl"]["tokens"] == 127 and quant["kl"]["mean"] > 0
    assert quant["ppl"]["ppl"] > base["ppl"]["ppl"]
    assert quant["size"]["packed_bytes"] < base["size"]["packed_bytes"] / 3
    assert len(base["speed"]["completion"]) == len(quant["speed"]["completion"]) == 3
