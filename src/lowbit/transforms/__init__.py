"""Equivalent float rewrites before quantization (AWQ / SmoothQuant scales, Hadamard rotations).

A recipe lists them by name (Recipe.transforms, e.g. [{"name": "rotate", "seed": 0}]); each is a
config dataclass plus a function model -> info dict, applied in order to the float model before
any rule quantizes it.
"""
from __future__ import annotations

import dataclasses

from lowbit.errors import LowbitError


def _registry() -> dict:
    from lowbit.transforms.rotate import RotateConfig, rotate_model
    return {"rotate": (RotateConfig, rotate_model)}


def make_transforms(specs: list[dict]) -> list[tuple[str, object, object]]:
    """(name, function, config) per transform; every option checked before any work."""
    reg = _registry()
    out = []
    for spec in specs:
        name = spec.get("name")
        if name not in reg:
            raise LowbitError(f"recipe transform {name!r}: unknown; available: {sorted(reg)}")
        cls, fn = reg[name]
        args = {k: v for k, v in spec.items() if k != "name"}
        unknown = set(args) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LowbitError(f"recipe transform {name!r}: unknown option(s) {sorted(unknown)}; expected "
                              f"some of {sorted(f.name for f in dataclasses.fields(cls))}")
        out.append((name, fn, cls(**args)))
    return out


def apply_transforms(model, specs: list[dict]) -> list[dict]:
    """Apply the recipe's transforms to `model` in place; one info dict per transform."""
    return [{"transform": name, **fn(model, cfg)} for name, fn, cfg in make_transforms(specs)]
