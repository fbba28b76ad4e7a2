"""Vector quantization with GPTQ-style error feedback (GPTVQ: van Baalen et al., arXiv:2402.15319).

Each row is cut into vectors of d consecutive input columns; each vector becomes one index into a
learned codebook of K = 2^(bits d) codewords, times a per-row, per-group scale (numerics/vq.py).
For a layer W (rows, cols) with input Hessian H = sum x x^T:

1. scales: per row and group of g columns, the group's largest |w| (fp16-rounded); the codebook
   lives in the normalised space W / scale, where every group spans [-1, 1];
2. codebook: weighted k-means (Lloyd) over the normalised vectors of each codebook's column block,
   each coordinate weighted by diag(H)[col] scale^2 (the output error a coordinate's error costs
   to first order); started from the d-fold product of the uniform 2^bits-level scalar grid (the
   codewords of the integer grid at the same bits), so the codebook starts as the scalar
   grid and k-means only lowers the weighted distortion;
3. assignment with error feedback, GPTQ's sweep (methods/gptq.py) one vector at a time: the
   vector of the *error-updated* weights takes the codeword nearest in the metric
   sum_k (w_k - c_k)^2 / U_kk^2 (U the upper Cholesky factor of H^-1, the diagonal GPTVQ uses),
   then its d columns' errors are spread over the columns not yet quantized, column by column,
   exactly as GPTQ does for one column (lazy block updates included);
4. codebook update (`codebook_steps` > 0): with indices and scales fixed, the codebook entries
   are tuned by Adam on the layer's output error tr((W - W_hat) H (W - W_hat)^T) (GPTVQ sec. 3.3),
   rounded to fp16 after, and kept only if the error went down;
5. block fine-tuning (`block_steps` > 0): once every linear of a decoder block is assigned, all
   their codebooks and scales are tuned together by Adam on the block's output error against the
   float block (calibration/blockwise.py refine_block_vq), indices fixed.

Pure tensor math: (W, H, scheme, config) in, VQWeight out; the calibration loop collects H.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.methods import register_method
from lowbit.methods.gptq import _one_thread, check_weight_hessian, hessian_inverse_cholesky, zero_dead_weights
from lowbit.methods.rtn import SCALE_DTYPES, round_scale
from lowbit.numerics.scheme import Scheme
from lowbit.numerics.vq import MAX_CODEBOOK, VQWeight, decode


@dataclass
class VQConfig:
    """dim: vector length d (0: the longest of 8, 4, 2, 1 with bits * d <= 8, so K <= 256 and one
    byte per index). codebook_cols: input columns served by one codebook (0: all of them).
    kmeans_iters: Lloyd iterations. codebook_steps / codebook_lr: Adam steps on the codebook after
    the assignment (0: none). block_steps / block_lr / block_batch: Adam steps tuning every
    codebook and scale of a block together on the block's output error once all its linears are
    assigned (calibration/blockwise.py refine_block_vq; 0: none; batch 0: the loop's batches).
    kmeans_samples: vectors k-means fits on per codebook (an evenly spaced subset when there are
    more; 0: all). damp_percent, block_size: as GPTQ. Nothing is random: k-means starts from the
    scalar grid."""
    dim: int = 0
    codebook_cols: int = 0
    kmeans_iters: int = 20
    kmeans_samples: int = 65536
    codebook_steps: int = 0
    codebook_lr: float = 1e-3
    block_steps: int = 0
    block_lr: float = 3e-3
    block_batch: int = 0
    damp_percent: float = 0.01
    block_size: int = 128
    scale_dtype: str = "float16"
    max_damp_retries: int = 4

    def __post_init__(self) -> None:
        for k in ("dim", "codebook_cols", "kmeans_iters", "kmeans_samples", "codebook_steps", "block_steps",
                  "block_batch"):
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise LowbitError(f"vq option {k}: expected an integer >= 0, got {v!r}")
        if self.dim > 16:
            raise LowbitError(f"vq option dim: vectors of at most 16 columns, got {self.dim}")
        if not (isinstance(self.block_size, int) and self.block_size > 0):
            raise LowbitError(f"vq option block_size: expected a positive integer, got {self.block_size!r}")
        if not (0.0 <= float(self.damp_percent) < 10.0) or not (float(self.codebook_lr) > 0) \
                or not (float(self.block_lr) > 0):
            raise LowbitError(f"vq options damp_percent / codebook_lr / block_lr: expected a fraction in "
                              f"[0, 10) and positive rates, got {self.damp_percent!r} / {self.codebook_lr!r} / "
                              f"{self.block_lr!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"vq option scale_dtype: expected one of {sorted(SCALE_DTYPES)}, got "
                              f"{self.scale_dtype!r}")


def vector_dim(bits: int, config: VQConfig) -> int:
    if config.dim:
        return config.dim
    return max(d for d in (8, 4, 2, 1) if bits * d <= 8)


def check_scheme(scheme: Scheme, name: str = "layer") -> None:
    if scheme.format != "vq" or scheme.granularity != "group":
        raise LowbitError(f"{name}: the vq method needs a vq scheme with scale groups (e.g. preset "
                          f"w2g64-vq), got {scheme.short_name()} ({scheme.format}, {scheme.granularity})")


def scalar_grid_codebook(bits: int, d: int) -> torch.Tensor:
    """(2^(bits d), d): every d-tuple of the 2^bits uniform levels in [-1, 1] (first coordinate
    slowest): the codewords of a symmetric scalar grid of `bits` bits."""
    levels = torch.linspace(-1.0, 1.0, 1 << bits)
    grids = torch.meshgrid(*([levels] * d), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def _nearest(v: torch.Tensor, w: torch.Tensor, C: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """argmin_c sum_k w_k (v_k - C_ck)^2 for each row of v (N, d), weights w (N, d) or (1, d)."""
    out = torch.empty(v.shape[0], dtype=torch.long)
    B = torch.cat([C.square().t(), -2.0 * C.t()], 0)                   # (2d, K): one matmul
    for i in range(0, v.shape[0], chunk):
        vi = v[i:i + chunk]
        wi = (w if w.shape[0] > 1 else w.expand(v.shape[0], -1))[i:i + chunk]
        out[i:i + chunk] = (torch.cat([wi, wi * vi], 1) @ B).argmin(dim=1)
    return out


def weighted_kmeans(v: torch.Tensor, w: torch.Tensor, C0: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd's algorithm with per-coordinate weights w (N, d) from the codebook C0 (K, d); an
    empty cluster keeps its codeword."""
    C = C0.clone()
    wv = w * v
    for _ in range(iters):
        a = _nearest(v, w, C)
        num = torch.zeros_like(C).index_add_(0, a, wv)
        den = torch.zeros_like(C).index_add_(0, a, w)
        C = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), C)
    return C


def vq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, config: VQConfig,
                name: str = "weight") -> VQWeight:
    check_scheme(scheme, name)
    rows, cols = check_weight_hessian(weight, hessian, name)
    bits, g = scheme.bits, scheme.group_size
    d = vector_dim(bits, config)
    K = 1 << (bits * d)
    if K > MAX_CODEBOOK:
        raise LowbitError(f"{name}: {bits} bits x {d} columns is a codebook of {K} codewords; at most "
                          f"{MAX_CODEBOOK} (use a shorter vector: option dim)")
    if cols % d or g % d:
        raise LowbitError(f"{name}: in_features={cols} and group size {g} must be multiples of the vector "
                          f"length {d}")
    V = cols // d
    cbc = config.codebook_cols or cols
    if cbc % d or cols % cbc:
        raise LowbitError(f"{name}: codebook_cols={cbc} must divide in_features={cols} and be a multiple "
                          f"of the vector length {d}")
    n_cb, vpc = cols // cbc, cbc // d
    sdtype = SCALE_DTYPES[config.scale_dtype]

    W0 = weight.detach().float()
    W = W0.clone()
    H = hessian.detach().double()
    dead = zero_dead_weights(W, H)
    hdiag = H.diagonal().float().clone()
    if dead is not None:
        hdiag[dead] = 0.0
    G = -(-cols // g)

    # 1. scales: each group's absmax, fp16-rounded
    pad = G * g - cols
    amax = torch.nn.functional.pad(W.abs(), (0, pad)).reshape(rows, G, g).amax(dim=2)
    scale = round_scale(torch.where(amax > 0, amax, torch.ones_like(amax)), sdtype)
    scol = scale.repeat_interleave(g, dim=1)[:, :cols]                     # (rows, cols)

    # 2. codebooks by weighted k-means in the normalised space, one per column block
    C0 = scalar_grid_codebook(bits, d)
    books = []
    for c in range(n_cb):
        sl = slice(c * cbc, (c + 1) * cbc)
        v = (W[:, sl] / scol[:, sl]).reshape(-1, d)
        wt = (hdiag[sl][None, :] * scol[:, sl].square()).reshape(-1, d)
        if config.kmeans_samples and v.shape[0] > config.kmeans_samples:
            pick = torch.linspace(0, v.shape[0] - 1, config.kmeans_samples).round().long()
            v, wt = v[pick], wt[pick]
        books.append(weighted_kmeans(v, wt + 1e-12, C0, config.kmeans_iters))
        del v, wt
    books = [b.to(torch.float16).float() for b in books]

    # 3. the sweep: one vector at a time, GPTQ's error feedback, on W^T (cols, rows)
    with _one_thread():
        U64, damp_used, retries = hessian_inverse_cholesky(H, config.damp_percent, config.max_damp_retries,
                                                           dead=dead)
    U = U64.float()
    del H, U64
    bs = d * max(1, config.block_size // d)
    Wt = W.t().contiguous()
    del W
    sT = scol.t().contiguous()                                            # (cols, rows)
    idx = torch.empty(V, rows, dtype=torch.long)
    losses = torch.zeros(rows, dtype=torch.float64)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        with _one_thread():
            for i in range(0, i2 - i1, d):
                j = i1 + i
                C = books[j // cbc]
                s = sT[j]                                                 # (rows,) one group
                vec = (W1[i:i + d] / s).t()                               # (rows, d)
                wk = U1.diagonal()[i:i + d].square().reciprocal()[None, :]
                a = _nearest(vec, wk, C)
                idx[j // d] = a
                q = C[a].t() * s                                          # (d, rows)
                for k in range(d):
                    err = (W1[i + k] - q[k]).div_(U1[i + k, i + k])
                    Err1[i + k] = err
                    if i + k + 1 < i2 - i1:
                        W1[i + k + 1:].addr_(U1[i + k, i + k + 1:], err, alpha=-1.0)
        losses += Err1.double().square().sum(dim=0) / 2
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)
    del Wt, U
    indices = idx.t().contiguous()
    codebook = torch.stack(books)                                         # (n_cb, K, d)

    # 4. codebook update on the layer's output error, indices and scales fixed
    Hf = hessian.detach().float()
    if dead is not None:
        W0 = W0.clone()
        W0[:, dead] = 0.0
    flat_idx = indices + (torch.arange(V) // vpc * K)[None, :]

    def out_err(cb: torch.Tensor) -> torch.Tensor:
        E = W0 - decode(cb, flat_idx, scale, g, cols)
        return (E @ Hf * E).sum()

    with torch.no_grad():
        err0 = float(out_err(codebook))
    err_final = err0
    if config.codebook_steps:
        p = codebook.clone().requires_grad_(True)
        opt = torch.optim.Adam([p], lr=config.codebook_lr)
        with torch.enable_grad():            # the calibration loop runs under no_grad
            for _ in range(config.codebook_steps):
                opt.zero_grad()
                loss = out_err(p)
                loss.backward()
                opt.step()
        with torch.no_grad():
            tuned = p.detach().to(torch.float16).float()
            e1 = float(out_err(tuned))
        if math.isfinite(e1) and e1 < err0:
            codebook, err_final = tuned, e1
    info = {"loss": float(losses.sum()), "damp_percent": damp_used, "damp_retries": retries,
            "n_dead_inputs": 0 if dead is None else int(dead.sum()), "vector_dim": d, "codebook_size": K,
            "n_codebooks": n_cb, "output_error": err_final, "output_error_before_update": err0}
    if cols % g:
        info["ragged_last_group"] = cols % g
    return VQWeight(codebook.contiguous(), indices.to(torch.uint8 if K <= 256 else torch.int16), scale,
                    (rows, cols), g, info)


@register_method("vq", VQConfig, needs=("hessian",))
def vq(weight: torch.Tensor, scheme: Scheme, config: VQConfig, stats: dict) -> VQWeight:
    if not stats or "hessian" not in stats:
        raise LowbitError("vq: needs stats['hessian'] (cols, cols) from calibration")
    return vq_quantize(weight, stats["hessian"], scheme, config)


vq.check_scheme = check_scheme
vq.row_separable = False
vq.block_level = lambda config: config.block_steps > 0      # calibration/loop.py _BlockRefine


def _refine(block, tuned, inputs, targets):
    from lowbit.calibration.blockwise import refine_block_vq
    return refine_block_vq(block, tuned, inputs, targets)


vq.refine_block = _refine
