"""`lowbit report`: the HTML page built from real runs of the bundled model (two uniform RTN presets
and one budget-chosen mix), checked for structure (always) and rendered by headless Chromium
(when installed): a screenshot whose pixels show the charts."""
from __future__ import annotations

import copy
import json
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.model


def _run(smollm2, recipe, out: Path, ref) -> Path:
    """Quantize a copy of the bundled model, write it (native), evaluate it beside it."""
    from lowbit import api
    from lowbit.eval import evaluate
    from lowbit.eval.kl import KLAccumulator
    from lowbit.eval.report_html import kl_histogram
    from lowbit.models.base import LoadedModel
    lm = LoadedModel(copy.deepcopy(smollm2.model), smollm2.tokenizer, smollm2.path, smollm2.source,
                     smollm2.source_sha256)
    rep = api.quantize(lm.model, recipe, progress=False)
    metrics = {"budget_plan": recipe.plan} if hasattr(recipe, "plan") else None
    api.export(lm, rep, out, "native", metrics=metrics)
    acc = KLAccumulator(ref)
    rec = evaluate(lm.model, lm.tokenizer, reference=ref, metrics=["ppl", "kl", "size"], seq_len=64,
                   max_tokens=128, kl_max_tokens=128, path=out, label=out.name, progress=False, consumers=[acc])
    rec["kl_histogram"] = kl_histogram(torch.cat(acc.kl), bins=12)
    (out.parent / f"{out.name}.json").write_text(json.dumps(rec, default=str))
    return out


@pytest.fixture(scope="module")
def uniform(smollm2, tmp_path_factory):
    """The fp32 baseline, its KL reference, and one real uniform run (w4g64-rtn)."""
    from lowbit.eval import evaluate_reference
    from lowbit.eval.report_html import write_report
    from lowbit.recipe import get_recipe
    root = tmp_path_factory.mktemp("report")
    base, ref = evaluate_reference(smollm2.model, smollm2.tokenizer, metrics=["ppl"], seq_len=64, max_tokens=128,
                                   kl_max_tokens=128, progress=False)
    (root / "fp32.json").write_text(json.dumps(base, default=str))
    run = _run(smollm2, get_recipe("w4g64-rtn"), root / "w4g64-rtn", ref)
    html = write_report([run], root / "one.html", baseline=root / "fp32.json")
    return {"root": root, "ref": ref, "run": run, "html": html}


@pytest.fixture(scope="module")
def report(smollm2, uniform):
    """uniform's run and a budget-chosen mix from a real (small) sensitivity table."""
    from lowbit.budget import parse_budget, solve
    from lowbit.budget.sensitivity import sensitivity
    from lowbit.eval.report_html import write_report
    root, ref = uniform["root"], uniform["ref"]
    # a real (small) sensitivity table: data-free candidates, 2 windows of 64 tokens
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    toks = calibration_tokens(smollm2.tokenizer, CalibrationConfig(n_samples=1, seq_len=32))
    sens = sensitivity(smollm2.model, toks, candidates=["w4g64-rtn", "w8-rtn"], fisher_samples=1)
    plan = solve(sens, parse_budget("4.6bpw"))
    mix = plan.recipe()
    mix.plan = plan.to_dict()
    runs = [uniform["run"]]
    runs.append(_run(smollm2, mix, root / "budget-4.6bpw", ref))
    html = write_report(runs, root / "report.html", baseline=root / "fp32.json")
    return {"html": html, "runs": runs, "plan": plan}


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(path: Path) -> tuple[str, _Tags]:
    text = path.read_text()
    p = _Tags()
    p.feed(text)
    return text, p


def _self_contained(text: str, p: _Tags) -> None:
    """No script, no stylesheet or image fetched, no URL but the SVG namespace."""
    assert not any(t in ("script", "link", "img", "iframe") for t, _ in p.tags)
    assert text.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http") == 0


def test_report_structure_one_run(uniform):
    text, p = _parse(uniform["html"])
    charts = [a for t, a in p.tags if t == "svg" and "chart" in a.get("class", "")]
    assert len(charts) == 3                              # 2 Pareto charts + the KL histogram
    assert len([a for t, a in p.tags if t == "circle" and a.get("class") == "point"]) == 2
    assert len([a for t, a in p.tags if t == "rect" and a.get("class") == "bar"]) == 12
    assert "no per-layer error recorded" in text and "lowbit_recipe_version" in text
    assert len([t for t, _ in p.tags if t == "tr"]) == 2  # header + the run
    _self_contained(text, p)


@pytest.mark.slow
def test_report_structure(report):
    text = report["html"].read_text()
    p = _Tags()
    p.feed(text)
    charts = [a for t, a in p.tags if t == "svg" and "chart" in a.get("class", "")]
    # 2 Pareto charts; per run a KL histogram; the mix its predicted-KL and bits heatmaps (RTN
    # records no per-layer loss: the uniform run says so in words)
    assert len(charts) == 2 + 2 + 2
    assert sum("heatmap" in a["class"] for a in charts) == 2
    assert sum("histogram" in a["class"] for a in charts) == 2
    assert "no per-layer error recorded" in text
    points = [a for t, a in p.tags if t == "circle" and a.get("class") == "point"]
    assert len(points) == 2 * 2           # each run in each Pareto chart
    cells = [a for t, a in p.tags if t == "rect" and a.get("class") == "cell"]
    assert len(cells) == 2 * 30 * 7       # 30 blocks x 7 linears per heatmap
    bars = [a for t, a in p.tags if t == "rect" and a.get("class") == "bar"]
    assert len(bars) == 2 * 12
    _self_contained(text, p)
    assert "budget-4.6bpw" in text and "w4g64-rtn" in text and "lowbit_recipe_version" in text


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) -> (w, h, rows)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
        prev = line
    return w, h, rows


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _render(html: Path, tmp_path: Path, colours: list[str], n_charts: int) -> str:
    from lowbit.eval.svg import PALETTE
    shot = tmp_path / "report.png"
    # no network at all: every host name resolves to nothing
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--screenshot={shot}", "--window-size=1400,1400",
           html.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    w, h, rows = _png_pixels(shot)
    assert (w, h) == (1400, 1400)
    seen = {bytes.fromhex(PALETTE[k][1:]): 0 for k in colours}          # the series' marker colours
    for row in rows:
        for col in seen:
            seen[col] += row.count(col)      # approximate: colour triples at any offset
    # both series' markers are on screen: a r=5 circle is ~60 pixels of its colour, one per chart,
    # beyond the ~30 of each chart's 15 px x 2 px legend line
    assert all(n >= 2 * 30 + 2 * 40 for n in seen.values()), seen
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          "--host-resolver-rules=MAP * ~NOTFOUND", html.as_uri()],
                         check=True, capture_output=True, timeout=120, text=True).stdout
    assert dom.count('<svg class="chart') == n_charts
    return dom


NO_CHROMIUM = "headless Chromium not installed (apt-get install chromium)"


@pytest.mark.skipif(_chromium() is None, reason=NO_CHROMIUM)
def test_one_run_renders_in_headless_chromium(uniform, tmp_path):
    dom = _render(uniform["html"], tmp_path, [0], 3)    # the uniform series is the first one here
    assert "<title>" in dom and dom.count('<svg class="chart') == 3


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason=NO_CHROMIUM)
def test_report_renders_in_headless_chromium(report, tmp_path):
    dom = _render(report["html"], tmp_path, [0, 2], 6)  # mixes, then uniform presets
    assert dom.count('<svg class="chart') == 6


@pytest.mark.slow
def test_mix_file_bytes_equal_the_plan(report):
    """The solver's byte accounting is the written file's: tensor data exactly, the whole directory
    within the estimated header / manifest allowance."""
    from lowbit.budget.sizing import file_payload_bytes
    plan = report["plan"]
    f = file_payload_bytes(report["runs"][-1])
    assert f["payload_bytes"] == plan.linear_bytes + plan.fixed["tensor_bytes"]
    assert abs(f["total_bytes"] - plan.total_bytes) <= plan.fixed["overhead_bytes"]
    assert plan.bits_per_weight <= 4.6


@pytest.mark.slow
def test_cli_quantize_budget(tmp_path, capsys):
    """`lowbit quantize --budget` end to end: plan, recipe file, output within budget, run recorded."""
    import os

    from lowbit.budget.sizing import file_payload_bytes
    from lowbit.cli import main
    from lowbit.recipe import Recipe
    os.environ["LOWBIT_CACHE"] = str(tmp_path / "cache")
    os.environ.pop("LOWBIT_NO_RUNS", None)
    try:
        out = tmp_path / "mix"
        rc = main(["quantize", "smollm2-135m", "--budget", "3.6bpw", "--candidates",
                   "w3g64-gptq-actorder-mse,w4g64-gptq-actorder-mse,w4g128-rtn", "--samples", "4",
                   "--seq-len", "128", "--out", str(out), "--save-recipe", str(tmp_path / "mix.json")])
        assert rc == 0
        text = capsys.readouterr().out
        assert "budget 3.6bpw: predicted" in text
        recipe = Recipe.load(tmp_path / "mix.json")
        assert recipe.name == "budget-3.6bpw" and Recipe.load(out / "lowbit.json").rules == recipe.rules
        man = json.loads((out / "lowbit.json").read_text())
        plan = man["metrics"]["budget_plan"]
        f = file_payload_bytes(out)
        assert f["payload_bytes"] == plan["linear_bytes"] + plan["fixed"]["tensor_bytes"]
        assert plan["bits_per_weight"] <= 3.6
        assert len(list((tmp_path / "cache" / "runs").glob("*.json"))) == 1
        assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 1
    finally:
        os.environ["LOWBIT_NO_RUNS"] = "1"
        os.environ.pop("LOWBIT_CACHE", None)
