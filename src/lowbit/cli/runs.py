"""`lowbit runs`: the local run registry (lowbit.runs): every quantize / eval, with its recipe,
versions, source and calibration hashes, and metrics.

    lowbit runs                      list them, oldest first
    lowbit runs --compare ID ID      metrics side by side, and which settings differ
    lowbit runs --json               every entry as JSON
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("runs", help="list and compare recorded quantize / eval runs",
                       description=__doc__.splitlines()[0])
    p.add_argument("--compare", nargs="+", metavar="ID", help="run ids (or unique prefixes / suffixes)")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.add_argument("--last", type=int, default=None, help="only the last N runs")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from lowbit.runs import compare_runs, find_runs, format_runs, list_runs, runs_dir
    if args.compare:
        entries = find_runs(args.compare)
        print(json.dumps(entries, indent=2) if args.json else compare_runs(entries))
        return 0
    entries = list_runs()
    if args.last:
        entries = entries[-args.last:]
    print(json.dumps(entries, indent=2) if args.json else format_runs(entries))
    if not args.json:
        print(f"({len(entries)} run(s) in {runs_dir()})")
    return 0
