"""`lowbit report RUN_DIR... --out report.html`: one self-contained HTML page for a person to look at.

A RUN_DIR is a lowbit output directory (lowbit.json: the manifest, with the recipe, the layers and
their solver losses, and any metrics written with it) with its evaluation record beside it: the
JSON of `lowbit eval --json` (or lowbit.eval.evaluate) as RUN_DIR/eval.json or RUN_DIR.json.

The page holds, all inline (SVG drawn by eval/svg.py, CSS in a <style>; no script, no network):
  * a table of every run: recipe, bits per weight, file size, perplexity (dPPL against --baseline),
    KL / top-1 to the original, speed and memory where recorded;
  * Pareto charts: file size vs KL and vs dPPL (or perplexity), budget mixes and uniform presets as
    two series, each with the line through its non-dominated points;
  * per run, heatmaps (rows: the linear's place in the block; columns: the block) of the per-layer
    error: GPTQ's loss where the method records one, and for budget mixes the predicted KL of each
    module's choice and the bits per weight chosen;
  * per run, the histogram of per-token KL when the record has one ("kl_histogram": log10 edges);
  * per run, the recipe and the manifest as JSON.
"""
from __future__ import annotations

import json
import re
import time
from html import escape
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.eval import svg

CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:16px}pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:400px}
section{margin-bottom:28px}.empty{color:#777;font-style:italic}"""


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"report: {p}: not readable JSON ({e})") from e


def load_run(path: str | Path) -> dict:
    """{name, dir, manifest, eval} of one run directory (module docstring)."""
    from lowbit.export.common import MANIFEST_NAMES
    d = Path(path)
    if not d.is_dir():
        raise LowbitError(f"report: {d}: expected a lowbit output directory (with lowbit.json)")
    man = next((d / n for n in MANIFEST_NAMES if (d / n).is_file()), None)
    if man is None:
        raise LowbitError(f"report: {d}: no manifest ({' or '.join(MANIFEST_NAMES)}); is it a lowbit output?")
    manifest = _read_json(man)
    ev = None
    for cand in (d / "eval.json", d.parent / f"{d.name}.json"):
        if cand.is_file():
            ev = _read_json(cand)
            break
    if ev is None and any(k in (manifest.get("metrics") or {}) for k in ("ppl", "kl")):
        ev = manifest["metrics"]
    return {"name": d.name, "dir": str(d), "manifest": manifest, "eval": ev or {}}


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _file_bytes(run: dict) -> int | None:
    return _get(run["eval"], "file", "total_bytes") or _get(run["eval"], "size", "disk_bytes")


def _bpw(run: dict) -> float | None:
    layers = run["manifest"].get("layers") or {}
    if layers:
        bits = sum(r.get("bits_per_weight", 0) * r["shape"][0] * r["shape"][1] for r in layers.values())
        n = sum(r["shape"][0] * r["shape"][1] for r in layers.values())
        return bits / n if n else None
    return _get(run["eval"], "size", "linear_bits_per_weight")


def _is_mix(run: dict) -> bool:
    rec = run["manifest"].get("lowbit_recipe") or {}
    return str(rec.get("name", "")).startswith("budget") or "budget_plan" in (run["manifest"].get("metrics") or {})


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The non-dominated points (smaller size and smaller loss are better), by size."""
    front, best = [], float("inf")
    for p in sorted(points):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front


def _pareto_chart(runs: list[dict], y_of, y_label: str, title: str, log_y: bool) -> str:
    series = []
    for name, sel in (("budget mixes", True), ("uniform presets", False)):
        pts = [(_file_bytes(r) / 1e6, y_of(r), r["name"]) for r in runs
               if _is_mix(r) == sel and _file_bytes(r) and y_of(r) is not None]
        if pts:
            series.append({"name": name, "points": pts, "line": False})
            series.append({"name": f"{name}: Pareto front", "points": pareto(pts), "line": True, "markers": False})
    return svg.scatter(series, "file size (MB)", y_label, title, log_y=log_y)


_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def layer_grid(layers: dict, value) -> tuple[list[list], list[str], list[str]]:
    """values[row = place in block][col = block index] from manifest layers."""
    cells: dict[tuple[str, int], float] = {}
    for name, row in layers.items():
        m = _BLOCK.match(name)
        if m:
            v = value(row)
            if v is not None:
                cells[(m[3], int(m[2]))] = float(v)
    rows = sorted({k[0] for k in cells}, key=lambda s: [k[0] for k in cells].index(s))
    order = []
    for name in layers:                                  # rows in the model's order
        m = _BLOCK.match(name)
        if m and m[3] in rows and m[3] not in order:
            order.append(m[3])
    cols = sorted({k[1] for k in cells})
    return [[cells.get((r, c)) for c in cols] for r in order], order, [str(c) for c in cols]


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def _summary_table(runs: list[dict], baseline_ppl: float | None) -> str:
    head = ["run", "recipe", "bits/weight (linears, storage)", "file MB", "perplexity", "dPPL", "KL mean",
            "top-1", "decode tok/s", "peak RSS MiB"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in runs:
        ppl = _get(r["eval"], "ppl", "ppl")
        cells = [r["name"], (r["manifest"].get("lowbit_recipe") or {}).get("name", "-"), _fmt(_bpw(r), ".3f"),
                 _fmt(_file_bytes(r), ".2f", 1e-6), _fmt(ppl, ".3f"),
                 _fmt(None if ppl is None or baseline_ppl is None else ppl - baseline_ppl, "+.3f"),
                 _fmt(_get(r["eval"], "kl", "mean"), ".4f"), _fmt(_get(r["eval"], "kl", "top1_agreement"), ".1%"),
                 _fmt(_get(r["eval"], "speed", "decode_tokens_per_s"), ".1f"),
                 _fmt(_get(r["eval"], "memory", "peak_rss_bytes"), ".0f", 1 / 2**20)]
        out.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def _run_section(r: dict) -> str:
    layers = r["manifest"].get("layers") or {}
    parts = [f'<section class="run"><h2>{escape(r["name"])}</h2><p>{escape(r["dir"])}</p><div class="charts">']
    if any(_get(row, "info", "loss") for row in layers.values()):
        vals, rows, cols = layer_grid(layers, lambda row: _get(row, "info", "loss"))
        parts.append(svg.heatmap(vals, rows, cols, f"{r['name']}: per-layer error (GPTQ loss, log scale)"))
    plan = _get(r["manifest"], "metrics", "budget_plan") or {}
    if plan.get("predicted_kl_per_module"):
        pk = plan["predicted_kl_per_module"]
        vals, rows, cols = layer_grid({n: {"v": pk[n]} for n in layers if n in pk}, lambda row: row["v"])
        parts.append(svg.heatmap(vals, rows, cols, f"{r['name']}: predicted KL per module (nats/token, log scale)"))
    if not any(_get(row, "info", "loss") for row in layers.values()) and not plan:
        parts.append('<p class="empty">no per-layer error recorded (data-free method, no budget plan)</p>')
    if _is_mix(r):
        vals, rows, cols = layer_grid(layers, lambda row: row.get("bits_per_weight"))
        parts.append(svg.heatmap(vals, rows, cols, f"{r['name']}: bits per weight chosen", log=False, unit=" bpw"))
    h = r["eval"].get("kl_histogram")
    if h:
        parts.append(svg.bars(h["edges"], h["counts"], "KL per token (nats, log scale)",
                              f"{r['name']}: per-token KL to the original", log_x=True))
    else:
        parts.append('<p class="empty">no per-token KL histogram recorded for this run</p>')
    parts.append("</div>")
    recipe = r["manifest"].get("lowbit_recipe")
    if recipe:
        parts.append(f"<details><summary>recipe</summary><pre>{escape(json.dumps(recipe, indent=2))}</pre></details>")
    man = {k: v for k, v in r["manifest"].items() if k != "layers"}
    parts.append(f"<details><summary>manifest (without the {len(layers)} layer rows)</summary>"
                 f"<pre>{escape(json.dumps(man, indent=2, sort_keys=True))}</pre></details></section>")
    return "".join(parts)


def render(runs: list[dict], *, baseline_ppl: float | None = None, title: str = "lowbit report") -> str:
    if not runs:
        raise LowbitError("report: no runs given")
    if baseline_ppl is not None:
        y_ppl, lab = (lambda r: None if _get(r["eval"], "ppl", "ppl") is None
                      else _get(r["eval"], "ppl", "ppl") - baseline_ppl), "dPPL (vs baseline)"
    else:
        y_ppl, lab = (lambda r: _get(r["eval"], "ppl", "ppl")), "perplexity"
    charts = [_pareto_chart(runs, lambda r: _get(r["eval"], "kl", "mean"), "KL to the original (nats/token)",
                            "size vs KL", log_y=True),
              _pareto_chart(runs, y_ppl, lab, f"size vs {lab.split(' ')[0]}", log_y=False)]
    body = [f"<h1>{escape(title)}</h1><p>{len(runs)} run(s); written "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            + (f"; baseline perplexity {baseline_ppl:.3f}" if baseline_ppl is not None else "") + "</p>",
            "<section><h2>Runs</h2>", _summary_table(runs, baseline_ppl), "</section>",
            '<section><h2>Size vs quality</h2><div class="charts">', *charts, "</div></section>",
            *[_run_section(r) for r in runs]]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(run_dirs: list[str | Path], out: str | Path, *, baseline: str | Path | None = None,
                 title: str = "lowbit report") -> Path:
    """Render the runs to `out` (atomically). baseline: an eval JSON of the original model (dPPL)."""
    from lowbit.io import atomic_file
    runs = [load_run(d) for d in run_dirs]
    base = None
    if baseline is not None:
        base = _get(_read_json(Path(baseline)), "ppl", "ppl")
        if base is None:
            raise LowbitError(f"report --baseline {baseline}: expected an eval record with ppl.ppl")
    html = render(runs, baseline_ppl=base, title=title)
    p = Path(out)
    with atomic_file(p, "w") as fh:
        fh.write(html)
    return p


def kl_histogram(kl_values, bins: int = 40) -> dict:
    """{"edges": log10 edges, "counts"} of per-token KL values (a tensor); zeros go to the first bin."""
    import torch
    v = torch.as_tensor(kl_values, dtype=torch.float64).clamp_min(1e-8).log10()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "scale": "log10 nats"}
