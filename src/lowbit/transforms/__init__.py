"""Equivalent float rewrites before quantization (AWQ / SmoothQuant scales, Hadamard rotations).

A recipe lists them by name (Recipe.transforms, e.g. [{"name": "rotate", "seed": 0}]), of two kinds:
- model-level (here: "rotate"): a config dataclass plus a function model -> info dict, applied in
  order to the whole float model before any rule quantizes it (api.quantize);
- block-level (transforms.block.TRANSFORMS: "awq", "smoothquant"): searched on each float decoder
  block's calibration inputs by the block loop, just before that block is quantized.
"""
from __future__ import annotations

import dataclasses

from lowbit.errors import LowbitError


def _registry() -> dict:
    from lowbit.transforms.rotate import RotateConfig, rotate_model
    return {"rotate": (RotateConfig, rotate_model)}


def block_level_names() -> set[str]:
    from lowbit.transforms.block import TRANSFORMS
    return set(TRANSFORMS)


def unknown_transform(name) -> LowbitError:
    known = sorted(set(_registry()) | block_level_names())
    return LowbitError(f"recipe transform {name!r}: unknown; available: {known}")


def make_transforms(specs: list[dict]) -> list[tuple[str, object, object]]:
    """(name, function, config) per model-level transform (block-level ones are the block loop's);
    every option checked before any work."""
    reg = _registry()
    out = []
    for spec in specs:
        name = spec.get("name")
        if name in block_level_names():
            continue
        if name not in reg:
            raise unknown_transform(name)
        cls, fn = reg[name]
        out.append((name, fn, transform_config(spec, cls)))
    return out


def transform_config(spec: dict, cls: type):
    """The config dataclass `cls` from a recipe entry {"name": ..., **options}, options checked."""
    name = spec.get("name")
    args = {k: v for k, v in spec.items() if k != "name"}
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise LowbitError(f"recipe transform {name!r}: unknown option(s) {unknown}; expected some of {known}")
    return cls(**args)


def apply_transforms(model, specs: list[dict]) -> list[dict]:
    """Apply the recipe's transforms to `model` in place; one info dict per transform."""
    return [{"transform": name, **fn(model, cfg)} for name, fn, cfg in make_transforms(specs)]
