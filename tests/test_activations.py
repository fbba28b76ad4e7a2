"""Activation quantization: the number formats (bounds from their grids), LLM.int8()'s
decomposition, static calibration and the W8A8 integer kernel on the real bundled model (a
2-block slice), NaN/inf refused with the layer named."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from lowbit import api
from lowbit.calibration.activations import calibrate
from lowbit.errors import LowbitError
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn import ext
from lowbit.nn.w8a8 import W8A8Kernel, backend, eligible, has_int_mm, int_mm_status, prepare_w8a8
from lowbit.numerics.activation import ActScheme, act_scale, fake_quant_act, llm_int8_act
from lowbit.recipe import Recipe, Rule, get_recipe


def test_int8_per_token_error_is_within_half_a_step():
    x = torch.randn(16, 300) * torch.logspace(-2, 2, 16)[:, None]        # rows of very different size
    s = ActScheme()
    err = (fake_quant_act(x, s) - x).abs()
    step = act_scale(x, s)                                              # absmax / 127 per row
    assert step.shape == (16, 1)
    assert bool((err <= step / 2 * (1 + 1e-6)).all())


def test_fp8_dynamic_relative_error_is_e4m3s():
    x = torch.randn(8, 256)
    s = ActScheme(format="fp8_e4m3")
    y = fake_quant_act(x, s)
    scale = act_scale(x, s)
    normal = (x / scale).abs() >= 2.0 ** -6                             # e4m3's smallest normal
    rel = ((y - x).abs() / x.abs())[normal]
    assert float(rel.max()) <= 2.0 ** -4 * (1 + 1e-6)                   # 3 mantissa bits: half ulp


def test_llm_int8_keeps_outlier_columns_in_fp16():
    x = torch.randn(4, 64)
    x[2, 5] = 40.0
    x[0, 17] = -7.5
    s = ActScheme(outlier_threshold=6.0)
    y, cols = llm_int8_act(x, s)
    assert cols.nonzero().flatten().tolist() == [5, 17]
    assert torch.equal(y[:, cols], x[:, cols].half().float())
    inl = x.clone()
    inl[:, cols] = 0
    assert torch.equal(y[:, ~cols], fake_quant_act(inl, ActScheme())[:, ~cols])
    # without the decomposition the 40.0 stretches row 2's scale: that row's inliers lose
    plain = fake_quant_act(x, ActScheme())
    assert float((plain[2, ~cols] - x[2, ~cols]).abs().max()) > float((y[2, ~cols] - x[2, ~cols]).abs().max())


def test_bad_activation_schemes_are_refused():
    with pytest.raises(LowbitError, match="static"):
        ActScheme(dynamic=False, granularity="token")
    with pytest.raises(LowbitError, match="calibrator"):
        ActScheme(dynamic=False, granularity="tensor", calibrator="median")
    with pytest.raises(LowbitError, match="format"):
        ActScheme(format="int4")
    with pytest.raises(LowbitError, match="LLM.int8"):
        ActScheme(format="fp8_e4m3", outlier_threshold=6.0)
    with pytest.raises(LowbitError, match="unknown keys"):
        Rule(".*", None, input_activations={"bits": 8})


def _slice(name: str) -> Recipe:
    """The preset restricted to blocks 0-1 (the loop and calibration stop there)."""
    base = get_recipe(name)
    return Recipe(name, [Rule(r"model\.layers\.[01]\.", r.scheme, r.method, r.method_args, r.input_activations)
                         for r in base.rules], transforms=base.transforms, calibration=base.calibration)


CALIB = {"n_samples": 4, "seq_len": 128, "batch_size": 2}
pytestmark_model = pytest.mark.model


@pytest.fixture(scope="module")
def static_slice(smollm2):
    m = copy.deepcopy(smollm2.model)
    rep = api.quantize(m, _slice("w8a8-static-percentile"), tokenizer=smollm2.tokenizer, calibration=CALIB,
                       progress=False)
    return m, rep


@pytest.mark.model
def test_static_scales_calibrated_per_layer(static_slice, smollm2):
    m, rep = static_slice
    assert len(rep.activations) == 14
    q = m.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.act_quant.scale is not None and float(q.act_quant.scale) > 0
    row = next(r for r in rep.layers if r["name"] == "model.layers.1.mlp.down_proj")
    assert row["input_activations"] == "a8-static-percentile" and row["input_scale"] == float(q.act_quant.scale)
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = m(ids).logits
    assert bool(torch.isfinite(out).all())


@pytest.mark.model
def test_nan_activations_in_calibration_name_the_layer(static_slice, smollm2):
    m, _ = static_slice
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    norm = m.model.layers[1].post_attention_layernorm
    h = norm.register_forward_hook(lambda _m, _a, out: out.masked_fill(torch.zeros_like(out, dtype=torch.bool)
                                                                        .index_fill_(-1, torch.tensor([3]), True),
                                                                        float("nan")))
    tokens = torch.randint(0, 1000, (2, 16))
    try:
        with pytest.raises(LowbitError, match=r"model\.layers\.1\.mlp\.gate_proj.*NaN"):
            calibrate(m, layers, tokens, 2)
    finally:
        h.remove()


@pytest.mark.model
def test_nan_in_transform_statistics_names_the_layer(smollm2):
    m = copy.deepcopy(smollm2.model)
    norm = m.model.layers[0].input_layernorm
    norm.register_forward_hook(lambda _m, _a, out: out * float("inf"))
    with pytest.raises(LowbitError, match=r"input_layernorm -> self_attn.q_proj.*NaN/inf"):
        api.quantize(m, _slice("w8a8-smooth"), tokens=torch.randint(0, 1000, (2, 16)), progress=False)


@pytest.mark.model
def test_int_mm_probe_refuses_an_inexact_int8_gemm():
    """W8A8 uses torch._int_mm only where it is exact. Held to AVX2 (no VNNI), oneDNN's int8 GEMM
    adds u8 x s8 pairs in int16 with saturation: there the probe must say so. prepare_w8a8 then
    attaches our C++ op (exact on every ISA) where it builds, else nothing, so a W8A8 model's
    logits are the float reference path's within the fp32 bound (the kernel) or exactly (none)."""
    import subprocess
    import sys
    code = ("import torch, sys; sys.path.insert(0, 'tests'); from test_activations import _slice\n"
            "from lowbit import api; from lowbit.models import load_model\n"
            "from lowbit.nn.w8a8 import backend, int_mm_status, prepare_w8a8\n"
            "m = load_model('smollm2-135m').model; api.quantize(m, _slice('w8a8'), progress=False)\n"
            "ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))\n"
            "with torch.no_grad(): ref = m(ids).logits\n"
            "n = prepare_w8a8(m)\n"
            "with torch.no_grad(): got = m(ids).logits\n"
            "print(int_mm_status()); print(backend(), n, float((got - ref).abs().max()), float(ref.abs().max()))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-2000:]
    status, last = res.stdout.strip().splitlines()[-2:]
    kind, n, err, scale = last.split()
    assert status == "exact" or "not exact on this CPU" in status or "unavailable" in status, status
    if kind == "None":
        assert status != "exact" and int(n) == 0 and float(err) == 0.0, (status, last)   # reference path
    else:
        assert kind == "ext" or status == "exact", (status, last)
        # per layer the kernel is within the fp32 bound (test below); through the slice's blocks an
        # input code that the reference's float sum puts on the other side of a rounding tie moves
        # by one step (1/127 of its token's range) and carries on: 1% of the logits' range, well
        # inside W8A8's own error against fp32
        assert int(n) == 14 and float(err) <= 1e-2 * float(scale), (status, last)


def _w8a8_emulated(x, codes, w_scale, bias, zero, mode, x_scale):
    """What w8a8_linear must return, in torch: W8A8Kernel's float ops around an exact int64 sum."""
    k = x.shape[1]
    if mode == 2:
        s = torch.tensor(x_scale, dtype=torch.float32)
    else:
        a = x.abs().amax(dim=-1, keepdim=True) if mode == 0 else x.abs().amax()
        s = torch.where(a > 0, a / 127.0, torch.ones_like(a))
    xq = torch.round(x / s).clamp_(-128, 127)
    y = (xq.long() @ (codes[:, :k].long() - zero).t()).float().mul_(s * w_scale.reshape(1, -1))
    return y if bias is None else y.add_(bias)


@pytest.mark.parametrize("isa", ext.ISAS)
def test_w8a8_op_is_bit_exact_on_every_isa(isa):
    """lowbit_cpu.w8a8_linear gives the bits of the int64 emulation on each ISA variant: tokens
    and shapes that hit every tile and tail (M 1..33, K not a multiple of 64, N not of 4), codes at
    0 and 255 against inputs at -128 and 127, exact rounding ties, all three modes, with and without
    bias."""
    if not ext.load():
        pytest.skip(f"lowbit C++ kernels unavailable: {ext.status()}")
    st = ext.isa_status()[isa]
    if st != "ready":
        pytest.skip(f"{isa}: {st}")
    op = torch.ops.lowbit_cpu.w8a8_linear
    g = torch.Generator().manual_seed(0)
    with ext.use_isa(isa):
        for m, k, n in ((1, 576, 1536), (2, 100, 37), (5, 1536, 67), (33, 192, 20), (4, 64, 9), (17, 130, 5)):
            x = torch.randn(m, k, generator=g) * 3
            x[0, :4] = torch.tensor([2.5, -2.5, 0.5, -1.5]) * (x[0].abs().max() / 127)   # ties (up to the division)
            x[-1, 0] = -x[-1].abs().max() * 1.001          # a -128 under a static scale below
            kp = -(-k // 64) * 64
            codes = torch.randint(0, 256, (n, kp), generator=g, dtype=torch.uint8)
            codes[:, :3], codes[:, 3:6] = 255, 0
            ws, b = torch.rand(n, generator=g) * 0.02, torch.randn(n, generator=g)
            xs = float(x.abs().max()) / 127 * 0.999
            for mode in (0, 1, 2):
                for bias in (None, b):
                    got = op(x, codes, ws, bias, 128, mode, xs)
                    want = _w8a8_emulated(x, codes, ws, bias, 128, mode, xs)
                    assert torch.equal(got, want), (isa, m, k, n, mode, float((got - want).abs().max()))


def test_w8a8_op_turns_nan_and_inf_tokens_into_nan_rows():
    if not ext.load():
        pytest.skip(f"lowbit C++ kernels unavailable: {ext.status()}")
    op = torch.ops.lowbit_cpu.w8a8_linear
    x = torch.randn(4, 128)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    codes = torch.randint(0, 256, (8, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ws = torch.ones(8)
    assert op(x, codes, ws, None, 128, 0, 1.0).isnan().all(1).tolist() == [False, True, True, False]
    assert op(x, codes, ws, None, 128, 1, 1.0).isnan().all().item()             # one scale for all
    y = op(x, codes, ws, None, 128, 2, 0.05)                                      # static: inf clamps
    assert y.isnan().all(1).tolist() == [False, True, False, False] and bool(torch.isfinite(y[2]).all())
    with pytest.raises(RuntimeError, match="multiple of 64"):
        op(x, codes[:, :100].contiguous(), ws, None, 128, 0, 1.0)
    with pytest.raises(RuntimeError, match="static input scale"):
        op(x, codes, ws, None, 128, 2, float("nan"))


@pytest.mark.model
@pytest.mark.skipif(backend() is None, reason=int_mm_status())
def test_w8a8_integer_kernel_matches_the_reference_path(smollm2):
    m = copy.deepcopy(smollm2.model)
    api.quantize(m, _slice("w8a8"), progress=False)
    q = m.model.layers[0].mlp.down_proj
    assert eligible(q)
    x = torch.randn(2, 7, q.in_features) * 3
    with torch.no_grad():
        ref = q(x)                                   # fake-quantized input, dequantized weight
        got = W8A8Kernel(q)(x, q)
    # the int32 sum is exact; the reference's fp32 sum of the same integer products is exact
    # below 2^24 and within K ulps beyond: bound |diff| by K * eps32 * sum |s_x s_w x_q w_q|
    xs = q.act_quant.scheme
    s_x = act_scale(x, xs)
    xq = torch.round(x / s_x)
    wq = q.qdata.float() - 128
    bound = q.in_features * 2.0 ** -24 * ((xq.abs() * s_x) @ (wq.abs() * q.scale).t())
    assert bool(((got - ref).abs() <= bound + 1e-6).all())
    if backend() == "ext" and has_int_mm():        # our op and torch._int_mm: the same bits
        assert torch.equal(got, W8A8Kernel(q, "int_mm")(x, q))
    assert prepare_w8a8(m) == 14
    with torch.no_grad():
        assert bool(torch.isfinite(m(torch.randint(0, 1000, (1, 8))).logits).all())


@pytest.mark.model
def test_prepare_for_inference_puts_w8a8_layers_on_the_int8_kernel(smollm2):
    """What `lowbit generate` / `lowbit eval` run: prepare_for_inference gives W8A8 layers the int8
    kernel (they keep their u8 codes, no packed copy), and the logits stay the reference path's
    within the whole-slice bound of the probe test above."""
    if not ext.load():
        pytest.skip(f"lowbit C++ kernels unavailable: {ext.status()}")
    from lowbit.nn.prepare import prepare_for_inference
    m = copy.deepcopy(smollm2.model)
    api.quantize(m, _slice("w8a8"), progress=False)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
    rep = prepare_for_inference(m)
    assert rep["backends"] == {"w8a8": 14}
    q = m.model.layers[0].mlp.down_proj
    assert isinstance(q.kernel, W8A8Kernel) and q.kernel.backend == "ext"
    assert q.kernel.codes.data_ptr() == q.qdata.data_ptr()        # K = 1536: the codes themselves
    with torch.no_grad():
        got = m(ids).logits
    assert float((got - ref).abs().max()) <= 1e-2 * float(ref.abs().max())


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_reference_rounding_never_turns_nan_or_inf_into_finite_codes(fmt):
    """The float reference path (ActQuant on an unprepared model) and the C++ op agree on broken
    inputs: NaN/inf tokens give NaN rows per token, every row per tensor; static clamps inf."""
    x = torch.randn(4, 128)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    tok = fake_quant_act(x, ActScheme(format=fmt))
    assert tok.isnan().all(1).tolist() == [False, True, True, False] and bool(torch.isfinite(tok[[0, 3]]).all())
    assert fake_quant_act(x, ActScheme(format=fmt, granularity="tensor")).isnan().all()
    st = fake_quant_act(x, ActScheme(format=fmt, dynamic=False, granularity="tensor"), torch.tensor(0.05))
    assert st.isnan().all(1).tolist() == [False, True, False, False] and bool(torch.isfinite(st[2]).all())
    if fmt == "int8" and ext.load():               # the op's convention (test above), row for row
        y = torch.ops.lowbit_cpu.w8a8_linear(x, torch.full((8, 128), 129, dtype=torch.uint8), torch.ones(8),
                                             None, 128, 0, 1.0)
        assert y.isnan().all(1).tolist() == tok.isnan().all(1).tolist()


@pytest.mark.model
def test_llm_int8_runs_on_the_int8_op_with_fp16_outlier_columns(smollm2):
    """LLM.int8() on our op: inlier columns through the int8 kernel, outlier columns (|x| > 6 in
    some token) through an fp32 matmul of their fp16 inputs; the reference path's function up to
    float summation order, bounded as in the W8A8 test by K u sum |x_hat| |W|; outliers counted
    as the reference counts them."""
    if not ext.load():
        pytest.skip(f"lowbit C++ kernels unavailable: {ext.status()}")
    m = copy.deepcopy(smollm2.model)
    tokens = torch.randint(100, 20000, (2, 64), generator=torch.Generator().manual_seed(0))
    api.quantize(m, _slice("llm-int8"), tokens=tokens, progress=False)    # (it counts outliers)
    q = m.model.layers[0].mlp.down_proj
    assert eligible(q) and not eligible(q, "int_mm")
    x = torch.randn(2, 7, q.in_features, generator=torch.Generator().manual_seed(2)) * 3
    x[..., :4] = 0.0                                  # some rows without outliers in those columns
    x_hat, cols = llm_int8_act(x, q.act_quant.scheme)
    assert 0 < int(cols.sum()) < q.in_features
    with torch.no_grad():
        ref = q(x)
        k = W8A8Kernel(q)
        q.act_quant.count_outliers, q.act_quant.outlier_hits = True, None
        got = k(x, q)
        q.act_quant.count_outliers = False
    assert torch.equal(q.act_quant.outlier_hits, cols.to(torch.int64))
    w = q.dequantize_weight()
    bound = q.in_features * 2.0 ** -24 * (x_hat.abs() @ w.abs().t())
    assert bool(((got - ref).abs() <= bound + 1e-6).all())
    small = torch.randn(3, q.in_features) * 0.5        # no outliers: the plain int8 op
    with torch.no_grad():
        plain = torch.ops.lowbit_cpu.w8a8_linear(small, k.codes, k.w_scale_1d, k.bias, k.zero, 0, 1.0)
        assert torch.equal(k(small, q), plain)
    with pytest.raises(LowbitError, match="LLM.int8"):
        W8A8Kernel(q, "int_mm")
