"""The weighted scale searches of ggml's quantizers, vectorised over blocks.

Each function is the numpy counterpart of one helper in llama.cpp's ggml/src/ggml-quants.c
(k-quants by Iwan Kawrakow, llama.cpp PR #1684, and the imatrix variants of PR #4861): same grid
of trial scales, same least-squares refit, same acceptance tests, same float32 rounding, so codes
and scales are bit-identical to ggml's. The per-block loops of the C code become loops over the
small fixed search grid (or over the 16/32 elements of a coordinate-descent pass), each step
vectorised over all blocks at once.

Layout: element-major. x, w are float32 (n, n_blocks), n = 16 or 32 weights per (sub-)block;
codes come back as float32 (n, n_blocks) arrays of small integers, per-block values as (n_blocks,).

    make_qx_quants   symmetric  x ~ scale * (L - nmax),       L in [0, 2 nmax)      Q3_K/Q6_K/Q4_0/Q5_0
    make_q3_quants   symmetric, 5 passes of coordinate descent weighted by x^2      Q3_K (no imatrix)
    make_qkx_quants  asymmetric x ~ scale * L - the_min,      L in [0, nmax]        Q2_K/Q4_K/Q5_K/Q4_1/Q5_1
    make_qp_quants   positive   x ~ scale * L,                L in [0, nmax]        quantizing the scales
"""
from __future__ import annotations

import numpy as np

from lowbit.numerics.ggml.types import F32, GROUP_MAX_EPS, as_u8, nearest_int, safe_div, seq_sum


def signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max) over axis 0: the largest |x| per block and the signed value holding it (first
    one on ties, as the C loop `if (ax > amax)` keeps)."""
    idx = np.abs(x).argmax(axis=0)
    mx = np.take_along_axis(x, idx[None, :], axis=0)[0]
    return np.abs(mx), mx


def _weights(x: np.ndarray, rmse_type: int, qw: np.ndarray | None) -> np.ndarray:
    if qw is not None:
        return qw
    if rmse_type == 1:
        return x * x
    if rmse_type == 2:
        return np.ones_like(x)
    if rmse_type == 3:
        return np.abs(x)
    return np.sqrt(np.abs(x))


def make_qx_quants(x: np.ndarray, nmax: int, rmse_type: int = 1,
                   qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes L in [0, 2*nmax) with x ~ scale * (L - nmax); -> (scale, L).

    rmse_type 1 weights the fit by qw (imatrix) or, without one, by x^2. The start is
    scale = -max/nmax; 18 more trial inverse scales -(nmax + 0.1 k)/max, k = -9..9 (k != 0), are
    tried and the least-squares scale of the best one (largest sumlx^2 / suml2) is kept.
    """
    _, mx = signed_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx).astype(F32)
    lo, hi = F32(-nmax), F32(nmax - 1)
    iscale = F32(-nmax) / mxs
    if rmse_type == 0:
        L = np.clip(nearest_int(iscale * x), lo, hi) + F32(nmax)
        return np.where(zero, F32(0), F32(1) / iscale), np.where(zero, F32(0), L)
    w = _weights(x, rmse_type, qw)
    l = np.clip(nearest_int(iscale * x), lo, hi)
    L = l + F32(nmax)
    sumlx, suml2 = seq_sum(w * x * l), seq_sum(w * l * l)
    scale = safe_div(sumlx, suml2, suml2 != 0)
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(k)) / mxs
        l = np.clip(nearest_int(iscale * x), lo, hi)
        slx, sl2 = seq_sum(w * x * l), seq_sum(w * l * l)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        if better.any():
            L = np.where(better, l + F32(nmax), L)
            scale = np.where(better, safe_div(slx, sl2, better), scale)
            best = np.where(better, scale * slx, best)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero, F32(0), L)


def make_q3_quants(x: np.ndarray, nmax: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K's reference search (do_rmse=true): round at -max/nmax, then up to 5 passes of
    coordinate descent on each code, accepting a change when it raises sumlx^2/suml2 (weights x^2).
    -> (scale, L in [0, 2*nmax))."""
    _, mx = signed_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx).astype(F32)
    lo, hi = F32(-nmax), F32(nmax - 1)
    L = np.clip(nearest_int((F32(-nmax) / mxs) * x), lo, hi)
    w = x * x
    sumlx, suml2 = seq_sum(w * x * L), seq_sum(w * L * L)
    _coordinate_descent(x, w, L, sumlx, suml2, lo, hi, qp_rules=False)
    scale = safe_div(sumlx, suml2, suml2 > 0)
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), L + F32(nmax))


def _coordinate_descent(x, w, L, sumlx, suml2, lo, hi, qp_rules: bool) -> None:
    """In place: ggml's 5-pass greedy refinement of codes L (n, nb) and the running sums.

    For element i: remove it from the sums, take the code that is optimal for the remaining
    scale, keep it when sumlx^2/suml2 grows. A block whose pass changed nothing is at a fixed
    point (the next pass would repeat it exactly), so looping all blocks 5 times equals ggml's
    per-block early exit. qp_rules: make_qp_quants' variant (needs sl2 > 0 up front; codes are
    stored as uint8, so a negative code wraps in L while the sums keep the signed value).
    """
    n = x.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(5):
            changed = np.zeros(x.shape[1], dtype=bool)
            for i in range(n):
                wi, xi, Li = w[i], x[i], L[i]
                slx = sumlx - wi * xi * Li
                sl2 = suml2 - wi * Li * Li
                ok = (slx > 0) & (sl2 > 0) if qp_rules else slx > 0
                new_l = np.clip(nearest_int(xi * sl2 / np.where(ok, slx, F32(1))), lo, hi)
                ok &= new_l != Li
                slx = slx + wi * xi * new_l
                sl2 = sl2 + wi * new_l * new_l
                if qp_rules:
                    accept = ok & (slx * slx * suml2 > sumlx * sumlx * sl2)
                else:
                    accept = ok & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                if accept.any():
                    L[i] = np.where(accept, as_u8(new_l) if qp_rules else new_l, Li)
                    sumlx[:] = np.where(accept, slx, sumlx)
                    suml2[:] = np.where(accept, sl2, suml2)
                    changed |= accept
            if not changed.any():
                break


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, flat_if_le: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric codes L in [0, nmax] with x ~ scale * L - the_min (the_min >= 0).

    ggml's make_qkx2_quants (flat_if_le=False) / make_qkx3_quants (flat_if_le=True; its caller
    passes w = x^2 when it has no weights): start from min/max rounding, then for each trial
    inverse scale (rmin + rdelta*k + nmax)/(max - min), k = 0..nstep, round, refit scale and min by
    weighted least squares (min clamped to <= 0) and keep it if the weighted error (|d| when
    use_mad, else d^2) is smaller. Note ggml reuses the *current best* min in later trials, both
    in the span and as the rounding offset. -> (scale (nb,), the_min (nb,), L (n, nb)).
    """
    mn = np.minimum(x.min(axis=0), F32(0))
    mx = x.max(axis=0)
    sum_w, sum_x = seq_sum(w), seq_sum(w * x)
    flat = (mx <= mn) if flat_if_le else (mx == mn)
    mx = np.where(flat, mn + F32(1), mx).astype(F32)   # flat blocks: any finite span; masked below
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    L = np.clip(nearest_int(iscale * (x - mn)), F32(0), F32(nmax))
    d = scale * L + mn - x
    best = seq_sum(w * (np.abs(d) if use_mad else d * d))
    if nstep >= 1:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for k in range(nstep + 1):
                iscale = (F32(rmin) + F32(rdelta) * F32(k) + F32(nmax)) / (mx - mn)
                la = np.clip(nearest_int(iscale * (x - mn)), F32(0), F32(nmax))
                wl = w * la
                sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * la), seq_sum(wl * x)
                D = sum_w * sum_l2 - sum_l * sum_l
                pos = D > 0
                Ds = np.where(pos, D, F32(1))
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
                clamp = this_min > 0
                this_min = np.where(clamp, F32(0), this_min)
                this_scale = np.where(clamp, sum_xl / np.where(sum_l2 != 0, sum_l2, F32(1)), this_scale)
                d = this_scale * la + this_min - x
                cur = seq_sum(w * (np.abs(d) if use_mad else d * d))
                better = pos & (cur < best)
                if better.any():
                    L = np.where(better, la, L)
                    best = np.where(better, cur, best)
                    scale = np.where(better, this_scale, scale)
                    mn = np.where(better, this_min, mn).astype(F32)
    scale = np.where(flat, F32(0), scale).astype(F32)
    L = np.where(flat, F32(0), L)
    return scale, (-mn).astype(F32), L


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes for non-negative values (the sub-block scales and mins of a super-block):
    x ~ scale * L, L in [0, nmax], weighted by qw (the sub-blocks' summed importance).

    Tries inverse scales (nmax + 0.1 k)/max, k = -4..4, by weighted squared error, then 5 passes
    of coordinate descent. Codes are stored as uint8 in ggml, so a negative code wraps (kept).
    -> (scale (nb,), L (n, nb))."""
    mx = np.maximum(x.max(axis=0), F32(0))
    zero = mx < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx).astype(F32)
    iscale = F32(nmax) / mxs
    L = as_u8(nearest_int(iscale * x))
    d = x - (F32(1) / iscale) * L
    best = seq_sum(qw * d * d)
    for k in range(-4, 5):
        if k == 0:
            continue
        iscale_k = (F32(0.1) * F32(k) + F32(nmax)) / mxs
        l = np.minimum(F32(nmax), nearest_int(iscale_k * x))
        d = x - (F32(1) / iscale_k) * l
        mse = seq_sum(qw * d * d)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_k, iscale)
    l = np.minimum(F32(nmax), nearest_int(iscale * x))
    sumlx, suml2 = seq_sum(qw * x * l), seq_sum(qw * l * l)
    L = as_u8(l)
    _coordinate_descent(x, qw, L, sumlx, suml2, F32(-np.inf), F32(nmax), qp_rules=True)
    scale = safe_div(sumlx, suml2, suml2 > 0)
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), L)
