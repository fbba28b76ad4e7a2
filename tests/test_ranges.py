"""Range calibration: min-max, percentile, MSE search, KL (entropy); one tensor and streams."""
from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.numerics import Scheme, dequantize, int_scheme, mse, qparams_from_range, quantize
from lowbit.numerics.affine import qparam_shape
from lowbit.numerics.ranges import HistogramObserver, calibrate_range, make_observer


def heavy_tailed(rows=128, cols=1024, n_out=16, seed=0):
    """N(0, 1) with a few outliers of magnitude 30..60 (sign random); returns (x, inlier mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    idx = torch.randperm(x.numel(), generator=g)[:n_out]
    sign = torch.where(torch.rand(n_out, generator=g) < 0.5, -1.0, 1.0)
    x.view(-1)[idx] = torch.linspace(30, 60, n_out) * sign
    inlier = torch.ones_like(x, dtype=torch.bool)
    inlier.view(-1)[idx] = False
    return x, inlier


def qdq(x, lo, hi, s):
    qp = qparams_from_range(lo, hi, s)
    return dequantize(quantize(x, qp, s), qp, s)


# Measured inlier MSE for this tensor, grid=60 (min-max / percentile / mse / kl):
#   w8 sym  1.9e-2 / 9.1e-5 / 1.2e-2 / 1.0e-4      w4 sym  1.0 / 2.9e-2 / 1.9e-2 / 1.8e-2
#   w8 asym 1.8e-2 / 8.9e-5 / 1.3e-2 / 1.0e-4      w4 asym 1.0 / 2.4e-2 / 1.9e-2 / 1.6e-2
#   nf4     0.96   / 1.3e-2 / 3.4e-2 / 1.1e-2
# (MSE minimises the error of *all* values, outliers included, so at 8 bits it clips less.)
@pytest.mark.parametrize("scheme", [int_scheme(8, 0, True), int_scheme(8, 0, False),
                                    int_scheme(4, 0, True), int_scheme(4, 0, False),
                                    Scheme(format="nf4", granularity="tensor")], ids=lambda s: s.short_name())
def test_clipping_beats_minmax_on_inliers_of_heavy_tailed_tensor(scheme):
    x, inlier = heavy_tailed()
    err = {}
    for m in ("minmax", "percentile", "mse", "kl"):
        lo, hi = calibrate_range(x, scheme, m, grid=60)
        assert lo.shape == hi.shape == (1, 1)
        assert float(lo) >= float(x.min()) and float(hi) <= float(x.max())
        err[m] = mse(x[inlier], qdq(x, lo, hi, scheme)[inlier])
    for m in ("percentile", "mse", "kl"):
        assert err[m] < 0.85 * err["minmax"], err
    if scheme.code_bits == 4:                                  # at 4 bits, the gain is 25x and more
        assert max(err["percentile"], err["mse"], err["kl"]) < err["minmax"] / 15, err


def test_minmax_and_percentile_exact_values():
    x = torch.arange(1.0, 10001.0).reshape(1, -1)              # 1..10000
    s = int_scheme(8, 0)
    lo, hi = calibrate_range(x, s, "minmax")
    assert (float(lo), float(hi)) == (1.0, 10000.0)
    lo, hi = calibrate_range(x, s, "percentile", percentile=99.0)
    assert (float(lo), float(hi)) == (101.0, 9900.0)


@pytest.mark.parametrize("scheme", [int_scheme(4, 64), int_scheme(4, None, True),
                                    Scheme(bits=8, granularity="block", block_size=(16, 32)),
                                    Scheme(format="nf4", granularity="group", group_size=100)],
                         ids=lambda s: s.short_name())
def test_per_unit_shapes_and_mse_never_worse_than_minmax(scheme):
    x, _ = heavy_tailed(rows=48, cols=300, n_out=6)
    qs = qparam_shape(tuple(x.shape), scheme)
    mn, mx = calibrate_range(x, scheme, "minmax")
    for m in ("percentile", "mse"):
        lo, hi = calibrate_range(x, scheme, m, grid=40)
        assert lo.shape == hi.shape == qs
        assert torch.all(lo >= mn) and torch.all(hi <= mx) and torch.all(lo <= hi)
    lo, hi = calibrate_range(x, scheme, "mse", grid=40)
    assert mse(x, qdq(x, lo, hi, scheme)) <= mse(x, qdq(x, mn, mx, scheme)) + 1e-12


def test_mse_works_through_every_codec():
    x, inlier = heavy_tailed(rows=32, cols=256, n_out=4)
    for fmt in ("fp4", "ternary", "fp8_e4m3"):
        s = Scheme(format=fmt, granularity="tensor")
        lo, hi = calibrate_range(x, s, "mse", grid=40)
        mn, mx = calibrate_range(x, s, "minmax")
        assert mse(x, qdq(x, lo, hi, s)) <= mse(x, qdq(x, mn, mx, s)) + 1e-12, fmt


def test_stream_matches_one_shot():
    x, _ = heavy_tailed(rows=128, cols=512)
    s = int_scheme(8, 0, True)
    chunks = x.chunk(4)
    one = {m: calibrate_range(x, s, m, grid=60) for m in ("minmax", "percentile", "mse", "kl")}
    for m in ("minmax", "percentile", "mse", "kl"):
        obs = make_observer(s, m, **({} if m == "minmax" else {"grid": 60} if m == "mse" else {}))
        for c in chunks:
            obs.update(c)
        lo, hi = obs.compute()
        if m == "minmax":
            assert torch.equal(lo, one[m][0]) and torch.equal(hi, one[m][1])
        elif m == "percentile":                                # within a histogram bin or two
            width = float(obs.absmax_edge[0]) / obs.bins
            assert abs(float(hi) - float(one[m][1])) < 2 * width
            assert abs(float(lo) - float(one[m][0])) < 2 * width
        elif m == "mse":                                       # the histogram's search is as good
            err = mse(x, qdq(x, lo, hi, s))
            assert err <= 1.05 * mse(x, qdq(x, *one[m], s))
            assert err < mse(x, qdq(x, *one["minmax"], s))
        else:                                                  # KL clips the outliers off in both
            assert float(hi) < 10 and float(lo) > -10 and float(one[m][1]) < 10


def test_histogram_grows_exactly():
    s = int_scheme(8, 0, True)
    obs = HistogramObserver(s, "percentile", bins=64)
    a = torch.randn(1, 1000)
    obs.update(a)
    edge0 = float(obs.absmax_edge[0])
    b = torch.randn(1, 1000) * 10                              # needs A to double several times
    obs.update(b)
    k = round(torch.log2(obs.absmax_edge[0] / edge0).item())
    assert k >= 2 and float(obs.absmax_edge[0]) == edge0 * 2 ** k
    assert float(obs.hist.sum()) == 2000.0
    # the merged histogram equals one binned directly on the final grid (up to a value or two
    # that sits on a bin edge within float rounding)
    A = obs.absmax_edge[0].item()
    both = torch.cat([a, b], 1).double()
    direct = torch.floor((both + A) / (A / 64)).long().clamp(0, 127)
    assert float((obs.hist[0] - torch.bincount(direct[0], minlength=128).double()).abs().sum()) <= 4


def test_per_channel_activation_stream():
    # tokens vary per batch; one range per feature (axis=1) stays the same shape
    s = Scheme(bits=8, granularity="channel", axis=1)
    obs = make_observer(s, "percentile", percentile=99.9)
    for n in (7, 50, 13):
        obs.update(torch.randn(n, 24))
    lo, hi = obs.compute()
    assert lo.shape == hi.shape == (1, 24) and torch.all(lo < 0) and torch.all(hi > 0)


def test_bad_input_errors():
    s = int_scheme(8, 0)
    with pytest.raises(LowbitError, match="method"):
        calibrate_range(torch.randn(4, 4), s, "entropy")
    with pytest.raises(LowbitError, match="percentile"):
        calibrate_range(torch.randn(4, 4), s, "percentile", percentile=30)
    with pytest.raises(LowbitError, match="NaN/inf"):
        calibrate_range(torch.tensor([[1.0, float("nan")]]), s, "kl")
    with pytest.raises(LowbitError, match="no data"):
        make_observer(s, "kl").compute()
    obs = make_observer(int_scheme(8, 4), "minmax")
    obs.update(torch.randn(2, 8))
    with pytest.raises(LowbitError, match="same units"):
        obs.update(torch.randn(3, 8))
    with pytest.raises(LowbitError, match="too large"):
        make_observer(int_scheme(8, 2), "kl", bins=4096).update(torch.randn(64, 256))
    with pytest.raises(LowbitError, match="min_ratio"):
        calibrate_range(torch.randn(4, 4), s, "mse", min_ratio=0.0)
