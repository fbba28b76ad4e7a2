"""Affine primitives: granularities, ragged groups, symmetric/asymmetric, errors, fake-quant."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.numerics import (Scheme, choose_qparams, dequantize, fake_quantize, int_scheme, quantize,
                             quantize_dequantize, quantize_weight, sqnr_db)


def gaussian(rows=256, cols=512, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group,sym,min_db", [
    (8, None, True, 40.0), (8, 128, False, 40.0), (4, 128, False, 18.0), (4, 128, True, 17.0),
    (4, 32, False, 20.0), (3, 128, False, 12.0), (2, 64, False, 5.0),
])
def test_sqnr_thresholds_on_gaussian(bits, group, sym, min_db):
    w = gaussian()
    qw = quantize_weight(w, int_scheme(bits, group, sym))
    assert sqnr_db(w, qw.dequantize()) > min_db


def test_sqnr_grows_about_6db_per_bit():
    w = gaussian()
    db = [sqnr_db(w, quantize_dequantize(w, int_scheme(b, 128))) for b in (3, 4, 5, 6)]
    steps = [b - a for a, b in zip(db, db[1:])]
    assert all(5.0 < s < 7.0 for s in steps), steps


def test_symmetric_codes_and_zero_exact():
    w = gaussian(16, 64)
    w[:, 3] = 0.0
    s = int_scheme(4, 16, symmetric=True)
    qw = quantize_weight(w, s)
    assert torch.all(qw.zero_point == 8)
    assert int(qw.qdata.min()) >= 0 and int(qw.qdata.max()) <= 15
    assert torch.all(qw.dequantize()[:, 3] == 0)
    # absmax of each group is representable exactly (scale = absmax / 7)
    groups = w.view(16, 4, 16)
    deq = qw.dequantize().view(16, 4, 16)
    idx = groups.abs().argmax(-1, keepdim=True)
    assert torch.allclose(deq.gather(-1, idx).abs(), groups.gather(-1, idx).abs(), rtol=1e-6)


def test_restricted_range_never_uses_lowest_code():
    w = gaussian(8, 256)
    s = Scheme(bits=8, symmetric=True, int_range="restricted", granularity="channel")
    qw = quantize_weight(w, s)
    signed = qw.qdata.int() - 128
    assert signed.min() >= -127 and signed.max() <= 127


def test_asymmetric_includes_zero_in_range_and_covers_min_max():
    w = gaussian(8, 128).abs() + 1.0  # all positive: range widened down to 0
    qw = quantize_weight(w, int_scheme(4, 32))
    assert torch.all(qw.zero_point == 0)
    err = (qw.dequantize() - w).abs().max()
    assert err <= qw.scale.max() / 2 + 1e-6


def test_ragged_last_group_matches_separately_quantized_tail():
    w = gaussian(4, 576)  # SmolLM2's hidden size: 4 full groups of 128 + one of 64
    s = int_scheme(4, 128)
    qw = quantize_weight(w, s)
    assert qw.scale.shape == (4, 5)
    assert qw.ragged_last_group == 64 and qw.info["ragged_last_group"] == 64
    tail = quantize_dequantize(w[:, 512:].contiguous(), int_scheme(4, 64))
    assert torch.equal(qw.dequantize()[:, 512:], tail)


def test_per_channel_axis1_and_tensor_and_block():
    w = gaussian(64, 96)
    for s, qshape in [
        (Scheme(bits=8, granularity="channel", axis=1), (1, 96)),
        (Scheme(bits=8, granularity="tensor"), (1, 1)),
        (Scheme(bits=8, granularity="block", block_size=(32, 64)), (2, 2)),
    ]:
        qp = choose_qparams(w, s)
        assert qp.scale.shape == qshape
        assert sqnr_db(w, dequantize(quantize(w, qp, s), qp, s)) > 35


def test_group_along_last_axis_of_3d_activation():
    x = torch.randn(2, 5, 64)
    s = int_scheme(8, 32)
    qp = choose_qparams(x, s)
    assert qp.scale.shape == (2, 5, 2)
    assert sqnr_db(x, quantize_dequantize(x, s)) > 40


@given(rows=st.integers(1, 9), cols=st.integers(1, 70), bits=st.integers(2, 8),
       group=st.integers(1, 64), sym=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=80, deadline=None)
def test_roundtrip_error_bounded_by_half_step(rows, cols, bits, group, sym, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    s = int_scheme(bits, group, sym)
    qw = quantize_weight(w, s)
    step = qw.scale.repeat_interleave(group, dim=1)[:, :cols]
    # symmetric "full" grids clip nothing (absmax on grid); asymmetric ranges include min and max
    assert torch.all((qw.dequantize() - w).abs() <= step / 2 + 1e-5 * (1 + w.abs()))
    # and re-quantizing the dequantized weight with the same qparams is a fixed point
    assert torch.equal(quantize(qw.dequantize(), qw.qparams, s), qw.qdata)


def test_fake_quantize_straight_through_gradient():
    x = torch.randn(4, 64, requires_grad=True)
    y = fake_quantize(x, int_scheme(4, 32))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(y.detach(), quantize_dequantize(x.detach(), int_scheme(4, 32)))


def test_deterministic_bytes():
    w = gaussian()
    a = quantize_weight(w, int_scheme(3, 128))
    b = quantize_weight(w.clone(), int_scheme(3, 128))
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


def test_bits_per_weight_accounts_for_scales_and_zeros():
    qw = quantize_weight(gaussian(128, 1024), int_scheme(4, 128))
    assert math.isclose(qw.bits_per_weight, 4 + (16 + 4) / 128)
    qs = quantize_weight(gaussian(128, 1024), int_scheme(4, 128, symmetric=True))
    assert math.isclose(qs.bits_per_weight, 4 + 16 / 128)


@pytest.mark.parametrize("bad,match", [
    (lambda: int_scheme(9, 128), "bits"),
    (lambda: int_scheme(1, 128), "bits"),
    (lambda: int_scheme(4, -5), "group_size"),
    (lambda: Scheme(format="int5"), "format"),
    (lambda: Scheme(granularity="row"), "granularity"),
])
def test_bad_scheme_errors_name_the_option(bad, match):
    with pytest.raises(LowbitError, match=match):
        bad()


@pytest.mark.parametrize("x,match", [
    (torch.tensor([[1.0, float("nan")]]), "NaN/inf"),
    (torch.tensor([[1.0, float("inf")]]), "NaN/inf"),
    (torch.empty(0, 4), "non-empty"),
    (torch.ones(2, 4, dtype=torch.int32), "floating-point"),
])
def test_bad_tensor_errors(x, match):
    with pytest.raises(LowbitError, match=match):
        quantize_weight(x, int_scheme(4, 2))
