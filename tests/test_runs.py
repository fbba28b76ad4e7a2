"""The run registry (lowbit.runs) and `lowbit runs`."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.recipe import get_recipe
from lowbit.runs import compare_runs, find_runs, format_runs, list_runs, record_run


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.delenv("LOWBIT_NO_RUNS", raising=False)
    return tmp_path / "runs"


def test_record_list_compare(registry, capsys):
    toks = torch.arange(64).reshape(2, 32)
    a = record_run("quantize", model="smollm2-135m", source_sha256="ab" * 32, recipe=get_recipe("w4g128-rtn"),
                   calibration={"n_samples": 2, "seq_len": 32}, tokens=toks,
                   metrics={"bits_per_weight": 4.19, "ppl": {"ppl": 20.5, "nll_stderr": 0.01}}, output=registry.parent / "out")
    b = record_run("eval", model="smollm2-135m", recipe=get_recipe("w8-rtn"),
                   metrics={"ppl": {"ppl": 17.9, "nll_stderr": 0.01}, "kl": {"mean": 0.01}, "size": {"linear_bits_per_weight": 8.03}})
    files = sorted(registry.glob("*.json"))
    assert len(files) == 2 and not list(registry.glob(".*"))           # no temporaries left behind
    on_disk = json.loads(files[0].read_text()) if files[0].stem == a["id"] else json.loads(files[1].read_text())
    assert on_disk["calibration"]["tokens_sha256"] == a["calibration"]["tokens_sha256"]
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["recipe"]["name"] == "w4g128-rtn"
    runs = list_runs()
    assert [r["id"] for r in runs] == sorted([a["id"], b["id"]])
    table = format_runs(runs)
    assert "w4g128-rtn" in table and "20.500" in table and "0.0100" in table
    cmp = compare_runs(find_runs([a["id"], b["id"][-8:]]))
    assert "recipe: w4g128-rtn | w8-rtn   <- differs" in cmp
    assert "model: smollm2-135m | smollm2-135m" in cmp and "differs" not in cmp.split("model:")[1].split("\n")[0]

    from lowbit.cli import main
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "(2 run(s) in" in out
    assert main(["runs", "--compare", a["id"], b["id"]]) == 0
    assert main(["runs", "--compare", "nope"]) == 2
    assert "matches 0 runs" in capsys.readouterr().err


def test_disabled_and_unreadable(registry, monkeypatch):
    monkeypatch.setenv("LOWBIT_NO_RUNS", "1")
    assert record_run("eval", model="m") is None and list_runs() == []
    monkeypatch.delenv("LOWBIT_NO_RUNS")
    record_run("eval", model="m")
    (registry / "zz-broken.json").write_text("{not json")
    with pytest.raises(LowbitError, match="zz-broken.json is not readable JSON"):
        list_runs()
