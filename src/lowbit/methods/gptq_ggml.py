"""GPTQ with ggml's block encoders as the quantizer: GGUF files (Q2_K..Q6_K, Q4_0/Q5_0/Q8_0, ...)
whose codes carry GPTQ's second-order error compensation.

GPTQ (arXiv:2210.17323, see gptq.py) needs, for each column, "round this value onto the grid";
a ggml block fixes its grid per block of B columns (32, or a 256-column super-block with 16/32-
column sub-blocks). So, for each block of B columns of W (all rows at once), in column order:

    1. encode the block's *current*, error-updated weights with llama.cpp's encoder, weighted by
       the input importance (the imatrix when given, else diag(H), the same statistic: mean x^2
       per input column): this fixes d, dmin and the sub-block scales, as llama-quantize would;
    2. read that block's grid off the bytes (grid.affine: x = a*q + b per weight);
    3. sweep its B columns one by one as GPTQ does: q_j = clip(round((w_j - b_j) / a_j)),
       err_j = (w_j - a_j q_j - b_j) / U[j, j], update the block's later columns by err_j U[j, j+1:];
    4. write the chosen codes into the block (grid.with_codes: the scales stay the encoder's),
       and push the block's errors onto every later column with one matmul (lazy batch update).

The result is a valid block of the same type and size as llama.cpp's, so llama.cpp reads it
unchanged; only the codes (and, through the updates, the scales of later blocks) differ.
Finally each row keeps whichever of (GPTQ's row, llama.cpp's own encoding of the original row)
has the lower proxy loss (w - q)^T H (w - q): rows are independent in the file, so the result is
never worse than the encoder alone on the calibration statistics. (It matters where the float
weights already lie on a ggml grid, as SmolLM2's lie on Q4_1's: Q4_K re-encodes those nearly
exactly and GPTQ's updates would move them off it.)
Column order is the storage order (act-order would need a permutation GGUF cannot hold).

`ggml_fallback="encoder"` (presets `<mix>-gptqk`) runs GPTQ only where the mix's k-quant is really
used and leaves llama.cpp's encoding on the legacy types a k-quant falls back to (rows that are not
a multiple of 256). Measured on SmolLM2 (BENCHMARKS.md "GGUF fed by GPTQ"): GPTQ on its Q4_0
fallbacks raised perplexity without lowering KL, while GPTQ on its Q3_K tensors lowered both.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.errors import LowbitError, check_float_tensor


def gptq_ggml_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme, config, imatrix=None,
                       name: str = "weight"):
    from lowbit.methods.ggml import resolve_type
    from lowbit.methods.gptq import _one_thread, hessian_inverse_cholesky, zero_dead_weights
    from lowbit.numerics.ggml import quantize
    from lowbit.numerics.ggml.grid import affine, code_span, with_codes
    from lowbit.numerics.ggml.types import ggml_type
    from lowbit.numerics.ggml.weight import GGMLWeight

    check_float_tensor(weight, name)
    check_float_tensor(hessian, f"{name} hessian")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise LowbitError(f"{name}: hessian must be ({cols}, {cols}), got {tuple(hessian.shape)}")
    if config.act_order:
        raise LowbitError(f"{name}: gptq act_order with a ggml type: GGUF stores columns in order "
                          "(no g_idx); drop -actorder")
    wanted, used = resolve_type(scheme, cols, name)
    t = ggml_type(used)
    if used != wanted and config.ggml_fallback == "encoder":
        from lowbit.methods.ggml import GGMLConfig, ggml
        qw = ggml(weight, scheme, GGMLConfig(), {"imatrix": imatrix} if imatrix is not None else None)
        qw.info["gptq"] = "skipped: fallback type (ggml_fallback='encoder')"
        return qw
    if used in ("F16", "F32", "BF16"):      # no ggml block fits these rows: stays float
        return GGMLWeight(torch.from_numpy(quantize(weight.float().numpy(), used)), used, (rows, cols), wanted,
                          {"ggml_type": used, "ggml_wanted": wanted})
    span = code_span(used)
    B = t.block_size
    W = weight.detach().float().clone()
    H = hessian.detach().double()         # the caller's, read only: no float64 copy (0.97 GB at 11008)
    H0 = hessian.detach().float()
    dead = zero_dead_weights(W, H)        # dead inputs count as H_jj = 1, passed as a mask
    n_dead = 0 if dead is None else int(dead.sum())
    if imatrix is not None:
        imp = np.asarray(imatrix, dtype=np.float32)
    else:
        hd = H.diagonal().clone()
        if dead is not None:
            hd[dead] = 1.0
        imp = (hd / max(1.0, float(hd.mean()))).float().numpy()
    with _one_thread():
        U64, damp_used, retries = hessian_inverse_cholesky(H, config.damp_percent, config.max_damp_retries,
                                                           dead=dead)
    U = U64.float()
    del H, U64
    Wt = W.t().contiguous()                       # (cols, rows): a column is a contiguous row
    del W
    nblk = cols // B
    blocks = np.empty((rows, nblk, t.type_size), dtype=np.uint8)
    for k in range(nblk):
        i1, i2 = k * B, (k + 1) * B
        W1 = Wt[i1:i2].clone()                    # (B, rows)
        enc = quantize(np.ascontiguousarray(W1.t().numpy()), used, imatrix=imp[i1:i2])   # (rows, type_size)
        a_np, b_np = affine(enc, used)            # (rows, B) each
        A, Bv = torch.from_numpy(a_np).t().contiguous(), torch.from_numpy(b_np).t().contiguous()  # (B, rows)
        live = A != 0
        Asafe = torch.where(live, A, torch.ones_like(A))
        Q = torch.empty(B, rows)
        Err1 = torch.empty(B, rows)
        U1 = U[i1:i2, i1:i2]
        with _one_thread():
            for i in range(B):
                w = W1[i]
                q = torch.where(live[i], ((w - Bv[i]) / Asafe[i]).round_().clamp_(0, span.qmax),
                                torch.zeros_like(w))
                Q[i] = q
                err = (w - (A[i] * q + Bv[i])).div_(U1[i, i])
                Err1[i] = err
                if i + 1 < B:
                    W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)
        blocks[:, k] = with_codes(enc, used, Q.t().numpy())
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)
    blob = blocks.reshape(rows, -1)
    # per row: GPTQ's codes or the encoder's own, whichever has the lower proxy loss
    from lowbit.numerics.ggml import dequantize
    W0 = weight.detach().float()
    plain = quantize(np.ascontiguousarray(W0.numpy()), used, imatrix=imp)
    proxy = []
    for cand in (blob, plain):
        D = W0 - torch.from_numpy(dequantize(cand, used, (rows, cols)))
        proxy.append(((D @ H0) * D).sum(1).double())
    keep_plain = proxy[1] < proxy[0]
    if bool(keep_plain.any()):
        blob = np.where(keep_plain.numpy()[:, None], plain, blob)
    chosen = torch.where(keep_plain, proxy[1], proxy[0])
    info = {"ggml_type": used, "ggml_wanted": wanted, "loss": float(chosen.sum()) / 2,
            "loss_encoder_only": float(proxy[1].sum()) / 2, "rows_from_encoder": int(keep_plain.sum()),
            "damp_percent": damp_used, "damp_retries": retries, "n_dead_inputs": n_dead,
            "imatrix": imatrix is not None, "loss_per_row": (chosen / 2).float()}
    return GGMLWeight(torch.from_numpy(np.ascontiguousarray(blob)), used, (rows, cols), wanted, info)
