"""Preset families with activations or transforms, registered as recipe.PRESET_RESOLVERS:

    w{bits}[g{group}][-sym]-awq[-noclip][-gsearch][-rtn|-gptq][-actorder[-static]][-mse]
        AWQ scales + clipping (transforms/awq.py) on every block, then RTN (default) or GPTQ:
        w4g128-awq, w3g128-awq, w4g128-awq-gptq; -noclip: the scales only, no clipping search
        (it measures RTN's error, not what GPTQ does after it); -gsearch: the scale search
        measures GPTQ's error instead of RTN's (n_grid 10: one GPTQ solve per grid point)
    w{8|4}a{8|16}[-fp8][-smooth[ALPHA]][-static[-minmax|-percentile|-mse|-kl]][-rtn|-gptq]
        W8A8: int8 weights per output channel (symmetric) and int8 inputs per token, dynamic;
        -static: one per-tensor input scale per layer from a range calibrator (minmax default);
        -fp8: fp8 e4m3 weights per channel and fp8 inputs; -smooth: SmoothQuant first (alpha 0.5
        or e.g. -smooth0.8); W4A8: 4-bit g128 weights; W8A16: int8 weights, float inputs.
        e.g. w8a8, w8a8-static-kl, w8a8-smooth, w8a8-fp8, w4a8-gptq, w8a16
    llm-int8[-t{THRESHOLD}]
        LLM.int8(): int8 weights per row, int8 inputs per token, input columns with |x| > 6.0
        (or THRESHOLD) kept in fp16
"""
from __future__ import annotations

import re

from lowbit.numerics.scheme import Scheme, int_scheme
from lowbit.recipe import PRESET_RESOLVERS, Recipe, Rule, grammar_recipe

_AWQ = re.compile(r"^(?P<w>w[2-8](?:g\d+)?(?:-sym)?)-awq(?P<noclip>-noclip)?(?P<gsearch>-gsearch)?(?:-(?P<method>rtn|gptq))?"
                  r"(?P<rest>(?:-actorder(?:-static)?)?(?:-mse)?)$")
_WA = re.compile(r"^w(?P<wb>[48])a(?P<ab>8|16)(?P<fp8>-fp8)?(?P<smooth>-smooth(?P<alpha>0?\.\d+|1\.0)?)?"
                 r"(?P<static>-static(?:-(?P<calib>minmax|percentile|mse|kl))?)?(?:-(?P<method>rtn|gptq))?$")
_LLM_INT8 = re.compile(r"^llm-int8(?:-t(?P<t>\d+(?:\.\d+)?))?$")


def awq_recipe(name: str) -> Recipe | None:
    m = _AWQ.match(name)
    if not m:
        return None
    base = grammar_recipe(f"{m['w']}-{m['method'] or 'rtn'}{m['rest']}")
    spec: dict = {"name": "awq"}
    if m["noclip"]:
        spec["clip"] = False
    if m["gsearch"]:
        spec.update(search="gptq", n_grid=10)
    what = ("AWQ scales" + (" searched on GPTQ's error" if m["gsearch"] else "")
            + (", no clipping" if m["noclip"] else " and clipping"))
    return Recipe(name=name, rules=base.rules, transforms=[spec],
                  description=f"{what} (arXiv:2306.00978), then " + base.description)


def wa_recipe(name: str) -> Recipe | None:
    m = _WA.match(name)
    if not m:
        return None
    fp8 = bool(m["fp8"])
    if fp8 and m["wb"] == "4":
        return None
    if fp8:
        w = Scheme(format="fp8_e4m3", granularity="channel", axis=0)
    elif m["wb"] == "8":
        w = int_scheme(8, None, symmetric=True)
    else:
        w = int_scheme(4, 128)
    act = None
    if m["ab"] == "8":
        act = {"format": "fp8_e4m3" if fp8 else "int8", "dynamic": not m["static"],
               "granularity": "tensor" if m["static"] else "token", "calibrator": m["calib"] or "minmax"}
    elif m["static"] or m["smooth"]:
        return None                                   # A16: nothing to calibrate or smooth for
    transforms = [{"name": "smoothquant", "alpha": float(m["alpha"] or 0.5)}] if m["smooth"] else []
    desc = (f"weights {w.short_name()} ({m['method'] or 'rtn'}), inputs "
            + ("float" if act is None else f"{act['format']} {'per token, dynamic' if act['dynamic'] else 'per tensor, static (' + act['calibrator'] + ')'}")
            + (f"; SmoothQuant alpha {transforms[0]['alpha']:g} first" if transforms else "")
            + "; lm_head and embeddings stay in float")
    return Recipe(name=name, rules=[Rule(r".*", w, m["method"] or "rtn", {}, act)], transforms=transforms,
                  description=desc)


def llm_int8_recipe(name: str) -> Recipe | None:
    m = _LLM_INT8.match(name)
    if not m:
        return None
    t = float(m["t"] or 6.0)
    act = {"format": "int8", "dynamic": True, "granularity": "token", "outlier_threshold": t}
    return Recipe(name=name, rules=[Rule(r".*", int_scheme(8, None, symmetric=True), "rtn", {}, act)],
                  description=f"LLM.int8() (arXiv:2208.07339): int8 weights per row, int8 inputs per token, "
                              f"input columns with |x| > {t:g} in fp16; lm_head stays in float")


for _r in (awq_recipe, wa_recipe, llm_int8_recipe):
    if _r not in PRESET_RESOLVERS:
        PRESET_RESOLVERS.append(_r)
