"""GPTQ's output error for a scheme, estimated without running GPTQ's column sweep.

GPTQ (arXiv:2210.17323; OBQ, arXiv:2208.11580) quantizes column j of W, in processing order, with
error err_j = (w_j - q_j) / U_jj (U the upper Cholesky factor of H^-1) and its loss is
sum_j err_j^2 / 2. With rounding errors spread uniformly over one grid step D (E[(w - q)^2] =
D^2 / 12), the expected loss of row r is

    loss_r ~= sum_j D_{r, group(j)}^2 / (24 U_jj^2)

D from the group's range in the original weights, (max - min) / (2^b - 1) (2 absmax / (2^b - 1)
symmetric), groups cut in processing order (act-order: columns by descending diag H, GPTQ's
dynamic groups). The error updates change the ranges GPTQ sees and the MSE range search shrinks
them, so the estimate is scaled per module by kappa = (real error of one anchor candidate solved
by GPTQ) / (its estimate): one GPTQ sweep per group, whatever the number of candidates.

Pure tensor math: (W, H, scheme, act_order, damp) in, per-row estimate out.
"""
from __future__ import annotations

import torch

from lowbit.numerics.scheme import Scheme


def inverse_diag(H: torch.Tensor, act_order: bool, damp_percent: float = 0.01) -> torch.Tensor:
    """1 / U_jj^2 per column, in the original column order, and the processing order."""
    from lowbit.methods.gptq import hessian_inverse_cholesky
    H = H.double().clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(H.shape[0])
    U, _, _ = hessian_inverse_cholesky(H[perm][:, perm], damp_percent)
    d = torch.empty(H.shape[0], dtype=torch.float64)
    d[perm] = 1.0 / U.diagonal().square()
    d[dead] = 0.0
    return d, perm


def estimated_row_loss(W: torch.Tensor, d: torch.Tensor, perm: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """(rows,) expected GPTQ loss per row (module docstring), float64."""
    rows, cols = W.shape
    Wp = W.double()[:, perm]
    dp = d[perm]
    levels = (1 << scheme.bits) - 1
    if scheme.granularity == "group":
        g = scheme.group_size
        ng = -(-cols // g)
        pad = ng * g - cols
        if pad:                                       # repeat the last column: max/min unchanged
            Wp = torch.cat([Wp, Wp[:, -1:].expand(rows, pad)], 1)
        Wg = Wp.reshape(rows, ng, g)
    else:                                             # per channel (tensor: one group of everything)
        Wg = Wp.reshape(rows, 1, cols) if scheme.granularity == "channel" else Wp.reshape(1, 1, -1).expand(rows, 1, -1)
        g = Wg.shape[-1]
    if scheme.symmetric:
        step = 2 * Wg.abs().amax(-1) / levels
    else:
        step = (Wg.amax(-1) - Wg.amin(-1)) / levels                # (rows, ng)
    step2 = step.square().repeat_interleave(g, dim=1)[:, :cols]    # (rows, cols) in processing order
    return (step2 * dp).sum(1) / 24.0
