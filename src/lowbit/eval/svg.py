"""Inline SVG charts for the HTML report: written as text here, no plotting library, no script.

    scatter(series, x_label, y_label)      points (+ a line through each series' points if asked)
    heatmap(values, row_labels, col_labels) one cell per value, colour by value (log scale optional)
    bars(edges, counts, x_label)            a histogram

Every chart is an <svg> with a <title> and class "chart", so a test (or a screen reader) can find
it; colours come from one fixed palette so the same series has the same colour in every chart.
"""
from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
W, H = 640, 400
PAD_L, PAD_R, PAD_T, PAD_B = 70, 20, 30, 50


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-12 * abs(hi):
        out.append(round(v, 12))
        v += step
    return out


def _log(v: float) -> float:
    return math.log10(max(v, 1e-300))


def scatter(series: list[dict], x_label: str, y_label: str, title: str, *, log_y: bool = False,
            width: int = W, height: int = H) -> str:
    """series: [{"name", "points": [(x, y, label)], "line": bool, "markers": bool}] -> <svg>."""
    pts = [(x, y) for s in series for x, y, _ in s["points"] if y is not None and x is not None]
    if not pts:
        return f'<p class="empty">{escape(title)}: no data</p>'
    fy = _log if log_y else (lambda v: v)
    xs = [p[0] for p in pts]
    ys = [fy(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    dx = (x1 - x0) or abs(x0) or 1.0
    dy = (y1 - y0) or abs(y0) or 1.0
    x0, x1, y0, y1 = x0 - 0.05 * dx, x1 + 0.05 * dx, y0 - 0.08 * dy, y1 + 0.08 * dy
    pw, ph = width - PAD_L - PAD_R, height - PAD_T - PAD_B

    def px(x):
        return PAD_L + (x - x0) / (x1 - x0) * pw

    def py(y):
        return PAD_T + ph - (fy(y) - y0) / (y1 - y0) * ph
    out = [f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}"><title>{escape(title)}</title>',
           f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{px(t):.1f}" y1="{PAD_T + ph}" x2="{px(t):.1f}" y2="{PAD_T + ph + 5}" stroke="#333"/>'
                   f'<text x="{px(t):.1f}" y="{PAD_T + ph + 18}" font-size="11" text-anchor="middle">{_fmt(t)}</text>')
    for t in _ticks(y0, y1):
        label = _fmt(10 ** t) if log_y else _fmt(t)
        yy = PAD_T + ph - (t - y0) / (y1 - y0) * ph
        out.append(f'<line x1="{PAD_L - 5}" y1="{yy:.1f}" x2="{PAD_L + pw}" y2="{yy:.1f}" stroke="#eee"/>'
                   f'<text x="{PAD_L - 8}" y="{yy + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{height - 12}" font-size="13" text-anchor="middle">{escape(x_label)}</text>'
               f'<text x="16" y="{PAD_T + ph / 2}" font-size="13" text-anchor="middle" '
               f'transform="rotate(-90 16 {PAD_T + ph / 2})">{escape(y_label)}</text>'
               f'<text x="{PAD_L}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>')
    for k, s in enumerate(series):
        col = PALETTE[k % len(PALETTE)]
        p = sorted((x, y, lab) for x, y, lab in s["points"] if y is not None and x is not None)
        if s.get("line") and len(p) > 1:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in p)
            out.append(f'<polyline points="{d}" fill="none" stroke="{col}" stroke-width="2"/>')
        for x, y, lab in (p if s.get("markers", True) else []):
            out.append(f'<circle class="point" cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{col}">'
                       f'<title>{escape(str(lab))}: {_fmt(x)}, {_fmt(y)}</title></circle>')
        ly = PAD_T + 14 + 16 * k
        out.append(f'<line x1="{PAD_L + pw - 175}" y1="{ly - 4}" x2="{PAD_L + pw - 160}" y2="{ly - 4}" '
                   f'stroke="{col}" stroke-width="2"/><text x="{PAD_L + pw - 155}" y="{ly}" font-size="11">{escape(s["name"])}</text>')
    out.append("</svg>")
    return "".join(out)


def _colour(t: float) -> str:
    """t in [0, 1] -> white .. dark red (a sequential scale that prints in grey too)."""
    t = min(1.0, max(0.0, t))
    r = int(255 - 120 * t)
    g = int(255 - 235 * t)
    b = int(255 - 230 * t)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(values: list[list[float | None]], row_labels: list[str], col_labels: list[str], title: str, *,
            log: bool = True, cell: int = 18, unit: str = "") -> str:
    """values[row][col]; None cells are grey. Colour by log10(value) when `log`."""
    flat = [v for r in values for v in r if v is not None and (v > 0 or not log)]
    if not flat:
        return f'<p class="empty">{escape(title)}: no data</p>'
    f = _log if log else (lambda v: v)
    lo, hi = min(f(v) for v in flat), max(f(v) for v in flat)
    left, top = 90, 40
    width = left + cell * len(col_labels) + 20
    height = top + cell * len(row_labels) + 40
    out = [f'<svg class="chart heatmap" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}"><title>{escape(title)}</title>',
           f'<text x="4" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, lab in enumerate(row_labels):
        out.append(f'<text x="{left - 6}" y="{top + cell * i + cell * 0.7:.1f}" font-size="11" '
                   f'text-anchor="end">{escape(lab)}</text>')
        for j, v in enumerate(values[i]):
            if v is None or (log and v <= 0):
                fill = "#ccc"
            else:
                fill = _colour((f(v) - lo) / (hi - lo) if hi > lo else 0.5)
            tip = "-" if v is None else f"{_fmt(v)}{unit}"
            out.append(f'<rect class="cell" x="{left + cell * j}" y="{top + cell * i}" width="{cell - 1}" '
                       f'height="{cell - 1}" fill="{fill}"><title>{escape(lab)} {escape(col_labels[j])}: '
                       f'{tip}</title></rect>')
    for j, lab in enumerate(col_labels):
        if len(col_labels) <= 40 or j % 2 == 0:
            out.append(f'<text x="{left + cell * j + cell / 2:.1f}" y="{top + cell * len(row_labels) + 14}" '
                       f'font-size="10" text-anchor="middle">{escape(lab)}</text>')
    scale = f"{'log10 ' if log else ''}{_fmt(10 ** lo if log else lo)} .. {_fmt(10 ** hi if log else hi)}{unit}"
    out.append(f'<text x="{left}" y="{height - 8}" font-size="11">colour: white = {escape(scale.split(" .. ")[0])}, '
               f'dark red = {escape(scale.split(" .. ")[1])}</text></svg>')
    return "".join(out)


def bars(edges: list[float], counts: list[int], x_label: str, title: str, *, log_x: bool = False,
         width: int = W, height: int = 300) -> str:
    """A histogram: len(edges) == len(counts) + 1."""
    if not counts or len(edges) != len(counts) + 1:
        return f'<p class="empty">{escape(title)}: no data</p>'
    pw, ph = width - PAD_L - PAD_R, height - PAD_T - PAD_B
    top = max(counts) or 1
    n = len(counts)
    out = [f'<svg class="chart histogram" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}"><title>{escape(title)}</title>',
           f'<text x="{PAD_L}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for i, c in enumerate(counts):
        bh = c / top * ph
        out.append(f'<rect class="bar" x="{PAD_L + i * pw / n:.1f}" y="{PAD_T + ph - bh:.1f}" '
                   f'width="{max(pw / n - 1, 1):.1f}" height="{bh:.1f}" fill="{PALETTE[0]}">'
                   f'<title>[{_fmt(edges[i])}, {_fmt(edges[i + 1])}): {c}</title></rect>')
    for i in range(0, n + 1, max(1, n // 6)):
        lab = _fmt(10 ** edges[i]) if log_x else _fmt(edges[i])
        out.append(f'<text x="{PAD_L + i * pw / n:.1f}" y="{PAD_T + ph + 16}" font-size="11" '
                   f'text-anchor="middle">{lab}</text>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{height - 10}" font-size="13" text-anchor="middle">'
               f'{escape(x_label)}</text><text x="{PAD_L - 8}" y="{PAD_T + 10}" font-size="11" '
               f'text-anchor="end">{top}</text></svg>')
    return "".join(out)
