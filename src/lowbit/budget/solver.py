"""The solver: one candidate scheme per module, minimising the predicted KL (sensitivity.py) under
a budget in bits per weight or bytes, and the plain Recipe that says so.

Budgets:
    "3.5bpw"            file bytes of the quantized linears * 8 / their weight count <= 3.5
    "90MB" / "85MiB"    the whole output (tensors, model files, headers) <= that many bytes

The predicted loss is additive over modules (each module's KL when it alone is quantized; the
cross terms are ignored, measure.py checks the sum on real mixes). Minimising a sum of per-module
costs under one byte constraint with one choice per module is the multiple-choice knapsack; it is
solved the classic way: each module's options reduced to their lower convex hull in (bytes, cost),
upgrades taken greedily by cost saved per byte (the LP relaxation's order, optimal up to one
item per module; Sinha & Zoltners 1979), then any leftover bytes filled by the best single
upgrade that still fits.

Constraints: `tie=True` makes every shared-input group (q/k/v, gate/up: sensitivity's `group`) one
unit with one scheme, for formats whose kernels fuse them (vLLM's QKV / gate-up merged layers).
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field

from lowbit.errors import LowbitError

TIED_FORMATS = ("gptq", "awq", "compressed-tensors")


@dataclass(frozen=True)
class Budget:
    kind: str          # "bpw" | "bytes"
    value: float
    text: str

    def linear_bytes_limit(self, weights: int, fixed_total: int) -> float:
        if self.kind == "bpw":
            return self.value * weights / 8
        return self.value - fixed_total


def parse_budget(s: str) -> Budget:
    """'3.5bpw' | '90MB' | '85MiB' | '1.2GB' | '123456' (bytes)."""
    from lowbit.export.common import parse_size
    text = str(s).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*bpw", text, re.I)
    if m:
        v = float(m[1])
        if not 1.0 <= v <= 32.0:
            raise LowbitError(f"--budget {text!r}: bits per weight must be in [1, 32]")
        return Budget("bpw", v, text)
    try:
        n = parse_size(text)
    except LowbitError:
        n = None
    if not n or n <= 0:
        raise LowbitError(f"--budget {text!r}: expected bits per weight (3.5bpw) or a size (90MB, 85MiB, 1.2GB)")
    return Budget("bytes", float(n), text)


@dataclass
class Plan:
    budget: Budget
    choice: dict[str, str]          # module name -> candidate name
    predicted_kl: float
    linear_bytes: int
    weights: int
    fixed: dict
    candidates_used: dict[str, int] = field(default_factory=dict)
    tie: bool = False
    calibration: dict = field(default_factory=dict)
    module_kl: dict[str, float] = field(default_factory=dict)    # predicted KL of each module's choice

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.linear_bytes / self.weights

    @property
    def total_bytes(self) -> int:
        return self.linear_bytes + self.fixed["total"]

    def to_dict(self) -> dict:
        return {"budget": self.budget.text, "budget_kind": self.budget.kind, "budget_value": self.budget.value,
                "predicted_kl": self.predicted_kl, "linear_bytes": self.linear_bytes, "weights": self.weights,
                "bits_per_weight": self.bits_per_weight, "predicted_total_bytes": self.total_bytes,
                "fixed": dict(self.fixed), "tie_shared_inputs": self.tie, "candidates_used": dict(self.candidates_used),
                "choice": dict(self.choice), "predicted_kl_per_module": dict(self.module_kl)}

    def recipe(self, name: str | None = None):
        """A plain Recipe: one rule per (candidate, module suffix), naming the blocks it covers."""
        from lowbit.budget.sensitivity import candidate_rule
        from lowbit.recipe import Recipe, Rule
        buckets: dict[tuple[str, str, str], list[str]] = {}
        singles: list[tuple[str, str]] = []
        for mod, cand in self.choice.items():
            m = re.fullmatch(r"(.*\.)(\d+)(\..+)", mod)
            if m:
                buckets.setdefault((cand, m[1], m[3]), []).append(m[2])
            else:
                singles.append((cand, mod))
        rules = []
        for (cand, pre, suf), idx in sorted(buckets.items()):
            r = candidate_rule(cand)
            alts = "|".join(sorted(idx, key=int))
            rules.append(Rule(f"^{re.escape(pre)}(?:{alts}){re.escape(suf)}$", r.scheme, r.method, dict(r.method_args)))
        for cand, mod in sorted(singles):
            r = candidate_rule(cand)
            rules.append(Rule(f"^{re.escape(mod)}$", r.scheme, r.method, dict(r.method_args)))
        ggml = any(candidate_rule(c).method == "ggml" for c in self.candidates_used)
        if ggml:       # GGUF: the output and the token embedding in HEAD_TYPE, as the sizing counts them
            from lowbit.budget.sizing import HEAD_TYPE
            from lowbit.presets.gguf_mixes import EMBED, HEAD, ggml_scheme
            rules.append(Rule(HEAD, ggml_scheme(HEAD_TYPE), "ggml"))
            # an untied embedding too (tied, it is the output and takes HEAD's rule); without this
            # rule it was written F16, bigger than the plan's bytes (2x Q6_K's on Qwen2.5-1.5B)
            rules.append(Rule(EMBED, ggml_scheme(HEAD_TYPE), "ggml"))
        desc = (f"budget {self.budget.text}: {len(self.choice)} modules, {self.bits_per_weight:.3f} bits per weight "
                f"(file bytes of the quantized linears), predicted KL {self.predicted_kl:.4f} nats/token; "
                f"schemes: {', '.join(f'{k} x{v}' for k, v in sorted(self.candidates_used.items()))}"
                + ("; lm_head / token embedding " + HEAD_TYPE.upper() + " as in llama.cpp's K mixes" if ggml else ""))
        extra = {"ignore": []} if ggml else {}     # GGUF quantizes the output too (bind_to_model ties it)
        return Recipe(name=name or f"budget-{self.budget.text}", rules=rules, description=desc,
                      calibration=dict(self.calibration), **extra)


def _hull(opts: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """(bytes, cost, candidate index) -> the lower convex hull, bytes increasing, cost decreasing."""
    opts = sorted(opts, key=lambda o: (o[0], o[1]))
    front = []
    for o in opts:                               # drop dominated options (more bytes, no less cost)
        if not front or o[1] < front[-1][1]:
            if front and o[0] == front[-1][0]:
                front[-1] = o
            else:
                front.append(o)
    hull: list[tuple[int, float, int]] = []
    for o in front:
        while len(hull) >= 2:
            (b1, c1, _), (b2, c2, _) = hull[-2], hull[-1]
            # drop hull[-1] if it lies on or above the segment hull[-2] -> o
            if (c2 - c1) * (o[0] - b1) >= (o[1] - c1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def solve(sens, budget: Budget, *, tie: bool = False, candidates: list[str] | None = None,
          calibration: dict | None = None) -> Plan:
    """The plan of least predicted KL within `budget` (module docstring). candidates: restrict to
    these names (default: every candidate the sensitivity table has)."""
    allowed = [i for i, c in enumerate(sens.candidates) if candidates is None or c in candidates]
    if not allowed:
        raise LowbitError(f"budget: none of the candidates {candidates} is in the sensitivity table "
                          f"({sens.candidates})")
    units: dict[int, list[int]] = {}
    for i, m in enumerate(sens.modules):
        units.setdefault(m["group"] if tie else i, []).append(i)
    unit_list = list(units.values())
    options = []
    for members in unit_list:
        opts = [(sum(sens.nbytes[i][c] for i in members), sum(sens.cost[i][c] for i in members), c) for c in allowed]
        options.append(opts)
    hulls = [_hull(o) for o in options]
    weights = sens.weights()
    limit = budget.linear_bytes_limit(weights, sens.fixed["total"])
    pos = [0] * len(hulls)
    used = sum(h[0][0] for h in hulls)
    if used > limit:
        smallest = used if budget.kind == "bytes" else used
        need = (f"{8 * smallest / weights:.3f}bpw" if budget.kind == "bpw"
                else f"{(smallest + sens.fixed['total']) / 1e6:.2f} MB")
        raise LowbitError(f"--budget {budget.text}: below the smallest plan the candidates allow ({need}); "
                          f"candidates: {[sens.candidates[c] for c in allowed]}")
    heap = []

    def push(u: int) -> None:
        k = pos[u]
        if k + 1 < len(hulls[u]):
            (b0, c0, _), (b1, c1, _) = hulls[u][k], hulls[u][k + 1]
            heapq.heappush(heap, (-(c0 - c1) / (b1 - b0), u))
    for u in range(len(hulls)):
        push(u)
    while heap:
        _, u = heapq.heappop(heap)
        k = pos[u]
        extra = hulls[u][k + 1][0] - hulls[u][k][0]
        if used + extra <= limit:
            used += extra
            pos[u] = k + 1
            push(u)
    chosen = [hulls[u][pos[u]] for u in range(len(hulls))]
    while True:                                   # leftover bytes: the best single upgrade that fits
        best = None
        for u, opts in enumerate(options):
            b0, c0, _ = chosen[u]
            for o in opts:
                if o[1] < c0 and used - b0 + o[0] <= limit and (best is None or c0 - o[1] > best[0]):
                    best = (c0 - o[1], u, o)
        if best is None:
            break
        _, u, o = best
        used += o[0] - chosen[u][0]
        chosen[u] = o
    choice: dict[str, str] = {}
    counts: dict[str, int] = {}
    for members, (_, _, c) in zip(unit_list, chosen):
        for i in members:
            choice[sens.modules[i]["name"]] = sens.candidates[c]
            counts[sens.candidates[c]] = counts.get(sens.candidates[c], 0) + 1
    order = {m["name"]: i for i, m in enumerate(sens.modules)}
    choice = dict(sorted(choice.items(), key=lambda kv: order[kv[0]]))
    kl = sum(o[1] for o in chosen)
    index = {c: i for i, c in enumerate(sens.candidates)}
    module_kl = {n: sens.cost[order[n]][index[c]] for n, c in choice.items()}
    return Plan(budget, choice, float(kl), int(used), weights, dict(sens.fixed), counts, tie,
                dict(calibration or {}), module_kl)
