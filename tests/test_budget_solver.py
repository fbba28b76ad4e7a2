"""The budget solver (lowbit.budget.solver): budgets parse, plans stay within them, the greedy
knapsack matches exhaustive search on small tables, ties hold, and the emitted Recipe selects
exactly the chosen scheme for every module."""
from __future__ import annotations

import itertools
import random

import pytest

from lowbit.budget import Sensitivity, parse_budget, solve
from lowbit.budget.sensitivity import candidate_rule
from lowbit.errors import LowbitError
from lowbit.recipe import Recipe

CANDS = ["w2g64-gptq-actorder-mse", "w3g128-gptq-actorder-mse", "w4g128-gptq-actorder-mse", "w8-rtn"]
BITS = {c: b for c, b in zip(CANDS, (2.3, 3.2, 4.2, 8.0))}


def table(n_blocks: int, seed: int, rows: int = 64, cols: int = 64) -> Sensitivity:
    """A cost table shaped like a real one: bytes from bits/weight, cost falling ~4x per bit with a
    per-module sensitivity spread over two decades."""
    rng = random.Random(seed)
    mods, cost, nbytes = [], [], []
    parts = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
    for b in range(n_blocks):
        for k, p in enumerate(parts):
            mods.append({"name": f"model.layers.{b}.{p}", "shape": [rows, cols], "group": 2 * b + (k == 2)})
            s = 10 ** rng.uniform(-2, 0)
            cost.append([s * 4.0 ** (-BITS[c]) * rng.uniform(0.8, 1.25) for c in CANDS])
            nbytes.append([int(rows * cols * BITS[c] / 8) for c in CANDS])
    fixed = {"tensor_bytes": 1000, "model_files_bytes": 0, "overhead_bytes": 0, "total": 1000}
    return Sensitivity(mods, list(CANDS), cost, [list(c) for c in cost], nbytes, fixed)


def brute_force(sens: Sensitivity, limit: float, units: list[list[int]]) -> float:
    best = float("inf")
    for pick in itertools.product(range(len(sens.candidates)), repeat=len(units)):
        b = sum(sens.nbytes[i][c] for u, c in zip(units, pick) for i in u)
        if b <= limit:
            best = min(best, sum(sens.cost[i][c] for u, c in zip(units, pick) for i in u))
    return best


def test_parse_budget():
    assert parse_budget("3.5bpw").kind == "bpw" and parse_budget("3.5bpw").value == 3.5
    assert parse_budget("90MB").value == 90e6
    assert parse_budget("85MiB").value == 85 * 2**20
    for bad in ("fast", "0.5bpw", "-3MB", ""):
        with pytest.raises(LowbitError, match="budget"):
            parse_budget(bad)


@pytest.mark.parametrize("bpw", [2.5, 3.0, 3.5, 4.0, 4.5, 6.0])
def test_within_budget_and_near_optimal(bpw):
    sens = table(2, seed=int(bpw * 10))          # 6 modules, 4 candidates: 4096 plans
    plan = solve(sens, parse_budget(f"{bpw}bpw"))
    limit = bpw * sens.weights() / 8
    assert plan.linear_bytes <= limit
    assert plan.linear_bytes == sum(sens.nbytes[i][sens.candidates.index(plan.choice[m["name"]])]
                                    for i, m in enumerate(sens.modules))
    best = brute_force(sens, limit, [[i] for i in range(len(sens.modules))])
    # greedy on convex hulls + fill: optimal up to about one module's step (the LP bound's gap)
    step = max(max(c) - min(c) for c in sens.cost)
    assert best <= plan.predicted_kl <= best + step
    assert plan.predicted_kl == pytest.approx(sum(sens.cost[i][sens.candidates.index(plan.choice[m["name"]])]
                                                  for i, m in enumerate(sens.modules)), rel=1e-12)


def test_more_budget_never_costs_more():
    sens = table(6, seed=3)
    kls = [solve(sens, parse_budget(f"{b}bpw")).predicted_kl for b in (2.4, 3.0, 3.5, 4.0, 5.0, 8.0)]
    assert all(a >= b for a, b in zip(kls, kls[1:]))
    assert kls[-1] == pytest.approx(sum(min(c) for c in sens.cost))   # 8 bpw affords the best of all


def test_tied_groups_share_a_scheme():
    sens = table(2, seed=7)
    plan = solve(sens, parse_budget("3.3bpw"), tie=True)
    for g in {m["group"] for m in sens.modules}:
        assert len({plan.choice[m["name"]] for m in sens.modules if m["group"] == g}) == 1
    units: dict[int, list[int]] = {}
    for i, m in enumerate(sens.modules):
        units.setdefault(m["group"], []).append(i)
    best = brute_force(sens, 3.3 * sens.weights() / 8, list(units.values()))
    assert plan.predicted_kl >= best - 1e-15
    assert plan.linear_bytes <= 3.3 * sens.weights() / 8


def test_byte_budget_counts_the_fixed_part():
    sens = table(2, seed=1)
    lin = sum(min(b) for b in sens.nbytes)
    plan = solve(sens, parse_budget(str(lin + sens.fixed["total"])))
    assert plan.total_bytes <= lin + sens.fixed["total"]
    with pytest.raises(LowbitError, match="below the smallest plan"):
        solve(sens, parse_budget(str(lin + sens.fixed["total"] - 1)))


def test_recipe_selects_the_choice_and_round_trips():
    sens = table(3, seed=5)
    plan = solve(sens, parse_budget("3.6bpw"))
    recipe = Recipe.from_dict(plan.recipe().to_dict())      # through JSON's dict form
    for name, cand in plan.choice.items():
        rule = recipe.rule_for(name)
        want = candidate_rule(cand)
        assert (rule.scheme, rule.method, rule.method_args) == (want.scheme, want.method, want.method_args)
    assert recipe.rule_for("lm_head") is None
    assert recipe.rule_for("model.layers.30.self_attn.q_proj") is None    # not in the table: float
    assert "3.6bpw" in recipe.description


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_plan_stores_the_embedding_as_the_sizing_counts_it(tied):
    """A GGUF plan's recipe, bound to a model, gives the token embedding HEAD_TYPE whether or not
    it is tied to the output: the type the sizing (budget.sizing._gguf_fixed_bytes) counts for every
    2-D tensor outside the plan. An untied embedding used to be written F16, past the budget."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.budget.sizing import HEAD_TYPE
    from lowbit.export.gguf.writer import tensor_type
    from lowbit.presets.gguf_mixes import bind_to_model
    cands = ["gguf-q4_k", "gguf-q8_0"]
    mods = [{"name": f"model.layers.0.{p}", "shape": [256, 256], "group": i}
            for i, p in enumerate(("self_attn.q_proj", "mlp.down_proj"))]
    sens = Sensitivity(mods, cands, [[0.1, 0.01], [0.2, 0.02]], [[0.1, 0.01], [0.2, 0.02]],
                       [[256 * 144, 256 * 272]] * 2, {"tensor_bytes": 0, "model_files_bytes": 0,
                                                      "overhead_bytes": 0, "total": 0}, fmt="gguf")
    plan = solve(sens, parse_budget("6bpw"))
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    recipe = bind_to_model(plan.recipe(), model)
    assert tensor_type(recipe, "model.embed_tokens.weight", (512, 256), tied) == (HEAD_TYPE.upper(),) * 2
    if not tied:
        assert tensor_type(recipe, "lm_head.weight", (512, 256), tied) == (HEAD_TYPE.upper(),) * 2
