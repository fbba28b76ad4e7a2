"""Range calibration: choose the clipping range (min_val, max_val) per quantization unit.

    calibrate_range(x, scheme, "minmax" | "percentile" | "mse" | "kl", **options) -> (min_val, max_val)
    obs = make_observer(scheme, "kl"); obs.update(batch) ...; min_val, max_val = obs.compute()

Both return tensors shaped qparam_shape (one entry per tensor / channel / group / block) that go
straight into affine.qparams_from_range(min_val, max_val, scheme). The methods:

    minmax      the observed min and max (nothing clipped)
    percentile  the p-th and (100-p)-th percentiles of the values (default p = 99.99)
    mse         min over shrink ratios r on a geometric grid (1 down to `min_ratio`, 0.01) of the quantization MSE
                with range (r*min, r*max), per unit, through the scheme's real codec
                (the search AWQ's auto_clip and llm-compressor's MSE observer also do)
    kl          TensorRT's entropy calibration (Migacz 2017, "8-bit Inference with TensorRT",
                GTC): histogram |x|; for each candidate threshold t, clip the histogram at t, merge
                it into the format's number of positive levels, and keep the t whose merged
                distribution Q is closest to the clipped reference P in KL(P || Q). Symmetric:
                the range is (-t, t), intersected with the observed (min, max).

One-shot calls use the exact values (percentile by kthvalue, MSE on the values themselves).
Streams (observers) keep a per-unit histogram of 2*bins bins over [-A, A], where A is a power-of-2
multiple of the first batch's absmax: when a later batch exceeds A, A doubles as often as needed
and every 2^k old bins merge into one new bin: each new bin is a union of whole old bins, so no count
is split or smeared (re-binning is exact up to float rounding at bin edges). Percentile,
MSE and KL then read that histogram (MSE treats each bin's centre as its values).
"""
from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError, check_float_tensor
from lowbit.numerics.affine import as_units, codec_for, qparam_shape, unit_minmax
from lowbit.numerics.scheme import Scheme

METHODS = ("minmax", "percentile", "mse", "kl")
_MAX_HIST_CELLS = 1 << 25  # units x bins: 256 MiB of float64 counts; beyond, ask for fewer bins


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
def _check_percentile(p: float) -> float:
    if not (isinstance(p, (int, float)) and 50.0 < p <= 100.0):
        raise LowbitError(f"percentile: expected a number in (50, 100], got {p!r}")
    return float(p)


def positive_levels(scheme: Scheme) -> int:
    """How many quantization levels the format has on one side of zero (KL's merge target)."""
    return {"nf4": 8, "fp4": 7, "ternary": 1}.get(scheme.format, 1 << (scheme.code_bits - 1))


def mse_search(values: torch.Tensor, weights: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor,
               scheme: Scheme, grid: int = 100, min_ratio: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit range (r*lo, r*hi) minimising sum(weights * (v - q(v))^2) over r in a grid.

    values (U, L) one row per unit; weights (U, L) or None (all 1); lo, hi (U,). The grid loop
    runs over ratios, every unit at once. Ties keep the larger ratio (less clipping).
    """
    if not (isinstance(grid, int) and grid >= 1):
        raise LowbitError(f"grid: expected a positive integer, got {grid!r}")
    if not (0.0 < min_ratio <= 1.0):
        raise LowbitError(f"min_ratio: expected a number in (0, 1], got {min_ratio!r}")
    codec = codec_for(scheme)
    best_err = torch.full_like(lo, float("inf"), dtype=torch.float64)
    best_r = torch.ones_like(lo)
    # geometric grid 1 = r_0 > r_1 > ... > r_{grid-1} = min_ratio: equal relative steps, so a
    # deep search (outliers 20x the bulk) still probes finely near r = 1
    for r in torch.logspace(0.0, math.log10(min_ratio), grid, dtype=torch.float64).tolist():
        scale, zero = codec.params(lo * r, hi * r, scheme)
        s, z = scale[:, None], None if zero is None else zero[:, None]
        err = (values - codec.decode(codec.encode(values, s, z, scheme), s, z, scheme)) ** 2
        if weights is not None:
            err = err * weights
        err = err.sum(dim=1, dtype=torch.float64)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return lo * best_r, hi * best_r


def kl_threshold(hist_abs: torch.Tensor, bin_width: torch.Tensor, levels: int,
                 candidates: int = 256) -> torch.Tensor:
    """TensorRT-style entropy calibration on per-unit histograms of |x|.

    hist_abs (U, B) counts of |x| in bins of width bin_width (U,) starting at 0. For each
    candidate edge i (bins [0, i) kept, `candidates` of them evenly spaced in [levels, B]):
        P = hist[:i], with everything beyond added to bin i-1      (the clipped reference)
        Q = hist[:i] (without that tail) merged into `levels` equal chunks, each chunk's mass
            spread evenly over the bins where P is non-zero         (what the grid can express)
        KL(P || Q) on the normalised distributions, both smoothed (empty bins get 1e-4 counts)
    Returns the per-unit threshold i * bin_width of the smallest KL (ties: the larger i).
    """
    U, B = hist_abs.shape
    h = hist_abs.double()
    tail = h.flip(-1).cumsum(-1).flip(-1)                       # tail[:, i] = sum h[:, i:]
    edges = torch.linspace(min(levels, B), B, min(candidates, B - min(levels, B) + 1)).round().long().unique()
    best_kl = torch.full((U,), float("inf"), dtype=torch.float64)
    best_i = torch.full((U,), B, dtype=torch.long)
    for i in edges.tolist():
        p = h[:, :i].clone()
        if i < B:
            p[:, -1] += tail[:, i]
        chunk = torch.arange(i) * levels // i                   # bin -> chunk index
        nz = (p > 0).double()
        # Q is merged from the histogram *without* the clipped tail (as TensorRT / MXNet do), so
        # the clipped mass that P piles into its last bin is what Q fails to express.
        mass = torch.zeros(U, levels, dtype=torch.float64).index_add_(1, chunk, h[:, :i])
        count = torch.zeros(U, levels, dtype=torch.float64).index_add_(1, chunk, nz)
        q = (mass / count.clamp(min=1))[:, chunk] * nz
        p, q = _smooth(p), _smooth(q)
        pn, qn = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
        kl = (pn * torch.log(pn / qn)).sum(1)
        better = kl <= best_kl
        best_kl = torch.where(better, kl, best_kl)
        best_i = torch.where(better, torch.full_like(best_i, i), best_i)
    return best_i.double() * bin_width.double()


def _smooth(counts: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Give empty bins `eps` counts, taken evenly from the non-empty ones (MXNet's
    _smooth_distribution, the reference for TensorRT's method), so KL stays finite when Q is
    empty where P is not (a clipped tail landing in an otherwise empty last bin)."""
    zero = counts == 0
    n_zero = zero.sum(1, keepdim=True).double()
    n_nonzero = (~zero).sum(1, keepdim=True).double().clamp(min=1)
    return torch.where(zero, torch.full_like(counts, eps), counts - eps * n_zero / n_nonzero)


# ---------------------------------------------------------------------------------------------
# One-shot: a single tensor
# ---------------------------------------------------------------------------------------------
def calibrate_range(x: torch.Tensor, scheme: Scheme, method: str = "minmax", *, percentile: float = 99.99,
                    grid: int = 100, min_ratio: float = 0.01, bins: int = 2048,
                    kl_candidates: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range `method` chooses for x under `scheme`, shaped qparam_shape.

    Ragged last groups are seen through affine.as_units (their last value repeated to fill the
    group), which leaves min/max unchanged and weights one value a little more in the searches.
    """
    check_float_tensor(x, "x")
    if method not in METHODS:
        raise LowbitError(f"method: expected one of {METHODS}, got {method!r}")
    x = x.detach().float()
    qs = qparam_shape(tuple(x.shape), scheme)
    mn, mx = unit_minmax(x, scheme)
    if method == "minmax":
        return mn, mx
    u = as_units(x, scheme)                                     # (U, L)
    if method == "percentile":
        p = _check_percentile(percentile)
        L = u.shape[1]
        k_hi = max(1, min(L, math.ceil(p / 100.0 * L)))
        k_lo = max(1, min(L, L + 1 - k_hi))
        lo = torch.kthvalue(u, k_lo, dim=1).values
        hi = torch.kthvalue(u, k_hi, dim=1).values
        return lo.reshape(qs), hi.reshape(qs)
    if method == "mse":
        lo, hi = mse_search(u, None, mn.reshape(-1), mx.reshape(-1), scheme, grid, min_ratio)
        return lo.reshape(qs), hi.reshape(qs)
    obs = HistogramObserver(scheme, "kl", bins=bins, kl_candidates=kl_candidates)
    return obs.update(x).compute()


# ---------------------------------------------------------------------------------------------
# Streams: observers
# ---------------------------------------------------------------------------------------------
class MinMaxObserver:
    """Running per-unit min and max over every tensor passed to update()."""
    method = "minmax"

    def __init__(self, scheme: Scheme):
        self.scheme = scheme
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self._qshape: tuple[int, ...] | None = None
        self.n_updates = 0

    def _units(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor(x, f"{type(self).__name__}.update(x)")
        x = x.detach().float()
        qs = qparam_shape(tuple(x.shape), self.scheme)
        if self._qshape is None:
            self._qshape = qs
        elif qs != self._qshape:
            raise LowbitError(f"{type(self).__name__}.update: tensor of shape {tuple(x.shape)} gives "
                              f"qparam shape {qs} under {self.scheme.short_name()}, but earlier "
                              f"batches gave {self._qshape}; a stream must keep the same units")
        return as_units(x, self.scheme)

    def update(self, x: torch.Tensor) -> "MinMaxObserver":
        u = self._units(x)
        mn, mx = u.amin(dim=1), u.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = mn, mx
        else:
            self.min_val = torch.minimum(self.min_val, mn)
            self.max_val = torch.maximum(self.max_val, mx)
        self.n_updates += 1
        return self

    def _need_data(self) -> None:
        if self.n_updates == 0:
            raise LowbitError(f"{type(self).__name__}.compute: no data; call update(x) first")

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._need_data()
        return self.min_val.reshape(self._qshape), self.max_val.reshape(self._qshape)


class HistogramObserver(MinMaxObserver):
    """Per-unit histogram over [-A, A] (2*bins bins, A a power-of-2 multiple of the first absmax),
    read by the percentile, mse or kl method (module docstring)."""

    def __init__(self, scheme: Scheme, method: str = "kl", *, bins: int = 2048, percentile: float = 99.99,
                 grid: int = 100, min_ratio: float = 0.01, kl_candidates: int = 256):
        super().__init__(scheme)
        if method not in ("percentile", "mse", "kl"):
            raise LowbitError(f"HistogramObserver.method: expected percentile|mse|kl, got {method!r}")
        if not (isinstance(bins, int) and bins >= 8):
            raise LowbitError(f"bins: expected an integer >= 8, got {bins!r}")
        self.method, self.bins = method, bins
        self.percentile = _check_percentile(percentile) if method == "percentile" else percentile
        self.grid, self.min_ratio, self.kl_candidates = grid, min_ratio, kl_candidates
        self.absmax_edge: torch.Tensor | None = None            # A per unit
        self.hist: torch.Tensor | None = None                   # (U, 2*bins) float64 counts

    def update(self, x: torch.Tensor) -> "HistogramObserver":
        u = self._units(x)
        U, B = u.shape[0], self.bins
        if U * 2 * B > _MAX_HIST_CELLS:
            raise LowbitError(f"{self.method} calibration: {U} units x {2 * B} bins is too large a "
                              f"histogram; use fewer bins (bins=...) or a coarser granularity than "
                              f"{self.scheme.short_name()}")
        super().update(x)
        amax = u.abs().amax(dim=1)
        if self.hist is None:
            self.absmax_edge = torch.where(amax > 0, amax, torch.ones_like(amax)).double()
            self.hist = torch.zeros(U, 2 * B, dtype=torch.float64)
        else:
            self._grow(amax.double())
        width = self.absmax_edge / B                             # (U,)
        idx = torch.floor((u.double() + self.absmax_edge[:, None]) / width[:, None]).long().clamp(0, 2 * B - 1)
        self.hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        return self

    def _grow(self, amax: torch.Tensor) -> None:
        """Double A until it covers amax; merge old bins exactly (bin edges stay on the grid)."""
        ratio = (amax / self.absmax_edge).clamp(min=1.0)
        k = torch.ceil(torch.log2(ratio) - 1e-12).clamp(min=0).long()
        if not bool((k > 0).any()):
            return
        B = self.bins
        j = torch.arange(2 * B)
        # old bin j covers [(j - B) w, (j - B + 1) w); new width w 2^k: new bin (j - B) // 2^k + B
        new_idx = torch.div(j[None, :] - B, (1 << k)[:, None], rounding_mode="floor") + B
        grown = torch.zeros_like(self.hist).scatter_add_(1, new_idx.clamp(0, 2 * B - 1), self.hist)
        self.hist = grown
        self.absmax_edge = self.absmax_edge * (2.0 ** k).double()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._need_data()
        mn, mx = self.min_val.double(), self.max_val.double()
        B, A, h = self.bins, self.absmax_edge, self.hist
        width = A / B
        if self.method == "percentile":
            cdf = h.cumsum(1)
            total = cdf[:, -1:]
            q = self.percentile / 100.0
            j_hi = torch.searchsorted(cdf, total * q).clamp(max=2 * B - 1).squeeze(1)
            j_lo = torch.searchsorted(cdf, total * (1.0 - q), right=True).clamp(max=2 * B - 1).squeeze(1)
            hi = (j_hi - B + 1).double() * width                # right edge of the p-th bin
            lo = (j_lo - B).double() * width                    # left edge of the (100-p)-th bin
        elif self.method == "mse":
            centres = (torch.arange(2 * B).double()[None, :] - B + 0.5) * width[:, None]
            lo, hi = mse_search(centres.float(), h.float(), mn.float(), mx.float(), self.scheme,
                                self.grid, self.min_ratio)
            lo, hi = lo.double(), hi.double()
        else:
            hist_abs = h[:, B:] + h[:, :B].flip(-1)              # fold: bin B+i and B-1-i hold |x| in [i w, (i+1) w)
            t = kl_threshold(hist_abs, width, positive_levels(self.scheme), self.kl_candidates)
            lo, hi = -t, t
        # never beyond what was observed; a degenerate pick (hi < lo) falls back to lo
        lo = torch.maximum(lo, mn)
        hi = torch.maximum(torch.minimum(hi, mx), lo)
        return lo.float().reshape(self._qshape), hi.float().reshape(self._qshape)


def make_observer(scheme: Scheme, method: str = "minmax", **options) -> MinMaxObserver:
    """An observer for a stream of tensors: update(x) for each, then compute() -> (min_val, max_val)."""
    if method not in METHODS:
        raise LowbitError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "minmax":
        if options:
            raise LowbitError(f"minmax observer takes no options, got {sorted(options)}")
        return MinMaxObserver(scheme)
    return HistogramObserver(scheme, method, **options)
