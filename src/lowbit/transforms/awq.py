"""AWQ: activation-aware per-input-channel scales, searched per smoothing pair, then weight clipping.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", arXiv:2306.00978, sec. 3.2:

    s = mean_t |x_t|^alpha  (per input channel),  normalised s / sqrt(max s * min s)
    alpha* = argmin over alpha in {0, 1/n, ..., (n-1)/n} of || W X - Q(W diag(s)) diag(s)^-1 X ||^2

where W is every quantized consumer of the input (q, k and v together) and Q the consumers' own
weight scheme (round-to-nearest, min-max). alpha = 0 is s = 1, so the search never does worse than
no scaling on the calibration loss. The output error is taken through the input's Hessian instead
of the calibration tokens themselves:

    || dW X ||_F^2 = sum_t x_t^T dW^T dW x_t = tr(dW (X X^T) dW^T) = n/2 tr(dW H dW^T)

so the search costs one (rows, d) x (d, d) product per alpha and holds no tokens. (The reference
implementation measures the output of the module enclosing the consumers, e.g. the attention block
for q/k/v; this is the consumers' own output error.)

Clipping (the reference's auto_clip): per (row, group), the absmax is shrunk to r * absmax,
r in {1, 1 - 1/n, ..., 1 - max_shrink}, the weights clamped to [-r absmax, r absmax] and the
ratio of least output error kept; that group's error is dw_g^T H_gg dw_g with H_gg the group's
diagonal block of H (the error of one group's columns on the output, the reference's measure).
The clamped float weights then go to RTN or GPTQ. Pure tensor math.

search="gptq": Q in the scale search is GPTQ (methods/gptq.py, its defaults) on the scaled weights
with the scaled input's Hessian diag(s)^-1 H diag(s)^-1, instead of RTN: when GPTQ quantizes the
scaled block, RTN's best alpha need not be GPTQ's (GPTQ's error feedback already spreads a salient
column's rounding error over the others). One GPTQ solve per grid point and pair, ~n_grid x the
GPTQ time; BENCHMARKS.md (issue 19) has what it gives on the bundled model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.numerics.affine import codec_for
from lowbit.numerics.scheme import Scheme


@dataclass
class AWQConfig:
    n_grid: int = 20            # alpha grid points in [0, 1)
    clip: bool = True           # the per-group clipping search after scaling
    clip_grid: int = 20         # clip ratios step 1 / clip_grid ...
    max_shrink: float = 0.5     # ... down to 1 - max_shrink (exclusive)
    pairs: str = "all"          # "all" | "norms" (only norm -> linear pairs)
    search: str = "rtn"         # the quantizer the scale search measures: "rtn" | "gptq"

    def __post_init__(self) -> None:
        for k in ("n_grid", "clip_grid"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise LowbitError(f"awq option {k}: expected a positive integer, got {v!r}")
        if not (0.0 <= self.max_shrink < 1.0):
            raise LowbitError(f"awq option max_shrink: expected a number in [0, 1), got {self.max_shrink!r}")
        if self.pairs not in ("all", "norms"):
            raise LowbitError(f"awq option pairs: expected 'all' or 'norms', got {self.pairs!r}")
        if self.search not in ("rtn", "gptq"):
            raise LowbitError(f"awq option search: expected 'rtn' or 'gptq', got {self.search!r}")


def _group_len(scheme: Scheme, cols: int) -> int | None:
    """Values per qparam along a row, for the per-row schemes the searches handle (else None)."""
    if scheme.format == "int" and scheme.granularity == "group":
        return scheme.group_size
    if scheme.format == "int" and scheme.granularity == "channel" and scheme.axis == 0:
        return cols
    return None


def fake_quant_groups(wg: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """RTN (min-max, fp16 scales: methods/rtn.py's defaults) and back on (rows, groups, g) groups.
    Zero padding of a ragged last group changes nothing: the int grid's range always holds 0."""
    from lowbit.methods.rtn import round_scale
    scale, zero = codec_for(scheme).params(wg.amin(-1), wg.amax(-1), scheme)
    scale = round_scale(scale, torch.float16)[..., None]
    zero = zero[..., None]
    # the int codec's encode / decode (numerics/affine.py IntCodec), fused in place
    q = torch.round(wg / scale).add_(zero).clamp_(scheme.qmin, scheme.qmax)
    return q.sub_(zero).mul_(scale)


def fake_quant(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Round-to-nearest onto `scheme` and back (RTN with its defaults: min-max, fp16 scales)."""
    R, C = w.shape
    g = _group_len(scheme, C)
    if g is None:
        from lowbit.methods.rtn import RTNConfig, rtn
        return rtn(w, scheme, RTNConfig()).dequantize(torch.float32)
    G = -(-C // g)
    wg = F.pad(w.float(), (0, G * g - C)).view(R, G, g)
    return fake_quant_groups(wg, scheme).reshape(R, G * g)[:, :C]


def gptq_fake_quant(w: torch.Tensor, H: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """GPTQ (its default config) onto `scheme` given the input Hessian H, and back."""
    from lowbit.methods.gptq import GPTQConfig, gptq_quantize
    return gptq_quantize(w, H, scheme, GPTQConfig()).dequantize(torch.float32)


def output_error(dW: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T): the output's squared error over the calibration tokens, up to n/2."""
    return float(((dW @ H) * dW).sum(dtype=torch.float64))


def awq_scales(weights: list[torch.Tensor], schemes: list[Scheme], x_abs_mean: torch.Tensor,
               H: torch.Tensor, cfg: AWQConfig, expand=None) -> tuple[torch.Tensor, dict]:
    """The searched scale s (producer space, like x_abs_mean) for consumers `weights` (each (r_i, d)).

    expand: producer space -> consumer input space (grouped-query heads), identity by default.
    Returns s and {"alpha": best alpha, "loss": its error, "loss_unscaled": the error at s = 1}.
    """
    if not weights:
        raise LowbitError("awq_scales: no quantized consumer to measure")
    expand = expand or (lambda v: v)
    H = H.float()
    # consumers with one scheme are one row-stacked matrix (per-row quantization: same result)
    by_scheme: dict = {}
    for w, scheme in zip(weights, schemes):
        by_scheme.setdefault(scheme, []).append(w.float())
    stacked = [(torch.cat(ws, 0), sc) for sc, ws in by_scheme.items()]
    x = x_abs_mean.float()
    best = (math.inf, None, None)
    loss_1 = None
    for i in range(cfg.n_grid):
        alpha = i / cfg.n_grid
        s = x.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        full = expand(s)
        loss = 0.0
        for w, scheme in stacked:
            if cfg.search == "gptq":                       # the input is x / s: its Hessian too
                q = gptq_fake_quant(w * full, H / full[:, None] / full[None, :], scheme)
            else:
                q = fake_quant(w * full, scheme)
            loss += output_error(w - q / full, H)
        if i == 0:
            loss_1 = loss
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], {"alpha": best[1], "loss": best[0], "loss_unscaled": loss_1}


def _diag_blocks(H: torch.Tensor, g: int, n_groups: int) -> torch.Tensor:
    """(n_groups, g, g) diagonal blocks of H, zero-padded to n_groups * g columns."""
    pad = n_groups * g - H.shape[0]
    Hp = F.pad(H, (0, pad, 0, pad))
    return Hp.view(n_groups, g, n_groups, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def awq_clip(w: torch.Tensor, H: torch.Tensor, scheme: Scheme, cfg: AWQConfig) -> tuple[torch.Tensor, dict]:
    """The weight clamped per (row, group) to the ratio of least output error (module docstring)."""
    R, C = w.shape
    g = _group_len(scheme, C)
    if g is None:
        return w, {"clip_ratio_mean": 1.0}
    G = -(-C // g)
    wg = F.pad(w.float(), (0, G * g - C)).view(R, G, g)                 # (R, G, g), zero padded
    Hb = _diag_blocks(H.float(), g, G)                                  # (G, g, g)
    absmax = wg.abs().amax(-1, keepdim=True)                            # (R, G, 1)
    best_err = torch.full((R, G), math.inf, dtype=torch.float64)
    best_r = torch.ones(R, G, 1)
    for i in range(max(1, int(cfg.max_shrink * cfg.clip_grid))):
        r = 1.0 - i / cfg.clip_grid
        mx = absmax * r
        dW = (wg - fake_quant_groups(torch.maximum(torch.minimum(wg, mx), -mx), scheme)).transpose(0, 1)
        err = (torch.bmm(dW, Hb) * dW).sum(-1).t().double()             # (R, G): dw_g^T H_gg dw_g
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better[..., None], torch.full_like(best_r, r), best_r)
    mx = absmax * best_r
    out = torch.maximum(torch.minimum(wg, mx), -mx).reshape(R, G * g)[:, :C]
    return out.contiguous(), {"clip_ratio_mean": float(best_r.mean())}
