"""The measured cost of a (module, candidate): the model's KL to the original on calibration text
when only that module is quantized, and how well the proxies of sensitivity.py rank against it.

    rows = measure_pairs(model, tokens, pairs, kl_windows=4)      # one KL pass per pair
    rank_correlation(rows, "predicted_kl")                        # Spearman's rho

Each measurement is one forward over the KL windows, so a full table (every module x candidate)
costs modules x candidates forwards: measure a sample (`sample_pairs`) to validate the proxy, and
let the solver run on the proxy.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn

from lowbit.arch import linear_weight
from lowbit.errors import LowbitError


def sample_pairs(sens, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (module, candidate) pairs spread over modules and candidates (seeded)."""
    rng = random.Random(seed)
    pairs = [(m["name"], c) for m in sens.modules for c in sens.candidates]
    rng.shuffle(pairs)
    return sorted(pairs[:n])


def _hessians(model: nn.Module, tokens: torch.Tensor, names: list[str], batch_size: int) -> dict:
    from lowbit.calibration.stats import StatSet
    sets = {n: StatSet({"hessian"}, linear_weight(model.get_submodule(n)).shape[1]) for n in names}
    from lowbit.calibration.capture import forward_batches
    hs = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, _s=sets[n]: _s.update(a[0])) for n in names]
    forward_batches(model, tokens, batch_size, hs)
    return {n: s.results()["hessian"].float() for n, s in sets.items()}


def measure_pairs(model: nn.Module, tokens: torch.Tensor, pairs: list[tuple[str, str]], *, kl_windows: int = 4,
                  batch_size: int = 8, sens=None, progress: bool = False, log=None) -> list[dict]:
    """KL (nats/token, eval.kl's statistic) of `model` with only `module` quantized by `candidate`,
    against `model` itself, on the first kl_windows windows of `tokens`; the module's weights are
    restored after each pair. With `sens`, each row also carries the proxies for the same pair."""
    from lowbit.budget.sensitivity import candidate_rule
    from lowbit.eval.kl import kl_divergence, reference_logprobs
    from lowbit.methods import get_method
    if not pairs:
        raise LowbitError("measure: no (module, candidate) pairs given")
    names = sorted({m for m, _ in pairs})
    hess = _hessians(model, tokens, names, batch_size)
    windows = tokens[:kl_windows]
    ref = reference_logprobs(model, windows, cache=False, progress=progress)
    index = {m["name"]: i for i, m in enumerate(sens.modules)} if sens is not None else {}
    rows = []
    for name, cand in pairs:
        mod = model.get_submodule(name)
        rule = candidate_rule(cand)
        spec = get_method(rule.method)
        w0 = mod.weight
        qw = spec.fn(linear_weight(mod).detach().float(), rule.scheme, spec.make_config(rule.method_args),
                     {"hessian": hess[name]} if spec.needs else None)
        try:
            mod.weight = nn.Parameter(qw.dequantize(w0.dtype), requires_grad=False)
            kl = kl_divergence(model, ref, progress=progress)
        finally:
            mod.weight = w0
        row = {"module": name, "candidate": cand, "measured_kl": kl.mean, "measured_kl_stderr": kl.mean_stderr,
               "tokens": kl.tokens}
        if name in index:
            i, c = index[name], sens.candidates.index(cand)
            row.update(predicted_kl=sens.cost[i][c], output_error=sens.output_error[i][c], bytes=sens.nbytes[i][c])
        rows.append(row)
        if log:
            log(f"{name} {cand}: KL {kl.mean:.3g}" + (f" (predicted {row['predicted_kl']:.3g})" if "predicted_kl" in row else ""))
    return rows


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (so Spearman's rho is Pearson's r of the ranks)."""
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=x.dtype)
    for v in torch.unique(x):
        m = x == v
        if int(m.sum()) > 1:
            r[m] = r[m].mean()
    return r


def rank_correlation(rows: list[dict], key: str, against: str = "measured_kl") -> float:
    """Spearman's rho between rows[key] and rows[against]."""
    pts = [(r[key], r[against]) for r in rows if r.get(key) is not None and r.get(against) is not None]
    if len(pts) < 3:
        raise LowbitError(f"rank correlation of {key!r}: need at least 3 rows with both values, got {len(pts)}")
    a = _ranks(torch.tensor([p[0] for p in pts], dtype=torch.float64))
    b = _ranks(torch.tensor([p[1] for p in pts], dtype=torch.float64))
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 0.0
