"""Choosing the precision for the user: per-module sensitivity, a solver under a size budget, and
the plain Recipe it emits.

    sens = sensitivity(model, tokens)                    # proxy KL per (module, candidate scheme)
    plan = solve(sens, parse_budget("3.5bpw"))           # one candidate per module, within budget
    recipe = plan.recipe()                               # a plain, editable Recipe (JSON)
    api.quantize(model, recipe, tokens=tokens)           # as any other recipe

sensitivity.py   the cost model: one pass of sampled-label gradients (the Fisher of the model's
                 own output distribution) and one float block pass for the Hessians, then every
                 candidate's weight error, weighted by both: predicted KL to the original
measure.py       the measured cost: KL to the original with only one module quantized, and the
                 rank correlation of the proxy against it
sizing.py        bytes each candidate takes in the output file, from the format's own tensors
solver.py        budgets (bytes, bits per weight), the multiple-choice knapsack, the Recipe
"""
from lowbit.budget.sensitivity import (DEFAULT_CANDIDATES, Sensitivity, load_or_compute,  # noqa: F401
                                       sensitivity)
from lowbit.budget.solver import Budget, Plan, parse_budget, solve  # noqa: F401
