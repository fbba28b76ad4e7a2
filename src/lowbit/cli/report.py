"""`lowbit report RUN_DIR... --out report.html`: one self-contained HTML page (lowbit.eval.report_html)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML page for lowbit output directories",
                       description="Pareto charts of size vs KL / dPPL, per-layer error heatmaps, the KL "
                                   "histogram, speed and memory, recipe and manifest of each run: inline "
                                   "SVG, no script, opens offline. A run's evaluation record is read from "
                                   "RUN_DIR/eval.json or RUN_DIR.json (`lowbit eval RUN_DIR --ref M --json`).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="lowbit output directories (with lowbit.json)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--baseline", help="eval JSON of the original model: perplexity deltas (dPPL)")
    p.add_argument("--title", default="lowbit report")
    p.set_defaults(func=run)


def run(args) -> int:
    from lowbit.eval.report_html import write_report
    path = write_report(args.runs, args.out, baseline=args.baseline, title=args.title)
    print(f"wrote {path} ({len(args.runs)} run(s))")
    return 0
