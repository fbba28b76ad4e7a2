"""argparse types shared by the subcommands: a bad number is refused by the parser, naming the
option and what it takes, before anything is loaded."""
from __future__ import annotations

import argparse
import math


def _int_at_least(s: str, lo: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
    return v


def positive_int(s: str) -> int:
    return _int_at_least(s, 1)


def nonneg_int(s: str) -> int:
    return _int_at_least(s, 0)


def nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v
