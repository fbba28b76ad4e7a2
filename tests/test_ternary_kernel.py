"""The 2-bit ternary kernel (nn/kernels.TernaryKernel, t2x64 codes) that BitNet b1.58 layers run on.

It rounds x per token to int8 in C++ (s = max|x| / 127, q = round-half-even(x / s), as
numerics/activation.quantize_act) and sums codes x q exactly in int32, so it must equal the
reference F.linear(fake_quant_act(x), W) up to the reference's own fp32 summation: the same
2e-6 x sum_k |x_hat_k| |W_nk| bound tests/test_kernels.py uses. A single code rounded differently
would cost s * |W| (about 1% of max|x| times a weight), far outside it. Every ISA variant this
CPU runs is tested (LOWBIT_ISA=<variant> keeps one).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.nn import ext, kernels
from lowbit.nn.actquant import ActQuant
from lowbit.nn.packed import pack_t2x64_u8, unpack_t2x64_u8
from lowbit.nn.prepare import PackedLinear
from lowbit.numerics.activation import ActScheme, fake_quant_act
from lowbit.numerics.qweight import quantize_weight
from lowbit.numerics.scheme import Scheme

TOKEN = ActScheme(format="int8", dynamic=True, granularity="token")
TERNARY = Scheme(bits=2, format="ternary", granularity="tensor")


@pytest.fixture(params=ext.ISAS)
def isa(request):
    """Each ISA variant this machine runs (skipped with the reason elsewhere)."""
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    forced = os.environ.get("LOWBIT_ISA", "").strip().lower()
    if forced not in ("", "auto") and forced != request.param:
        pytest.skip(f"LOWBIT_ISA={forced} keeps only that variant")
    why = ext.isa_status()[request.param]
    if why != "ready":
        pytest.skip(f"ISA variant {request.param}: {why}")
    with ext.use_isa(request.param):
        yield request.param


def bound(xh: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return 2e-6 * (xh.abs() @ w.abs().t()) + 1e-30


def ternary_layer(n: int, k: int, scheme: Scheme = TERNARY, seed: int = 0, bias: bool = False) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(n, k, generator=g) * 0.05, scheme)
    b = torch.randn(n, generator=g) if bias else None
    return PackedLinear(qw, b, "auto", "t", act_quant=ActQuant(TOKEN))


def test_pack_t2x64_roundtrip_and_layout():
    g = torch.Generator().manual_seed(1)
    c = torch.randint(0, 3, (5, 100), generator=g, dtype=torch.uint8)
    p = pack_t2x64_u8(c)
    assert p.shape == (5, 32)                                   # 100 -> 128 columns, 4 per byte
    assert torch.equal(unpack_t2x64_u8(p, 100), c)
    # byte j of run r: columns 64r + j, +16, +32, +48 in bits 1-0, 3-2, 5-4, 7-6; padding is code 1
    assert int(p[2, 3]) == int(c[2, 3]) | int(c[2, 19]) << 2 | int(c[2, 35]) << 4 | int(c[2, 51]) << 6
    assert int(p[2, 16 + 3]) == int(c[2, 67]) | int(c[2, 83]) << 2 | 1 << 4 | 1 << 6
    with pytest.raises(LowbitError, match="0, 1 or 2"):
        pack_t2x64_u8(torch.full((2, 64), 3, dtype=torch.uint8))


@pytest.mark.parametrize("shape,scheme", [((1536, 576), TERNARY), ((576, 1536), TERNARY), ((37, 100), TERNARY),
                                          ((40, 640), Scheme(bits=2, format="ternary", granularity="channel")),
                                          ((48, 320), Scheme(bits=2, format="ternary", granularity="group",
                                                             group_size=128))])
def test_ternary_kernel_equals_exact_math_on_token_rounded_input(isa, shape, scheme):
    """M = 1..9 takes the 4-token tiles and every remainder; 100 / 320 / 640 columns the padding
    to 64 and a short last group."""
    n, k = shape
    lin = ternary_layer(n, k, scheme)
    assert isinstance(lin.packed, kernels.TernaryKernel)
    assert lin.packed.codes.numel() == n * (-(-k // 64) * 16)             # 2 bits per weight
    w = lin.qweight.dequantize()
    g = torch.Generator().manual_seed(2)
    for m in (1, 2, 3, 4, 5, 9):
        x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 3   # uneven columns
        xh = fake_quant_act(x, TOKEN)
        err = (lin(x) - F.linear(xh, w)).abs()
        assert bool((err <= bound(xh, w)).all()), f"{isa} m={m}: max err/bound {float((err / bound(xh, w)).max()):.3g}"


def test_ternary_kernel_bias_leading_dims_zero_token_and_nan(isa):
    lin = ternary_layer(70, 192, bias=True)
    w = lin.qweight.dequantize()
    x = torch.randn(2, 3, 192)
    x[1, 2] = 0.0                                          # an all-zero token: scale 1, output = bias
    y = lin(x)
    xh = fake_quant_act(x, TOKEN)
    ref = F.linear(xh, w, lin.bias)
    assert y.shape == (2, 3, 70)
    assert bool(((y - ref).abs() <= bound(xh.reshape(-1, 192), w).reshape(2, 3, 70) + 1e-6 * ref.abs()).all())
    assert torch.equal(y[1, 2], lin.bias.float())
    for bad in (float("nan"), float("inf")):
        xb = torch.randn(3, 192)
        xb[1, 7] = bad
        yb = lin(xb)
        assert not bool(yb[1].isfinite().any()) and bool(yb[[0, 2]].isfinite().all())


def test_other_activation_schemes_and_dtypes_take_the_float_path():
    """The kernel only rounds like BitNet's int8 per token: another act_quant, a disabled one, or a
    bf16 input runs the layer's own rounding (in torch) and a float product, never silently BitNet's."""
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    lin = ternary_layer(64, 128, seed=3)
    w = lin.qweight.dequantize()
    x = torch.randn(2, 128)
    per_tensor = ActScheme(format="int8", dynamic=True, granularity="tensor")
    lin.act_quant = ActQuant(per_tensor)
    xh = fake_quant_act(x, per_tensor)
    assert bool(((lin(x) - F.linear(xh, w)).abs() <= bound(xh, w)).all())
    lin.act_quant = ActQuant(TOKEN)
    lin.act_quant.enabled = False                        # calibration observing float inputs
    assert bool(((lin(x) - F.linear(x, w)).abs() <= bound(x, w)).all())
    lin.act_quant.enabled = True
    xb = x.bfloat16()
    yb = lin(xb)
    assert yb.dtype == torch.bfloat16
    xh = fake_quant_act(xb, TOKEN).float()                 # bf16's own rounding, as QuantLinear's
    ref = F.linear(xh, w)
    # W and y rounded to bf16 (2^-9 relative each), the sum in fp32
    assert bool(((yb.float() - ref).abs() <= (xh.abs() @ w.abs().t()) * 2.0 ** -8 + bound(xh, w)).all())


def test_kernel_choice_follows_the_activation_scheme():
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    qw = quantize_weight(torch.randn(32, 128) * 0.05, TERNARY)
    assert type(PackedLinear(qw).packed) is kernels.ExtKernel                        # float inputs
    assert type(PackedLinear(qw, act_quant=ActQuant(ActScheme(granularity="tensor"))).packed) is kernels.ExtKernel
    late = PackedLinear(qw)                          # the native reader attaches act_quant afterwards
    late.act_quant = ActQuant(TOKEN)
    assert isinstance(late.packed, kernels.TernaryKernel)
    assert torch.equal(late.qdata, qw.qdata)
    kernels.TERNARY_T2 = False
    try:
        assert type(PackedLinear(qw, act_quant=ActQuant(TOKEN)).packed) is kernels.ExtKernel
    finally:
        kernels.TERNARY_T2 = True
    int4 = quantize_weight(torch.randn(32, 128), Scheme(bits=4, granularity="group", group_size=64))
    assert type(PackedLinear(int4, act_quant=ActQuant(TOKEN)).packed) is kernels.ExtKernel
