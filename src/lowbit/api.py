"""The one orchestrator: load -> quantize (Recipe) -> evaluate -> export. Kept short on purpose;
the work lives in models/, methods/, calibration/, eval/ and export/.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.methods import get_method
from lowbit.models import LoadedModel, load_model  # noqa: F401  (re-exported: lowbit.api.load_model)
from lowbit.nn.qlinear import QuantLinear, set_submodule
from lowbit.recipe import Recipe, get_recipe


@dataclass
class QuantizeReport:
    recipe: Recipe
    layers: list[dict] = field(default_factory=list)   # one row per quantized module
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ragged(self) -> list[dict]:
        return [r for r in self.layers if r.get("ragged_last_group")]


def quantize_targets(model: nn.Module, recipe: Recipe) -> list[tuple[str, nn.Module, object]]:
    """(name, module, rule) for every module the recipe quantizes, in model order."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Embedding) and not any(
                True for _ in mod.children())):
            rule = recipe.rule_for(name)
            if rule is None:
                continue
            if isinstance(mod, nn.Embedding) and "embed" not in rule.targets:
                continue  # embeddings only when a rule names them explicitly
            out.append((name, mod, rule))
    return out


def quantize(model: nn.Module, recipe: Recipe | str, *, progress: bool = True) -> QuantizeReport:
    """Quantize `model` in place by `recipe` (data-free methods). Calibrated methods go through
    lowbit.calibration; asking for one here without calibration data is an error."""
    recipe = get_recipe(recipe)
    targets = quantize_targets(model, recipe)
    if not targets:
        raise LowbitError(f"recipe {recipe.name!r}: matched no module of this model")
    calibrated = sorted({r.method for _, _, r in targets if get_method(r.method).needs})
    if calibrated:
        raise LowbitError(f"recipe {recipe.name!r}: method(s) {calibrated} need calibration data; "
                          "use lowbit.calibration.quantize_calibrated (or `lowbit quantize`)")
    report = QuantizeReport(recipe)
    t0 = time.perf_counter()
    it = targets
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(targets, desc=f"quantize {recipe.name}", unit="layer")
    with torch.no_grad():
        for name, mod, rule in it:
            spec = get_method(rule.method)
            qw = spec.fn(mod.weight, rule.scheme, spec.make_config(rule.method_args), None)
            report.layers.append(layer_row(name, qw, rule.method))
            if isinstance(mod, nn.Linear):
                set_submodule(model, name, QuantLinear.from_linear(mod, qw))
            else:  # embedding: a lookup table, stored quantized, served dequantized
                mod.weight.data = qw.dequantize(mod.weight.dtype)
    report.seconds = time.perf_counter() - t0
    if report.ragged:
        r = report.ragged[0]
        report.notes.append(f"{len(report.ragged)} layer(s) end each row in a shorter group "
                            f"(e.g. {r['name']}: in_features {r['shape'][1]}, last group {r['ragged_last_group']})")
    return report


def layer_row(name: str, qw, method: str) -> dict:
    return {"name": name, "shape": list(qw.shape), "scheme": qw.scheme.short_name(), "method": method,
            "bits_per_weight": round(qw.bits_per_weight, 4), "ragged_last_group": qw.ragged_last_group,
            **{k: v for k, v in qw.info.items() if isinstance(v, (int, float, str))}}
