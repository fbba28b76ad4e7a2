"""`lowbit models`: the built-in model names and whether each is installed."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list built-in model names and whether they are installed")
    p.set_defaults(func=run)


def run(args) -> int:
    from lowbit.errors import LowbitError
    from lowbit.models.registry import BUILTIN_MODELS
    for name, spec in BUILTIN_MODELS.items():
        try:
            state = "installed" if isinstance(spec.install_hint, str) and _installed(spec) else "missing"
        except LowbitError:
            state = "missing"
        print(f"{name:22s} {state:9s} {spec.description}")
        if state == "missing":
            print(f"{'':32s} install: {spec.install_hint}")
    return 0


def _installed(spec) -> bool:
    import importlib.metadata as md
    pkgs = getattr(spec, "packages", None) or (spec.package,)
    try:
        for p in pkgs:
            md.distribution(p)
    except md.PackageNotFoundError:
        return False
    return True
