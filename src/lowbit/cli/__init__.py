"""`lowbit` command line: a thin layer over the Python API.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds a parser
and sets `func(args) -> int`. Add a module name to SUBCOMMANDS to expose it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from lowbit.errors import LowbitError

SUBCOMMANDS = [
    "lowbit.cli.info",
    "lowbit.cli.numbers",
    "lowbit.cli.eval",
    "lowbit.cli.demo",
    "lowbit.cli.generate",
    "lowbit.cli.export",
    "lowbit.cli.imatrix",
    "lowbit.cli.quantize",
    "lowbit.cli.verify",
    "lowbit.cli.report",
    "lowbit.cli.runs",
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Make large language models small.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMANDS:
        importlib.import_module(mod).register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LowbitError as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
