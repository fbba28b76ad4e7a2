"""CPU kernels on packed weights vs QuantLinear's dequantize-then-matmul reference.

Tolerance: `ext` and `torch` (fp32 activations) differ from the reference only in the order of the fp32 sums,
so we allow a max abs error of 2e-6 x (sum_k |x_k| |W_nk|) per output (a bound on fp32 dot-product
rounding for these lengths), and `tiled` (reference decode per tile + F.linear) the same.
bf16 activations: the kernels compute in fp32 and round once, so the bound is bf16's half-ulp
of the fp32 result plus the same dot bound.

`ext` runs once per ISA variant of nn/ext this machine can execute (ext-avx512vnni, ext-avx512,
ext-avx2, ext-portable; the others skip saying what the CPU lacks); LOWBIT_ISA=<variant> keeps
only that one (to test as an AVX2-only box would), LOWBIT_EXT=0 skips them all.
int8 activations (act="int8"): the kernel rounds x per 32-column block to int8 (d = max|x|/127,
q = round-half-even(x / d)) and then computes exactly with the rounded x, so we compare with
F.linear(x_rounded, W) under the fp32 dot bound taken over the magnitudes of the terms it sums,
|scale| * (code + |zero|) (plus 256 for the byte codes' signed bias), not |W|.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.nn import ext, kernels
from lowbit.nn.kernels import make_kernel
from lowbit.nn.packed import pack_q4x32_u8, to_group_form, unpack_q4x32_u8
from lowbit.nn.prepare import PackedLinear, prepare_for_inference
from lowbit.nn.qlinear import QuantLinear
from lowbit.numerics.scheme import Scheme, int_scheme
from lowbit.numerics.qweight import QuantizedWeight, quantize_weight

EXT_VARIANTS = [f"ext-{v}" for v in ext.ISAS]
BACKENDS = EXT_VARIANTS + ["torch", "tiled"]


@pytest.fixture
def backend(request):
    """'ext-<isa>' -> 'ext' with that ISA variant active (skipped with the reason where this
    machine can't run it); other backends pass through."""
    name = request.param
    if not name.startswith("ext-"):
        yield name
        return
    isa = name[4:]
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    forced = os.environ.get("LOWBIT_ISA", "").strip().lower()
    if forced not in ("", "auto") and forced != isa:
        pytest.skip(f"LOWBIT_ISA={forced} keeps only that variant")
    why = ext.isa_status()[isa]
    if why != "ready":
        pytest.skip(f"ISA variant {isa}: {why}")
    with ext.use_isa(isa):
        yield "ext"
SCHEMES = {
    "w4g128a": int_scheme(4, 128),           # the default preset; 576 columns -> last group of 64
    "w4g32s": int_scheme(4, 32, symmetric=True),
    "w4ca": int_scheme(4, None),             # per output channel
    "w4ta": int_scheme(4, 0),                # per tensor
    "w3g64a": int_scheme(3, 64),
    "w2g64a": int_scheme(2, 64),
    "w8cs": int_scheme(8, None, symmetric=True),
    "w8g128a": int_scheme(8, 128),
    "w4b64x64": Scheme(bits=4, granularity="block", block_size=(64, 64)),
}


def make(qw, bias=None, backend="auto", name="weight", act="fp32", prefill="fp32"):
    """make_kernel with the ext kernel's decode and prefill activations pinned (fp32 unless asked),
    so these tests do not depend on kernels.DECODE_ACT / PREFILL_ACT."""
    kern = make_kernel(qw, bias, backend, name)
    if isinstance(kern, kernels.ExtKernel):
        kern.set_act(act)
        kern.set_prefill(prefill)
    return kern


def dot_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return 2e-6 * (x.abs().float() @ w.abs().t()) + 1e-30


def check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, weight_rel: float = 0.0) -> None:
    """weight_rel: extra per-weight relative error the kernel's own rounding of W allows."""
    ref = F.linear(x.float(), w)
    bound = dot_bound(x, w) * (1 + weight_rel / 2e-6)
    if y.dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2.0 ** -8
    err = (y.float() - ref).abs()
    assert bool((err <= bound).all()), f"max err {float(err.max()):.3g}, max err/bound {float((err / bound).max()):.3g}"


@pytest.fixture(scope="module")
def real_weights(smollm2):
    """Real bundled-model weights, one of each linear shape (576x576, 192x576, 1536x576, 576x1536)."""
    m = smollm2.model
    blk = m.model.layers[3]
    return {"q_proj": blk.self_attn.q_proj.weight.detach().clone(),
            "k_proj": blk.self_attn.k_proj.weight.detach().clone(),
            "gate_proj": blk.mlp.gate_proj.weight.detach().clone(),
            "down_proj": blk.mlp.down_proj.weight.detach().clone()}


def test_pack_q4x32_roundtrip_and_layout():
    g = torch.Generator().manual_seed(0)
    for n, k in [(3, 32), (5, 70), (16, 576), (1, 1)]:
        c = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        p = pack_q4x32_u8(c)
        assert p.shape == (n, -(-k // 32) * 16)
        assert torch.equal(unpack_q4x32_u8(p, k), c)
    c = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    p = pack_q4x32_u8(c)
    # byte j: column j in the low nibble, column 16+j in the high nibble
    assert int(p[0, 3]) == (3 | (3 << 4)) and int(p[0, 15]) == (15 | (15 << 4))
    with pytest.raises(LowbitError, match="codes must be < 16"):
        pack_q4x32_u8(torch.full((1, 4), 16, dtype=torch.uint8))


@pytest.mark.model
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("scheme_name", ["w4g128a", "w4g32s", "w3g64a", "w8cs", "w8g128a"])
def test_kernels_match_reference_on_real_shapes(real_weights, backend, scheme_name):
    scheme = SCHEMES[scheme_name]
    g = torch.Generator().manual_seed(1)
    ran = 0
    for name, w in real_weights.items():
        qw = quantize_weight(w, scheme)
        try:
            kern = make(qw, None, backend, name)
        except LowbitError as e:
            # torch's kernels take fewer schemes; the refusal must name the layer and say why
            assert backend == "torch" and name in str(e)
            continue
        ref_w = qw.dequantize()
        # 1..4 rows take the GEMV path of `ext`, more the tile path (torch's fp32 int4 op is a slow
        # reference loop, so it skips the big batch)
        for m in (1, 3, 9) if backend == "torch" else (1, 3, 33):
            x = torch.randn(m, w.shape[1], generator=g)
            check_close(kern(x), x, ref_w)
        ran += 1
    assert ran or backend == "torch"


@pytest.mark.model
@pytest.mark.parametrize("backend", EXT_VARIANTS + ["tiled"], indirect=True)
@pytest.mark.parametrize("fmt,group", [("nf4", 64), ("fp4", 32), ("ternary", 128)])
def test_codebook_formats_on_real_shapes(real_weights, backend, fmt, group):
    """NF4 / FP4 / ternary (numerics/codebooks.py) run on the same 16-entry-table kernel as int4."""
    g = torch.Generator().manual_seed(6)
    for name in ("gate_proj", "down_proj"):
        qw = quantize_weight(real_weights[name], Scheme(format=fmt, granularity="group", group_size=group))
        kern = make(qw, None, backend, name)
        assert kern.backend == backend
        for m in (1, 9):
            x = torch.randn(m, qw.shape[1], generator=g)
            check_close(kern(x), x, qw.dequantize())
    with pytest.raises(LowbitError, match="integer codes only"):
        make_kernel(qw, None, "torch", name)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_odd_shapes_bias_and_leading_dims(backend):
    g = torch.Generator().manual_seed(2)
    for (n, k), scheme in [((48, 70), int_scheme(4, 32)), ((100, 200), int_scheme(4, 64, True)),
                           ((32, 96), int_scheme(8, 64)), ((17, 33), int_scheme(4, None)),
                           ((64, 96), int_scheme(4, 256)),   # one group longer than the row
                           ((64, 128), SCHEMES["w4ta"]), ((80, 160), SCHEMES["w2g64a"]),
                           ((96, 160), SCHEMES["w4b64x64"]), ((48, 64), SCHEMES["w4ca"])]:
        w = torch.randn(n, k, generator=g) * 0.1
        b = torch.randn(n, generator=g)
        qw = quantize_weight(w, scheme)
        try:
            kern = make(qw, b, backend)
        except LowbitError:
            assert backend == "torch"
            continue
        x = torch.randn(2, 5, k, generator=g)
        y = kern(x)
        assert y.shape == (2, 5, n)
        check_close((y - b).reshape(10, n), x.reshape(10, k), qw.dequantize())


@pytest.mark.parametrize("backend", EXT_VARIANTS + ["tiled"], indirect=True)
def test_act_order_g_idx(backend):
    g = torch.Generator().manual_seed(3)
    n, k, gs = 64, 256, 64
    w = torch.randn(n, k, generator=g)
    perm = torch.randperm(k, generator=g)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)   # GPTQ desc_act: groups follow a permutation
    ref = quantize_weight(w, int_scheme(4, gs))
    qw = QuantizedWeight(ref.qdata, ref.scale, ref.zero_point, ref.scheme, g_idx)
    kern = make(qw, None, backend)
    assert backend == "tiled" or kern.perm is not None
    for m in (1, 8):
        x = torch.randn(m, k, generator=g)
        check_close(kern(x), x, qw.dequantize())
    assert torch.equal(kern.unpack_codes(), qw.qdata)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bf16_activations(backend):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 576, generator=g) * 0.05
    qw = quantize_weight(w, int_scheme(4, 128))
    kern = make(qw, None, backend)
    for m in (1, 16):
        x = torch.randn(m, 576, generator=g).bfloat16()
        y = kern(x)
        assert y.dtype == torch.bfloat16
        # torch's bf16 int4 path holds scale and z' = (8 - zero) * scale in bf16 (2^-8 relative
        # each; z' can be ~8x a weight), so it gets a looser bound than our fp32-accumulating kernels
        # tiled decodes W into the activation dtype, as the reference QuantLinear does
        check_close(y, x, qw.dequantize(), weight_rel={"torch": 2.0 ** -5, "tiled": 2.0 ** -7}.get(backend, 0.0))


def test_packed_linear_memory_codes_and_errors():
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(576, 1536, bias=False)
    qw = quantize_weight(lin.weight, int_scheme(4, 128))
    model = torch.nn.Sequential(QuantLinear(qw))
    report = prepare_for_inference(model)
    kernels.set_decode_activations(model, "fp32")
    pl = model[0]
    assert isinstance(pl, PackedLinear) and isinstance(pl, QuantLinear)
    assert report["layers"] == 1
    # the unpacked one-byte-per-weight codes are gone; codes + fp32 scales + zeros remain
    assert "qdata" not in dict(pl.named_buffers())
    if pl.backend == "ext":
        assert report["packed_bytes"] == 1536 * 576 // 2 + 2 * 1536 * 5 * 4 + 16 * 4
    assert torch.equal(pl.qweight.qdata, qw.qdata)          # exporters still read the codes
    for bad in (torch.randn(2, 100), torch.randn(3, 192)):   # 3x192 would reshape to 1x576
        with pytest.raises(LowbitError, match="last dim 576"):
            pl(bad)
    with pytest.raises(LowbitError, match="backend"):
        make_kernel(qw, None, "cuda")
    x = torch.randn(3, 576, generator=g)
    check_close(pl(x), x, qw.dequantize())


def test_torch_backend_codes_roundtrip_and_refusals():
    w = torch.randn(64, 256)
    for scheme in (int_scheme(4, 128), int_scheme(8, None, True)):
        qw = quantize_weight(w, scheme)
        assert torch.equal(make_kernel(qw, None, "torch").unpack_codes(), qw.qdata)
    with pytest.raises(LowbitError, match="int8 needs one scale per output channel"):
        make_kernel(quantize_weight(w, int_scheme(8, 128)), None, "torch", "blk.0.q")
    with pytest.raises(LowbitError, match="out_features % 16"):
        make_kernel(quantize_weight(torch.randn(24, 256), int_scheme(4, 128)), None, "torch")


def test_group_form_refuses_what_kernels_cannot_take():
    w = torch.randn(32, 96)
    with pytest.raises(LowbitError, match="multiple of 32"):
        to_group_form(quantize_weight(w, int_scheme(4, 48)), "layer.x")
    # ...and auto falls back to the tiled kernel, which reads any scheme
    qw = quantize_weight(w, int_scheme(4, 48))
    kern = make(qw)
    assert kern.backend == "tiled"
    x = torch.randn(2, 96)
    check_close(kern(x), x, qw.dequantize())


def test_auto_without_extension_falls_back(monkeypatch):
    monkeypatch.setitem(ext._STATE, "loaded", False)
    monkeypatch.setitem(ext._STATE, "why", "test: extension unavailable")
    qw = quantize_weight(torch.randn(32, 64), int_scheme(4, 32))
    assert make_kernel(qw).backend == "tiled"
    with pytest.raises(LowbitError, match="extension unavailable"):
        make_kernel(qw, None, "ext")


@pytest.mark.skipif(ext.disabled() is not None, reason=str(ext.disabled()))
def test_extension_builds_here():
    """make install builds it; on this machine (gcc present) it must load, and the variant it
    picks on its own is the best one the CPU runs."""
    assert ext.load(), ext.status()
    assert kernels.available_backends()["ext"] == "ready"
    ready = [v for v, why in ext.isa_status().items() if why == "ready"]
    assert "portable" in ready
    with ext.use_isa("auto"):
        assert ext.isa() == ready[0]


def q8_round(x: torch.Tensor, k_pad: int) -> torch.Tensor:
    """x rounded as the kernels' int8 activation path does (per 32-column block of the padded row:
    d = max|x| / 127, q = round-half-even(x * (1 / d))), back in float, unpadded."""
    m, k = x.shape
    xb = F.pad(x.float(), (0, k_pad - k)).reshape(m, -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q * d).reshape(m, k_pad)[:, :k]


def term_magnitudes(qw) -> torch.Tensor:
    """|scale| * (code + |zero|) (+ 256 for byte codes): the size of each term the int8 path sums
    (codes x q, zero x sum q; the byte path biases codes by 128), per weight, (N, K)."""
    form = to_group_form(qw)
    g = torch.arange(form.in_features) // form.group_size
    z = form.zero[:, g].abs() if form.zero is not None else 0.0
    return form.scale[:, g].abs() * (form.codes.float() + z + (0.0 if form.nibble else 256.0))


@pytest.mark.parametrize("backend", EXT_VARIANTS, indirect=True)
@pytest.mark.parametrize("shape,scheme_name", [((1536, 576), "w4g128a"), ((576, 1536), "w4g32s"),
                                               ((100, 224), "w2g64a"), ((48, 96), "w4ca"),
                                               ((1536, 576), "w8cs"), ((80, 224), "w8g128a"),
                                               ((40, 70), "w4ta"), ((64, 96), "w4b64x64"),
                                               ((203, 576), "w4ca"), ((13, 2080), "w4g128a"),
                                               ((7, 352), "w8g128a")])
def test_int8_activations_equal_exact_math_on_rounded_input(backend, shape, scheme_name):
    """The integer path's only approximation is rounding x to int8 per block: its output is the
    exact product of the rounded x with W, to fp32 summation order. Odd block counts (96, 224
    and 70 -> 96 columns) take the AVX-512 single-block tail; 576 per channel is 4 interleaved
    4-block units and a pair, 2080 at g128 ends in a one-block group, and row counts that are not
    a multiple of 4 take the one-row tail of the 4-row passes."""
    g = torch.Generator().manual_seed(7)
    n, k = shape
    qw = quantize_weight(torch.randn(n, k, generator=g) * 0.05, SCHEMES[scheme_name])
    kern = make(qw, None, backend, act="int8")
    assert kern.act == "int8"
    w, mag = qw.dequantize(), term_magnitudes(qw)
    for m in (1, 4):
        x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 3   # uneven columns
        xr = q8_round(x, kern.k_pad)
        y = kern(x)
        err = (y - F.linear(xr, w)).abs()
        bound = 2e-6 * (xr.abs() @ mag.t()) + 1e-30
        assert bool((err <= bound).all()), f"max err/bound {float((err / bound).max()):.3g}"
        # ...which is within the rounding's own bound of the fp32-activation result: each x_k
        # moves by at most half a step d_b / 2
        d = F.pad(x, (0, kern.k_pad - k)).reshape(m, -1, 32).abs().amax(-1) / 127.0
        e = d.repeat_interleave(32, 1)[:, :k] / 2
        assert bool(((y - F.linear(x, w)).abs() <= e @ w.abs().t() + bound).all())


def chunk_round(x: torch.Tensor, k_pad: int, group_size: int) -> torch.Tensor:
    """x rounded as the int8 prefill GEMM does: per chunk of at most 256 columns starting at each
    weight group's start (d = max|x| / 127, q = round-half-even(x * (1 / d))), unpadded."""
    m, k = x.shape
    xp = F.pad(x.float(), (0, k_pad - k))
    out = torch.empty_like(xp)
    for g0 in range(0, k_pad, group_size):
        for c0 in range(g0, min(k_pad, g0 + group_size), 256):
            c1 = min(c0 + 256, g0 + group_size, k_pad)
            d = xp[:, c0:c1].abs().amax(-1, keepdim=True) / 127.0
            inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
            out[:, c0:c1] = torch.round(xp[:, c0:c1] * inv).clamp(-127, 127) * d
    return out[:, :k]


@pytest.mark.parametrize("backend", EXT_VARIANTS, indirect=True)
@pytest.mark.parametrize("shape,scheme_name", [((1536, 576), "w4g128a"), ((577, 1536), "w4g32s"),
                                               ((101, 224), "w2g64a"), ((48, 96), "w4ca"),
                                               ((40, 600), "w4ta"), ((64, 1536), "w4g512a")])
def test_int8_prefill_equals_exact_math_on_chunk_rounded_input(backend, shape, scheme_name):
    """The int8 prefill GEMM's only approximation is rounding x per chunk (<= 256 columns inside
    a group; 8 int16 partial sums of codes x int8 stay exact): its output is the rounded x times
    W to fp32 summation order. M = 5 and 13 rows and odd N take the 3 x 2 tile's edges; per
    channel / per tensor groups (576 / 608 columns) split into chunks of 256."""
    g = torch.Generator().manual_seed(9)
    n, k = shape
    scheme = int_scheme(4, 512) if scheme_name == "w4g512a" else SCHEMES[scheme_name]
    qw = quantize_weight(torch.randn(n, k, generator=g) * 0.05, scheme)
    kern = make(qw, None, backend, prefill="int8")
    assert kern.prefill == "int8"
    w, mag = qw.dequantize(), term_magnitudes(qw)
    for m in (kernels.GEMV_MAX_M + 1, 13):
        x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 3   # uneven columns
        xr = chunk_round(x, kern.k_pad, kern.group_size)
        err = (kern(x) - F.linear(xr, w)).abs()
        bound = 2e-6 * (xr.abs() @ mag.t()) + 1e-30
        assert bool((err <= bound).all()), f"max err/bound {float((err / bound).max()):.3g}"
    # decode rows keep their own per-block rounding; 8-bit codes and codebooks keep fp32 prefill
    assert make(quantize_weight(w, int_scheme(8, None, True)), prefill="int8").prefill == "fp32"
    nf4 = make(quantize_weight(w[:, :128], Scheme(format="nf4", granularity="group", group_size=64)), prefill="int8")
    assert nf4.prefill == "fp32"
    with pytest.raises(LowbitError, match="prefill activations"):
        kern.set_prefill("int4")


@pytest.mark.parametrize("backend", EXT_VARIANTS, indirect=True)
@pytest.mark.parametrize("shape,scheme_name", [((47, 800), "w4g96a"), ((33, 576), "w4g128a"),
                                               ((70, 352), "w8g96a"), ((16, 1536), "w8cs")])
def test_fp32_prefill_gemm_edges(backend, shape, scheme_name):
    """The fp32 prefill GEMM (kern_gemm_f32.h) against the reference and the tile + MKL path it
    replaced: M around its register tile (6 / 8 rows) and N around its panel width (16 / 32) take
    the edges; K = 800 splits into chunks of 256 + 256 + 256 + 32 that cut groups of 96 in the
    middle; 8-bit codes take the same GEMM."""
    g = torch.Generator().manual_seed(12)
    n, k = shape
    schemes = {"w4g96a": int_scheme(4, 96), "w8g96a": int_scheme(8, 96)}
    qw = quantize_weight(torch.randn(n, k, generator=g) * 0.05, schemes.get(scheme_name) or SCHEMES[scheme_name])
    kern, mkl = make(qw, None, backend), make(qw, None, backend, prefill="fp32-mkl")
    w = qw.dequantize()
    for m in (5, 6, 7, 8, 9, 17, 64):
        x = torch.randn(m, k, generator=g)
        check_close(kern(x), x, w)
        check_close(mkl(x), x, w)
        y = kern(x)
        assert torch.equal(y, kern(x))   # same inputs, same bits


@pytest.mark.parametrize("backend", EXT_VARIANTS, indirect=True)
@pytest.mark.parametrize("prefill", ["fp32", "fp32-mkl", "int8"])
def test_prefill_propagates_nan_and_inf(backend, prefill):
    """A NaN / inf in one row's input reaches every output of that row and no other, on each
    prefill path (rows inside and past the register tiles)."""
    qw = quantize_weight(torch.randn(40, 576), int_scheme(4, 128))
    kern = make(qw, prefill=prefill)
    assert kern.prefill == prefill
    for rows, bad_row in ((7, 2), (11, 9)):
        for bad in (float("nan"), float("inf")):
            x = torch.randn(rows, 576)
            x[bad_row, 300] = bad
            y = kern(x)
            assert not bool(y[bad_row].isfinite().any()), y[bad_row]   # every output reads x[bad_row, 300]
            assert bool(y[[r for r in range(rows) if r != bad_row]].isfinite().all())


@pytest.mark.parametrize("backend", EXT_VARIANTS, indirect=True)
def test_int8_activations_fall_back_for_codebooks_and_prefill(backend):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(64, 128, generator=g)
    nf4 = make(quantize_weight(w, Scheme(format="nf4", granularity="group", group_size=64)), act="int8")
    assert nf4.act == "fp32"           # a non-integer table has no integer dot product
    # the default, auto: int8 activations for 4-bit integer codes, fp32 for 8-bit codes
    assert make(quantize_weight(w, int_scheme(8, None, True)), act="auto").act == "fp32"
    assert make(quantize_weight(w, int_scheme(3, 64)), act="auto").act == "int8"
    with pytest.raises(LowbitError, match="decode activations"):
        make(quantize_weight(w, int_scheme(3, 64)), act="int4")
    qw = quantize_weight(w, int_scheme(4, 64))
    kern = make(qw, act="int8")
    x = torch.randn(kernels.GEMV_MAX_M + 1, 128, generator=g)
    check_close(kern(x), x, qw.dequantize())   # prefill rows: tile path, fp32 activations


@pytest.mark.parametrize("backend", EXT_VARIANTS, indirect=True)
@pytest.mark.parametrize("act", ["fp32", "int8"])
def test_nan_and_inf_propagate(backend, act):
    qw = quantize_weight(torch.randn(32, 64), int_scheme(4, 32))
    kern = make(qw, act=act)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 64)
        x[0, 5] = bad
        y = kern(x)
        assert not bool(y[0].isfinite().any()), y[0]   # every output reads x[0, 5]
        assert bool(y[1].isfinite().all())


def test_isa_variants_can_be_forced_and_refused():
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    status = ext.isa_status()
    before = ext.isa()
    for isa, why in status.items():
        if why == "ready":
            with ext.use_isa(isa):
                assert ext.isa() == isa
        else:   # e.g. avx512 on an AVX2-only CPU, x86 variants on ARM
            with pytest.raises(LowbitError, match="cannot run here"):
                ext.set_isa(isa)
    assert ext.isa() == before
    with pytest.raises(LowbitError, match="expected one of auto"):
        ext.set_isa("sse9")


def _run_env(env: dict, code: str) -> str:
    full = {**os.environ, **env}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_environment_forces_a_variant_or_disables_the_extension():
    """LOWBIT_ISA forces one variant (refused with a LowbitError if the CPU can't run it);
    LOWBIT_EXT=0 leaves the extension out and auto falls back to the tiled kernel."""
    probe = ("import torch; from lowbit.nn import ext, kernels; from lowbit.numerics.qweight import "
             "quantize_weight; from lowbit.numerics.scheme import int_scheme\n"
             "k = kernels.make_kernel(quantize_weight(torch.randn(32, 64), int_scheme(4, 32)))\n"
             "print(k.backend, ext.isa() if k.backend == 'ext' else ext.status())")
    assert _run_env({"LOWBIT_EXT": "0"}, probe).split()[0] == "tiled"
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    ready = [v for v, why in ext.isa_status().items() if why == "ready"]
    target = "avx2" if "avx2" in ready else "portable"
    assert _run_env({"LOWBIT_ISA": target}, probe).split() == ["ext", target]
    refused = [v for v, why in ext.isa_status().items() if why != "ready"]
    if refused:
        full = {**os.environ, "LOWBIT_ISA": refused[0]}
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=full, timeout=300)
        assert res.returncode != 0 and "cannot run here" in res.stderr


@pytest.mark.parametrize("spin_us", ["1000", "0"])
def test_decode_pool_runs_every_part_exactly_once_back_to_back(spin_us):
    """Our decode pool's contract, on the pool itself: 100,000 runs back to back per thread count,
    part counts alternating small and large (a decode step's q/k/v calls, then its lm_head), each
    run returning only after every part of its own ran exactly once. With the part count in its own
    atomic, a worker finishing one run's last part could claim a part of the next run's count
    under the old run's word: a run returned with a part still running (a stale slice of the
    lm_head's logits in test_step, once in ~10 full suites) or spun forever. That hung here within
    20,000 runs on 2 threads. Workers spinning (1000 us) and sleeping between runs (0) both; in a
    child process with a time limit, so a hang fails instead of stopping the suite."""
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    code = ("from lowbit.nn import ext\n"
            "print([ext.decode_pool_check(100000 if t == 2 else 30000, t) for t in (2, 3, 4, 9)])")
    full = {**os.environ, "LOWBIT_SPIN_US": spin_us}
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("decode pool: a run never returned (its done count went past its parts)")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[-2] == "[0, 0, 0, 0]", f"runs with a part missed or run twice: {res.stdout}"


@pytest.mark.parametrize("backend", EXT_VARIANTS[:1], indirect=True)
def test_decode_pool_equals_one_thread_across_threads_and_forks(backend):
    """The decode GEMVs run on our own spinning pool (nn/ext/decode_pool.h): the rows each thread
    computes do not depend on who computes them, so every thread count gives the one-thread bits;
    calls from several Python threads at once (the pool is busy: at::parallel_for instead) and a
    forked child (a fresh pool) give them too."""
    import concurrent.futures
    import multiprocessing as mp
    g = torch.Generator().manual_seed(13)
    shapes = [(4000, 576, 1), (96, 576, 1), (1536, 1536, 4), (33, 1536, 3)]
    kerns = []
    for n, k, m in shapes:
        qw = quantize_weight(torch.randn(n, k, generator=g) * 0.05, int_scheme(4, 128))
        kerns.append((make(qw, act="int8"), make(qw, act="fp32"), torch.randn(m, k, generator=g)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = [(a(x), f(x)) for a, f, x in kerns]
        for nth in (2, 3, 4, 2):
            torch.set_num_threads(nth)
            for _ in range(25):
                for (a, f, x), (wa, wf) in zip(kerns, want):
                    assert torch.equal(a(x), wa) and torch.equal(f(x), wf)
        torch.set_num_threads(2)

        def hammer(_):
            return all(torch.equal(a(x), wa) and torch.equal(f(x), wf)
                       for _ in range(20) for (a, f, x), (wa, wf) in zip(kerns, want))
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            assert all(ex.map(hammer, range(6)))
        if ext.decode_pool_spin_us() == 0:
            # at::parallel_for, i.e. libgomp: a forked child of a process whose OpenMP team ran
            # hangs in its first parallel region (torch's own F.linear does: checked with
            # OMP_WAIT_POLICY unset, PASSIVE and ACTIVE), so there is no fork to test of ours
            pytest.skip("decode GEMVs on OpenMP here (LOWBIT_SPIN_US=0 or OMP_WAIT_POLICY not PASSIVE): "
                        "libgomp does not survive fork; the fork check needs our pool")
        child = mp.get_context("fork").Process(target=lambda: os._exit(0 if hammer(0) else 3))
        child.start()
        child.join(120)
        assert child.exitcode == 0, f"forked child: exit code {child.exitcode}"
    finally:
        torch.set_num_threads(threads)
