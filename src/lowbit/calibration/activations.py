"""Input-activation quantization of a quantized model: attach the recipe's ActSchemes, calibrate.

    quantize_activations(model, report, ...)   after the weights are quantized (api.quantize):
        every QuantLinear whose rule has input_activations gets an ActQuant (nn/actquant.py)
        static schemes / LLM.int8(): one pass of the calibration batches through the model with
        activation quantization off (float inputs, quantized weights: observe, then convert,
        as torch.ao's static flow does): per layer, a range observer (numerics/ranges.py:
        minmax | percentile | mse | kl) over all its input values -> the per-tensor scale;
        LLM.int8() layers count the input columns that held an outlier (|x| > threshold) in
        any calibration batch
        every input seen is checked: NaN/inf is refused, naming the layer

The pass runs the decoder stack (model.base_model), not lm_head: its logits would be the largest
tensor of the pass and lm_head is not quantized by the activation recipes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.nn.actquant import ActQuant
from lowbit.nn.qlinear import QuantLinear
from lowbit.numerics.activation import ActScheme, check_act, outlier_columns, static_scale
from lowbit.numerics.ranges import make_observer


def attach(model: nn.Module, recipe) -> dict[str, QuantLinear]:
    """ActQuant on every QuantLinear whose rule asks for input_activations; name -> module."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        rule = recipe.rule_for(name)
        if rule is None or rule.input_activations is None:
            continue
        mod.act_quant = ActQuant(ActScheme.from_dict(rule.input_activations))
        out[name] = mod
    return out


def needs_calibration(layers: dict[str, QuantLinear]) -> bool:
    return any(not m.act_quant.scheme.dynamic or m.act_quant.scheme.outlier_threshold is not None
               for m in layers.values())


class LayerObserver:
    """One layer's calibration: a forward pre-hook observing its inputs (activation quantization
    off meanwhile), then result() sets its static scale / outlier counts and turns it back on."""

    def __init__(self, name: str, mod: QuantLinear, calibrator_options: dict | None = None):
        self.name, self.mod = name, mod
        s = self.scheme = mod.act_quant.scheme
        mod.act_quant.enabled = False
        self.observer = None if s.dynamic else make_observer(
            s.range_scheme(), s.calibrator, **(calibrator_options or {}) if s.calibrator != "minmax" else {})
        self.hits = None

    def hook(self, _m, args) -> None:
        x = args[0].detach()
        check_act(x, self.name)
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.observer is not None:
            self.observer.update(x2.reshape(1, -1))
        if self.scheme.outlier_threshold is not None:
            c = outlier_columns(x2, self.scheme.outlier_threshold).to(torch.int64)
            self.hits = c if self.hits is None else self.hits + c

    def result(self) -> dict:
        mod, row = self.mod, {}
        mod.act_quant.enabled = True
        if self.observer is not None:
            if self.observer.n_updates == 0:
                raise LowbitError(f"{self.name}: no calibration input reached this layer; its static "
                                  "input scale cannot be calibrated")
            lo, hi = self.observer.compute()
            mod.act_quant.scale = static_scale(lo, hi, mod.act_quant.scheme)
            row["input_scale"] = float(mod.act_quant.scale)
        if self.hits is not None:
            mod.act_quant.outlier_hits = self.hits
            row["outlier_columns"] = int((self.hits > 0).sum())
        return row


def calibrate(model: nn.Module, layers: dict[str, QuantLinear], tokens: torch.Tensor, batch_size: int,
              calibrator_options: dict | None = None) -> dict[str, dict]:
    """Static scales and outlier counts from `tokens` (n, seq). Returns name -> info row."""
    obs = {name: LayerObserver(name, mod, calibrator_options) for name, mod in layers.items()}
    handles = [mod.register_forward_pre_hook(obs[name].hook) for name, mod in layers.items()]
    root = model.base_model if hasattr(model, "base_model") else model
    if any(n.endswith("lm_head") for n in layers):
        root = model
    from lowbit.calibration.capture import forward_batches
    try:
        forward_batches(root, tokens, batch_size, handles)
    finally:
        for mod in layers.values():
            mod.act_quant.enabled = True
    return {name: o.result() for name, o in obs.items()}


def activation_row(mod: QuantLinear, row: dict) -> dict:
    """The report's row for one layer's input activations."""
    return {"input_activations": mod.act_quant.scheme.short_name(),
            "input_scheme": mod.act_quant.scheme.to_dict(), **row}


def quantize_activations(model: nn.Module, recipe, tokens_fn, batch_size: int = 8) -> dict[str, dict]:
    """attach + (when a scheme needs it) calibrate; tokens_fn() gives the calibration tokens.
    Returns name -> {"input_activations": short name, "input_scale"?, "outlier_columns"?}."""
    layers = attach(model, recipe)
    if not layers:
        return {}
    info = {n: {} for n in layers}
    if needs_calibration(layers):
        info = calibrate(model, layers, tokens_fn(), batch_size)
    return {n: activation_row(m, info[n]) for n, m in layers.items()}
