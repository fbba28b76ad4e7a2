"""Sensitivity (lowbit.budget): byte accounting equals the format's tensors, the GPTQ error estimate
tracks real GPTQ, the Fisher-weighted proxy ranks like the measured single-module KL, the table is
cached atomically and reused, and bad input is refused."""
from __future__ import annotations

import pytest
import torch

from lowbit.budget.measure import rank_correlation
from lowbit.errors import LowbitError


def _real_layer(smollm2, name="model.layers.3.self_attn.k_proj"):
    """A real weight and the Hessian of real inputs to it (2 windows of 64 tokens)."""
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.calibration.stats import StatSet
    mod = smollm2.model.get_submodule(name)
    toks = calibration_tokens(smollm2.tokenizer, CalibrationConfig(n_samples=2, seq_len=64))
    ss = StatSet({"hessian"}, mod.weight.shape[1])
    h = mod.register_forward_pre_hook(lambda _m, a: ss.update(a[0]))
    with torch.no_grad():
        smollm2.model(input_ids=toks, use_cache=False)
    h.remove()
    return mod.weight.detach().float(), ss.results()["hessian"].float()


@pytest.mark.model
def test_gptq_bytes_and_estimate(smollm2):
    from lowbit.budget.gptq_estimate import estimated_row_loss, inverse_diag
    from lowbit.budget.sensitivity import _bytes_like_gptq, candidate_rule
    from lowbit.budget.sizing import layer_bytes
    from lowbit.methods import get_method
    W, H = _real_layer(smollm2)
    gptq = get_method("gptq")
    real_tot, est_tot = [], []
    for cand in ("w3g64-gptq-actorder-mse", "w4-gptq-actorder-mse", "w2g32-gptq", "w4g128-gptq-actorder-static"):
        rule = candidate_rule(cand)
        qw = gptq.fn(W, rule.scheme, gptq.make_config(rule.method_args), {"hessian": H})
        # bytes without running GPTQ == bytes of the tensors the native format writes for GPTQ's output
        assert _bytes_like_gptq("native", "x", W, rule) == layer_bytes("native", "x", qw)
        dW = W - qw.dequantize(torch.float32)
        real = ((dW @ (H / 2)) * dW).sum(1).double()
        d, perm = inverse_diag(H, bool(rule.method_args.get("act_order")))
        est = estimated_row_loss(W, d, perm, rule.scheme)
        rows = [{"real": float(a), "est": float(b)} for a, b in zip(real, est)]
        assert rank_correlation(rows, "est", "real") > 0.6, cand    # rows ranked alike
        real_tot.append(float(real.sum()))
        est_tot.append(float(est.sum()))
    # across schemes the estimate orders the total error as GPTQ does
    assert sorted(range(4), key=real_tot.__getitem__) == sorted(range(4), key=est_tot.__getitem__)


@pytest.mark.model
@pytest.mark.slow
def test_sensitivity_ranks_like_measured_kl_and_caches(smollm2, tmp_path):
    from lowbit.budget import Sensitivity, load_or_compute, parse_budget, solve
    from lowbit.budget.measure import measure_pairs
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    toks = calibration_tokens(smollm2.tokenizer, CalibrationConfig(n_samples=2, seq_len=64))
    before = {k: v.clone() for k, v in list(smollm2.model.state_dict().items())[:5]}
    cands = ["w3g64-rtn", "w4g64-rtn", "w8-rtn"]
    sens = load_or_compute(smollm2.model, toks, candidates=cands, fisher_samples=2, cache_root=tmp_path,
                           source_dir=smollm2.path)
    assert all(torch.equal(v, smollm2.model.state_dict()[k]) for k, v in before.items())   # untouched
    assert len(sens.modules) == 30 * 7 and sens.candidates == cands
    for c, b in zip(sens.cost, sens.nbytes):
        assert c[0] > c[1] > c[2] > 0 and b[0] < b[1] < b[2]     # fewer bits: more loss, fewer bytes
    files = list((tmp_path / "sensitivity").glob("*.json"))
    assert len(files) == 1 and not list((tmp_path / "sensitivity").glob(".*"))
    again = load_or_compute(smollm2.model, toks, candidates=cands, fisher_samples=2, cache_root=tmp_path)
    assert again.meta.get("cached") and again.cost == sens.cost
    assert Sensitivity.load(files[0]).nbytes == sens.nbytes

    # the proxy against the measured KL with only that module quantized: 3-bit RTN of one module
    # in each of 8 places (different blocks and roles: sensitivities spread over decades)
    names = [m["name"] for m in sens.modules]
    pairs = [(names[i], "w3g64-rtn") for i in (0, 3, 6, 33, 67, 100, 150, 209)]
    rows = measure_pairs(smollm2.model, toks, pairs, kl_windows=2, sens=sens)
    assert all(r["measured_kl"] > 0 for r in rows)
    assert rank_correlation(rows, "predicted_kl") > 0.7

    plan = solve(sens, parse_budget("4.5bpw"))
    assert plan.bits_per_weight <= 4.5 and set(plan.choice) == set(names)


def test_bad_input():
    from lowbit.budget.sensitivity import candidate_rule
    from lowbit.budget.sizing import check_format
    with pytest.raises(LowbitError, match="not a preset-grammar name"):
        candidate_rule("q4_k_m")
    with pytest.raises(LowbitError, match="no byte accounting"):
        check_format("onnx")
