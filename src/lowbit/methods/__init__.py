"""Quantization methods: one file per algorithm, each a config dataclass plus a pure function.

A method registers itself with `register_method`:

    @register_method("rtn", RTNConfig)                         # data-free
    def rtn(weight, scheme, config, stats=None) -> QuantizedWeight

    @register_method("gptq", GPTQConfig, needs=("hessian",))    # calibrated
    def gptq(weight, scheme, config, stats) -> QuantizedWeight

`needs` names the per-linear statistics the calibration loop must collect for it (e.g. "hessian"
= sum of x x^T over calibration tokens, "act_sq_mean" = mean x^2 per input column for imatrix /
AWQ). Data-free methods need none. The function is pure tensor math: no hooks, files or devices.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    fn: Callable
    needs: tuple[str, ...] = ()

    def make_config(self, args: dict | None):
        args = dict(args or {})
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = set(args) - names
        if unknown:
            raise LowbitError(f"method {self.name!r}: unknown option(s) {sorted(unknown)}; "
                              f"expected some of {sorted(names)}")
        return self.config_cls(**args)


_METHODS: dict[str, MethodSpec] = {}
# modules that define methods; imported on first lookup
METHOD_MODULES = ["lowbit.methods.rtn", "lowbit.methods.gptq", "lowbit.methods.ggml", "lowbit.methods.signround",
                  "lowbit.methods.vq"]


def register_method(name: str, config_cls: type, needs: tuple[str, ...] = ()) -> Callable:
    def deco(fn: Callable) -> Callable:
        _METHODS[name] = MethodSpec(name, config_cls, fn, tuple(needs))
        return fn
    return deco


def get_method(name: str) -> MethodSpec:
    for mod in METHOD_MODULES:
        importlib.import_module(mod)
    try:
        return _METHODS[name]
    except KeyError:
        raise LowbitError(f"method {name!r}: unknown; available: {sorted(_METHODS)}") from None
