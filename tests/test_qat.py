"""QAT: the fake-quant STE / LSQ gradients on tiny tensors, exact reproduction of PTQ codes at step
0 for every int / codebook scheme (act-order g_idx included), freeze back to QuantizedWeights, and
on the real bundled model: prepare -> a few KD steps -> freeze -> export -> reload."""
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods.qat import (check_reproduces, codes_of, fake_quantize_weight, freeze, latent_from_qweight,
                                unit_range)
from lowbit.numerics.qweight import QuantizedWeight, quantize_weight
from lowbit.numerics.scheme import Scheme, int_scheme

SCHEMES = [int_scheme(4, 128), int_scheme(3, 128), int_scheme(4, 32, symmetric=True), int_scheme(2, 64),
           int_scheme(4, None), Scheme(format="nf4", group_size=64), Scheme(format="fp4", group_size=32),
           Scheme(format="ternary", group_size=64), Scheme(format="fp8_e4m3", granularity="channel"),
           int_scheme(3, 48)]          # 200 columns: a ragged last group


def _w(rows=24, cols=200):
    return torch.randn(rows, cols) * 0.05


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name())
def test_step0_reproduces_rtn_codes_exactly(scheme):
    qw = quantize_weight(_w(), scheme)
    lat = latent_from_qweight(qw)
    check_reproduces(qw, lat)                               # raises on any differing code
    assert torch.equal(codes_of(lat), qw.qdata)
    w_hat = fake_quantize_weight(lat.weight, lat.scale, lat.zero, scheme, lat.g_idx)
    assert torch.equal(w_hat, qw.dequantize())


def test_step0_reproduces_gptq_style_codes_with_g_idx():
    """Codes that are not RTN of any float weight (as GPTQ leaves them) and an act-order g_idx."""
    scheme = int_scheme(3, 32)
    w = _w(16, 128)
    perm = torch.randperm(128)
    g_idx = (torch.arange(128) // 32)[torch.argsort(perm)].int()
    qw0 = quantize_weight(w, scheme)
    codes = torch.randint(0, 8, qw0.qdata.shape, dtype=torch.uint8)
    qw = QuantizedWeight(codes, qw0.scale, qw0.zero_point, scheme, g_idx=g_idx)
    lat = latent_from_qweight(qw)
    check_reproduces(qw, lat)
    assert torch.equal(freeze(lat, lat.weight, lat.scale).qdata, codes)


def test_wrong_start_refused():
    scheme = int_scheme(4, 128)
    qw = quantize_weight(_w(), scheme)
    lat = latent_from_qweight(qw)
    lat.weight += 0.6 * expand(qw.scale, scheme, lat.weight.shape)   # > half a step: codes move
    with pytest.raises(LowbitError, match=r"qat w: the latent weight re-encodes to \d+ code"):
        check_reproduces(qw, lat, "w")


def expand(scale, scheme, shape):
    from lowbit.numerics.affine import expand_qparams
    return expand_qparams(scale, tuple(shape), scheme)


def test_ste_gradient_passes_inside_range_and_stops_outside():
    scheme = int_scheme(4, 8)
    scale = torch.full((1, 1), 0.1)
    zero = torch.full((1, 1), 8.0)
    # u = w / s + z: inside [0, 15] for the first five, clipped for the last three
    w = torch.tensor([[0.0, 0.23, -0.41, 0.69, -0.8, 0.9, -1.2, 3.0]], requires_grad=True)
    s = scale.clone().requires_grad_(True)
    y = fake_quantize_weight(w, s, zero, scheme)
    g = torch.arange(1.0, 9.0)[None]
    y.backward(g)
    inside = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(w.grad, g * inside)
    # LSQ: d y / d s = (round(u) - u) inside the range, the clipped code (qmax - z / qmin - z) outside
    u = w.detach() / 0.1
    v = torch.clamp(torch.round(u + 8), 0, 15) - 8
    expect = (g * torch.where(inside.bool(), v - u, v)).sum()
    assert float(s.grad) == pytest.approx(float(expect), rel=1e-5)
    assert torch.equal(y.detach(), v * 0.1)


def test_lsq_scale_gradient_matches_the_lsq_formula_for_nf4():
    """Where no value crosses a rounding boundary, y(s) = V * s is linear in s: autograd == slope."""
    scheme = Scheme(format="nf4", group_size=16)
    w = torch.randn(2, 16) * 0.1
    s = w.abs().reshape(2, 1, 16).amax(-1) * 1.3              # absmax inside the range
    s.requires_grad_(True)
    y = fake_quantize_weight(w, s, None, scheme)
    y.sum().backward()
    # V stays fixed for a tiny change of s (no code changes) except through the -u term
    lo, hi = unit_range(scheme, None)
    assert (lo, hi) == (-1.0, 1.0)
    v = y.detach() / s.detach().repeat_interleave(16, -1)
    u = w / s.detach().repeat_interleave(16, -1)
    assert torch.allclose(s.grad, (v - u).reshape(2, 1, 16).sum(-1), atol=1e-5)


def test_freeze_after_moving_latent_gives_new_codes_and_scale():
    scheme = int_scheme(4, 128)
    qw = quantize_weight(_w(), scheme)
    lat = latent_from_qweight(qw)
    w2 = lat.weight + expand(qw.scale, scheme, lat.weight.shape) * torch.where(torch.rand_like(lat.weight) < 0.1, 1.0, 0.0)
    out = freeze(lat, w2, lat.scale * 1.01)
    assert isinstance(out, QuantizedWeight) and out.scheme == scheme
    assert 0 < int((out.qdata != qw.qdata).sum()) <= int(0.2 * qw.qdata.numel())
    assert lat.fp16_scales is False or torch.equal(out.scale, out.scale.half().float())
    assert torch.allclose(out.scale, qw.scale * 1.01, rtol=1e-3)
    with pytest.raises(LowbitError, match="NaN/inf"):
        freeze(lat, w2 * float("nan"), lat.scale)


def test_unsupported_scheme_named():
    from lowbit.methods.qat import check_scheme
    with pytest.raises(LowbitError, match="'q4_k' has no fake-quant path"):
        check_scheme(Scheme(format="q4_k"), "model.layers.0.mlp.up_proj")
    with pytest.raises(LowbitError, match="float cast"):
        check_scheme(Scheme(format="bf16"))


def test_config_refuses_eval_text_and_bad_options():
    from lowbit.train.qat import QATConfig
    with pytest.raises(LowbitError, match="wiki-evaluation"):
        QATConfig(text="wiki-evaluation").check()
    with pytest.raises(LowbitError, match="QATConfig.loss"):
        QATConfig(loss="mse").check()
    with pytest.raises(LowbitError, match="QATConfig.scale_lr"):
        QATConfig(scale_lr=-1.0).check()
    with pytest.raises(LowbitError, match="TrainConfig.steps"):
        QATConfig(steps=0).check()
    with pytest.raises(LowbitError, match="QATConfig.optimizer"):
        QATConfig(optimizer="sgd").check()


@pytest.mark.slow
def test_qat_on_bundled_model_trains_freezes_and_exports(tmp_path):
    """RTN w4g128 -> 3 KD steps (lr large enough to flip codes) -> QuantLinear again -> native
    export -> lowbit.load gives the same logits; the teacher is the float model."""
    import lowbit.api as api
    from lowbit.nn.qlinear import QuantLinear
    from lowbit.data.text import load_text, token_windows, tokenize_text
    from lowbit.train.qat import QATConfig, QATLinear, codes_match, prepare_qat, run_qat

    teacher = api.load("smollm2-135m")
    lm = api.load("smollm2-135m")
    report = api.quantize(lm.model, "w4g128-rtn", progress=False)
    before = {n: qw.qdata.clone() for n, qw in report.qweights.items()}
    # the first 4 windows of wiki-calibration (a slice of it tokenized: the whole text costs seconds)
    ids = token_windows(tokenize_text(lm.tokenizer, load_text("wiki-calibration")[:4000]), 32, max_windows=4)
    assert ids.shape == (4, 32)
    with torch.no_grad():
        logits_ptq = lm.model(input_ids=ids[:1]).logits

    # step 0: the QAT model is the PTQ model, logits and all
    prepare_qat(lm.model, report, learn_scales=True)
    assert codes_match(lm.model, report)
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids[:1]).logits, logits_ptq)
    from lowbit.train.qat import freeze_qat
    freeze_qat(lm.model, report)                              # back, unchanged, then train for real

    cfg = QATConfig(steps=3, lr=3e-3, scale_lr=1e-4, batch_size=2, seq_len=32, loss="kd")
    res = run_qat(lm.model, report, lm.tokenizer, cfg, teacher=teacher.model, windows=ids)
    assert len(res.train.losses) == 3 and all(torch.isfinite(torch.tensor(res.train.losses)))
    assert not any(isinstance(m, QATLinear) for m in lm.model.modules())
    assert sum(isinstance(m, QuantLinear) for m in lm.model.modules()) == len(report.qweights)
    assert 0 < res.freeze["codes_changed"] < 0.5
    assert any(not torch.equal(before[n], qw.qdata) for n, qw in report.qweights.items())
    assert all(r["method"] == "rtn+qat" for r in report.layers)

    out = api.export(lm, report, tmp_path / "qat-native")
    back = api.load(out)
    with torch.no_grad():
        a = lm.model(input_ids=ids[:1]).logits
        b = back.model(input_ids=ids[:1]).logits
    # freeze rounds the trained scales to fp16, the numbers the native file stores: same weights,
    # so the logits agree to float summation order (the reloaded model may run another kernel)
    assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))
    assert float((a - logits_ptq).abs().max()) > 100 * float((a - b).abs().max())
