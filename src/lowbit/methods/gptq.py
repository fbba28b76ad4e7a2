"""GPTQ: layer-wise quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323 (2022), Algorithm 1; itself Optimal Brain
Quantization (Frantar & Alistarh, arXiv:2208.11580) with a fixed column order.

For a linear layer W (rows=out_features, cols=in_features) and calibration inputs X (cols, n),
minimise ||W X - Q X||^2 over grid points Q. With H = 2 X X^T / n (the loss's Hessian, the
same for every row), quantizing column j to q_j and spreading its error over the columns not yet
quantized, using the upper Cholesky factor U of H^-1 (H^-1 = U^T U):

    err_j        = (w_j - q_j) / U[j, j]                   (rows,)
    W[:, j+1:]  -= err_j  U[j, j+1:]                       rank-1 update
    loss        += sum over rows of err_j^2 / 2

Lazy batch updates (sec. 3 "Lazy Batch-Updates"): columns are processed in blocks of B; inside a
block the rank-1 updates touch only the block, and the rest of W gets one matmul per block:

    W[:, i2:] -= Err[:, i1:i2] @ U[i1:i2, i2:]             (rows, B) @ (B, cols - i2)

Details the paper and its reference code (IST-DASLab/gptq) fix, implemented here:
  * dampening: H += damp_percent * mean(diag H) * I before factorising; if Cholesky fails the
    damping grows x10 and the factorisation is retried (info["damp_retries"] says how often);
  * dead inputs (diag H == 0: an input column that calibration never activated) get H_jj = 1 and
    their weights set to 0, as the reference does (the product with a zero input is 0 anyway);
  * groups: qparams of a group are chosen from the *current*, error-updated weights when its
    first column is reached ("dynamic" groups, the reference's default). Groups are cut at
    multiples of group_size in processing order; when group_size does not divide cols the last
    group is shorter (576 = 4 x 128 + 64). The lazy block size is rounded to a multiple of the
    group size so each group lies inside one block and is read fully updated;
  * act-order (the reference's --act-order, GPTQModel's desc_act): columns are processed in order
    of descending diag(H), so the most-activated inputs are quantized first while more columns
    remain to absorb their error. With dynamic groups the groups follow the processing order and
    g_idx[c] = (position of column c in that order) // group_size; with static_groups=True the
    qparams are chosen up front on the original column groups (g_idx = c // group_size, so no
    g_idx is stored): llm-compressor's actorder="static", vLLM's fast path;
  * scales are rounded to `scale_dtype` (fp16, what every file format stores) *before* they are
    used, so the file reproduces exactly what the error compensation saw.

Pure tensor math: (W, H, scheme, config) in, QuantizedWeight out; the calibration loop
(lowbit.calibration) collects H and decides when to call this.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError, check_float_tensor
from lowbit.methods import register_method
from lowbit.methods.rtn import SCALE_DTYPES as _SCALE_DTYPES
from lowbit.methods.rtn import round_scale
from lowbit.numerics.affine import codec_for, qparam_shape
from lowbit.numerics.qweight import QuantizedWeight
from lowbit.numerics.ranges import mse_search
from lowbit.numerics.scheme import Scheme

# ggml types whose codes GPTQ can choose (numerics/ggml/grid.py)
GGML_GRID_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


@dataclass
class GPTQConfig:
    """damp_percent: fraction of mean(diag H) added to the diagonal (the paper's lambda, 0.01).
    block_size: lazy-batch width B (128 in the paper); rounded to a multiple of the group size.
    act_order: process columns by descending diag(H). static_groups: with act_order, choose group
    qparams up front on the original column order (no g_idx). scale_dtype: scales are rounded to
    it before use. max_damp_retries: Cholesky retries, damping x10 each time.
    clip: "minmax" (each group's full range, the paper's choice) or "mse": shrink each group's
    range by the ratio r in a geometric grid [clip_min_ratio, 1] (clip_grid points) that minimises
    sum_j diag(H)_j (w_j - q(w_j))^2 over the group, the input-importance weighting of llama.cpp's
    imatrix; GPTQModel's `mse` option searches the same ratios, unweighted."""
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    scale_dtype: str = "float16"
    max_damp_retries: int = 4
    clip: str = "minmax"
    clip_grid: int = 20
    clip_min_ratio: float = 0.75
    # ggml schemes only: "encoder" leaves llama.cpp's own encoding on tensors whose wanted k-quant was
    # swapped for a legacy fallback type (rows not a multiple of 256: Q4_K -> Q5_0, ...); see gptq_ggml.py
    ggml_fallback: str = "gptq"

    def __post_init__(self) -> None:
        if self.ggml_fallback not in ("gptq", "encoder"):
            raise LowbitError(f"gptq ggml_fallback: expected 'gptq' or 'encoder', got {self.ggml_fallback!r}")
        if self.clip not in ("minmax", "mse"):
            raise LowbitError(f"gptq clip: expected 'minmax' or 'mse', got {self.clip!r}")
        if not (isinstance(self.clip_grid, int) and self.clip_grid >= 1 and 0.0 < self.clip_min_ratio <= 1.0):
            raise LowbitError(f"gptq clip_grid / clip_min_ratio: expected an integer >= 1 and a ratio in "
                              f"(0, 1], got {self.clip_grid!r}, {self.clip_min_ratio!r}")
        if not (0.0 <= float(self.damp_percent) < 10.0):
            raise LowbitError(f"gptq damp_percent: expected a fraction in [0, 10), got {self.damp_percent!r}")
        if not (isinstance(self.block_size, int) and self.block_size > 0):
            raise LowbitError(f"gptq block_size: expected a positive integer, got {self.block_size!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise LowbitError(f"gptq scale_dtype: expected one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")


def check_scheme(scheme: Scheme, name: str = "layer") -> None:
    """GPTQ quantizes column by column, so each column must map to one qparam per row."""
    if scheme.granularity == "block" or (scheme.granularity == "channel" and scheme.axis != 0):
        raise LowbitError(f"{name}: gptq supports tensor, per-output-channel and group granularity, "
                          f"got {scheme.short_name()} ({scheme.granularity}, axis={scheme.axis})")
    if scheme.format in GGML_GRID_FORMATS:
        return                   # ggml blocks: methods/gptq_ggml.py
    if scheme.format not in ("int", "nf4", "fp4"):
        raise LowbitError(f"{name}: gptq needs a per-value grid format (int, nf4, fp4) or a ggml type "
                          f"({', '.join(GGML_GRID_FORMATS)}), got {scheme.format!r}")


def _qparams(w: torch.Tensor, scheme: Scheme, sdtype: torch.dtype, config: GPTQConfig | None = None,
             importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero) for the values of `w` along dim 1, one per row: (rows,), (rows,).
    importance (w.shape[1],): diag(H) of those columns, for clip="mse"."""
    mn, mx = w.aminmax(dim=1)
    if config is not None and config.clip == "mse":
        weights = None if importance is None else importance.float()[None, :].expand_as(w)
        mn, mx = mse_search(w, weights, mn, mx, scheme, grid=config.clip_grid, min_ratio=config.clip_min_ratio)
    scale, zero = codec_for(scheme).params(mn, mx, scheme)
    return round_scale(scale, sdtype), zero


@contextlib.contextmanager
def _one_thread():
    """The column sweep is ~10 small ops per column: run it on one thread. Intra-op threads buy
    little on (B, rows) slabs, and on a shared box every op waits for a descheduled peer thread
    (measured 5-10x slower with 2 threads than 1 under load, for the sweep and for the fp64
    Cholesky alike). The lazy block update, one large matmul, keeps every thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def zero_dead_weights(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor | None:
    """Dead inputs (diag H == 0: no calibration signal, nothing to compensate): W's columns zeroed
    in place, as the reference does; H is not written (the caller's Hessian, maybe shared by
    several calls): the reference's H_jj = 1 is hessian_inverse_cholesky(dead=) on the returned
    mask. -> the mask, or None when no input is dead."""
    dead = H.diagonal() == 0
    if not bool(dead.any()):
        return None
    W[:, dead] = 0.0
    return dead


def hessian_inverse_cholesky(H: torch.Tensor, damp_percent: float, max_retries: int = 4,
                             dead: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + damp I)^-1, in float64. -> (U, damp_percent used, retries).
    dead: a (cols,) mask whose diagonal entries count as 1 (zero_dead_weights); H is not written.

    Factorised in float64: for 1536 columns it costs ~0.1 s on two cores and removes the
    fp32 failures the reference works around with larger damping. Memory: the damped copy is
    the only (cols, cols) float64 temporary beside H (11008 columns: 0.97 GB each). It is made
    column-major, LAPACK's layout, so torch's out= runs the factorisation, the inverse and the
    second factorisation in place on it (the same LAPACK calls, the same values as three copies).
    """
    H = H.double()
    n = H.shape[0]
    mean_diag = None
    damp = float(damp_percent)
    for attempt in range(max_retries + 1):
        A = torch.empty_strided((n, n), (1, n), dtype=torch.float64)
        A.copy_(H)
        if dead is not None:
            A.diagonal()[dead] = 1.0
        if mean_diag is None:            # of the diagonal with dead entries at 1, as the reference
            mean_diag = float(A.diagonal().mean())
        A.diagonal().add_(damp * mean_diag)
        if _cholesky_(A, upper=False):
            A = _cholesky_inverse_(A)
            if _cholesky_(A, upper=True) and bool(torch.isfinite(A).all()):
                return A, damp, attempt
        del A
        damp = damp * 10.0 if damp > 0 else 1e-4
    raise LowbitError(f"gptq: the Hessian is not positive definite even with damp_percent={damp / 10:g} "
                      f"({max_retries} retries from {damp_percent:g}); the calibration inputs of this "
                      "layer are degenerate: use more / more varied calibration samples")


def _cholesky_(A: torch.Tensor, upper: bool) -> bool:
    """A's Cholesky factor written over A (column-major: LAPACK works in place, no copy).
    -> whether it succeeded."""
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(A, upper=upper, out=(A, info))
    return int(info) == 0


def _cholesky_inverse_(L: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 from the lower factor L, written over L."""
    return torch.cholesky_inverse(L, out=L)


def check_weight_hessian(weight: torch.Tensor, hessian: torch.Tensor, name: str) -> tuple[int, int]:
    """Finite float tensors, a 2-D weight and its (cols, cols) Hessian. -> (rows, cols)."""
    check_float_tensor(weight, name)
    check_float_tensor(hessian, f"{name} hessian")
    if weight.dim() != 2:
        raise LowbitError(f"{name}: expected a 2-D weight (out_features, in_features), got {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise LowbitError(f"{name}: hessian must be ({cols}, {cols}) for in_features={cols}, "
                          f"got {tuple(hessian.shape)}")
    return rows, cols


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, config: GPTQConfig,
                  name: str = "weight") -> QuantizedWeight:
    """Quantize `weight` (rows, cols) onto `scheme` given the input Hessian (cols, cols)."""
    check_scheme(scheme, name)
    rows, cols = check_weight_hessian(weight, hessian, name)
    sdtype = _SCALE_DTYPES[config.scale_dtype]
    codec = codec_for(scheme)
    W = weight.detach().float().clone()
    # Never written here (dead inputs go to hessian_inverse_cholesky as a mask), so no copy: the
    # caller's float64 Hessian is used as it is (11008 columns: 0.97 GB saved)
    H = hessian.detach().double()

    dead = zero_dead_weights(W, H)
    n_dead = 0 if dead is None else int(dead.sum())

    hdiag = H.diagonal().clone()         # input importance, for clip="mse" (original column order)
    if dead is not None:
        hdiag[dead] = 1.0
    grouped = scheme.granularity == "group"
    g = scheme.group_size if grouped else cols
    n_groups = scheme.n_groups(cols) if grouped else 1
    static = (not grouped) or config.static_groups

    # qparams chosen up front (per tensor, per channel, or static groups): (rows, n_groups)
    scale = torch.empty(rows, n_groups)
    zero = torch.empty(rows, n_groups)
    if not grouped:
        if scheme.granularity == "tensor":
            s, z = _qparams(W.reshape(1, -1), scheme, sdtype, config, hdiag.repeat(rows))
            scale[:], zero[:] = s, (z if z is not None else 0.0)
        else:
            s, z = _qparams(W, scheme, sdtype, config, hdiag)
            scale[:, 0], zero[:, 0] = s, (z if z is not None else 0.0)
    elif static:
        for k in range(n_groups):
            s, z = _qparams(W[:, k * g:(k + 1) * g], scheme, sdtype, config, hdiag[k * g:(k + 1) * g])
            scale[:, k], zero[:, k] = s, (z if z is not None else 0.0)
    has_zero = codec.params(torch.zeros(1), torch.ones(1), scheme)[1] is not None

    perm = None
    if config.act_order:
        perm = torch.argsort(hdiag, descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        dead = None if dead is None else dead[perm]
    hdiag_proc = hdiag if perm is None else hdiag[perm]
    # group of each column in processing order
    orig_col = perm if perm is not None else torch.arange(cols)
    gid_proc = (orig_col // g) if static else (torch.arange(cols) // g)
    if not grouped:
        gid_proc = torch.zeros(cols, dtype=torch.long)

    with _one_thread():   # fp64 LAPACK on <= a few thousand columns: threads only add waiting
        U64, damp_used, retries = hessian_inverse_cholesky(H, config.damp_percent, config.max_damp_retries,
                                                           dead=dead)
    U = U64.float()
    del H, U64

    # lazy block width: a multiple of g for dynamic groups, so a group never straddles two blocks
    bs = config.block_size
    if not static:
        bs = g * max(1, bs // g)
    # Work on W^T (cols, rows): a column of W is then one contiguous row, and the rank-1 update
    # of the rest of the block touches one contiguous (B - i, rows) slab (3x faster on CPU than
    # updating a strided column slice of W).
    Wt = W.t().contiguous()
    del W
    codes_t = torch.empty(cols, rows, dtype=torch.uint8)
    losses = torch.zeros(rows, dtype=torch.float64)
    zcol = None
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = Wt[i1:i2].clone()                   # (B, rows) updated column by column
        Err1 = torch.empty_like(W1)              # (B, rows) scaled errors, for the block update
        U1 = U[i1:i2, i1:i2]
        if static:
            S1, Z1 = scale[:, gid_proc[i1:i2]].t(), zero[:, gid_proc[i1:i2]].t()
        with _one_thread():
            for i in range(i2 - i1):
                j = i1 + i
                if static:
                    scol, zcol = S1[i], (Z1[i] if has_zero else None)
                elif j % g == 0:
                    # dynamic group: its columns are all in this block and fully updated
                    s, z = _qparams(W1[i:i + g].t(), scheme, sdtype, config, hdiag_proc[j:j + g])
                    scale[:, j // g] = s
                    scol = s
                    if z is not None:
                        zero[:, j // g] = z
                        zcol = z
                w = W1[i]
                c = codec.encode(w, scol, zcol, scheme)
                codes_t[j] = c
                err = (w - codec.decode(c, scol, zcol, scheme)).div_(U1[i, i])
                Err1[i] = err
                if i + 1 < i2 - i1:
                    W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)
        losses += Err1.double().square().sum(dim=0) / 2
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)
    codes = codes_t.t()

    g_idx = None
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
        if grouped and not static:
            g_idx = torch.empty(cols, dtype=torch.int32)
            g_idx[perm] = (torch.arange(cols) // g).to(torch.int32)
    qshape = qparam_shape((rows, cols), scheme)
    info = {"loss": float(losses.sum()), "damp_percent": damp_used, "damp_retries": retries,
            "n_dead_inputs": n_dead, "act_order": bool(config.act_order),
            "static_groups": bool(config.static_groups and grouped), "loss_per_row": losses.float()}
    if scheme.ragged_groups(cols):
        info["ragged_last_group"] = scheme.ragged_groups(cols)
    return QuantizedWeight(codes.contiguous(), scale.reshape(qshape), zero.reshape(qshape) if has_zero else None,
                           scheme, g_idx=g_idx, info=info)


@register_method("gptq", GPTQConfig, needs=("hessian",))
def gptq(weight: torch.Tensor, scheme: Scheme, config: GPTQConfig, stats: dict) -> QuantizedWeight:
    if not stats or "hessian" not in stats:
        raise LowbitError("gptq: needs stats['hessian'] (cols, cols) from calibration")
    if scheme.format in GGML_GRID_FORMATS:
        from lowbit.methods.gptq_ggml import gptq_ggml_quantize
        return gptq_ggml_quantize(weight, stats["hessian"], scheme, config, stats.get("imatrix"))
    return gptq_quantize(weight, stats["hessian"], scheme, config)


# the calibration loop may solve linears that share an input (and H) as one row-stacked matrix
gptq.row_separable = True
gptq.check_scheme = check_scheme
