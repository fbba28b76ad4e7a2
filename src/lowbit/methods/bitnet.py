"""BitNet b1.58 arithmetic: ternary absmean weights, per-token 8-bit absmax activations, and the
straight-through estimator that lets a float ("latent") weight train through them.

Sources: Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits",
arXiv:2402.17764, eq. (1)-(3); and its companion note "The Era of 1-bit LLMs: Training Tips,
Code and FAQ" (Microsoft, 2024), whose reference code is, in our words:

    weights      s = mean(|W|) over the whole tensor           (per tensor, one scale)
                 W_q = RoundClip(W / s, -1, 1),  W_hat = s * W_q    (W_q in {-1, 0, 1})
    activations  per token (row of x): a = max(|x|) / 127
                 x_q = clamp(round(x / a), -128, 127),  x_hat = a * x_q
    forward      y = x_hat @ W_hat^T, with x_hat = x + (Q(x) - x).detach() (likewise W), so the
                 backward pass sees dy/dW = dy/dW_hat (straight-through estimator, Bengio 2013)

The note also puts an RMSNorm inside every BitLinear; we do not, because this file serves
*continued* training of a pretrained model whose q/k/v and gate/up already read an RMSNorm output,
and a fresh norm in front of o_proj / down_proj would change the function before any training.

`lam` mixes the float and the quantized weight, W_mix = W + lam * (Q(W) - W) (both through the
STE), for a gradual warm-up from the float model (lam 0 -> 1); at lam = 1 it is exactly BitNet.

Pure tensor math: no modules, no files. nn/bitlinear.py holds the trainable layer.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.activation import ActScheme, act_scale, quantize_act

_TOKEN_INT8 = ActScheme(format="int8", dynamic=True, granularity="token")   # x / (max|x| / 127), clamp [-128, 127]
_EPS = 1e-5             # the reference code's clamp on the weight scale


def absmean_scale(w: torch.Tensor) -> torch.Tensor:
    """0-d float32: mean |W| over the tensor (the reference code clamps it at 1e-5)."""
    return w.detach().float().abs().mean().clamp_min(_EPS)


def ternary_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W -> int8 codes in {-1, 0, 1}: round(clamp(W / scale, -1, 1)) (round half to even, as torch)."""
    return torch.round((w.float() / scale).clamp(-1.0, 1.0)).to(torch.int8)


def ternary_weight(w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """W_hat = scale * ternary codes, in w's dtype (scale: absmean unless given)."""
    s = absmean_scale(w) if scale is None else scale
    return (ternary_codes(w, s).float() * s).to(w.dtype)


def act_absmax_scale(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) per-token scale max|x| / 127; an all-zero token gets scale 1 (the reference code
    clamps max|x| at 1e-5 instead; this is numerics/activation.act_scale itself, what the frozen
    model's ActQuant computes, so training and inference round the same way)."""
    return act_scale(x.detach().float(), _TOKEN_INT8)


def act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 codes, per-token scale (..., 1)); x_hat = codes * scale."""
    a = act_absmax_scale(x)
    return quantize_act(x.float(), a, _TOKEN_INT8), a


def act_quant_8bit(x: torch.Tensor) -> torch.Tensor:
    """x_hat = per-token absmax int8 fake quantization, in x's dtype. |x - x_hat| <= scale / 2 per
    element (no value clips: |x| / scale <= 127)."""
    q, a = act_int8(x)
    return (q.float() * a).to(x.dtype)


def ste(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """x_hat in the forward pass, identity gradient to x in the backward pass."""
    return x + (x_hat - x).detach()


def bitnet_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, lam: float = 1.0,
                  quant_act: bool = True) -> torch.Tensor:
    """BitLinear's forward with the STE: F.linear(Q_a(x), W + lam * (Q_w(W) - W)) (see module doc).
    lam = 1: the ternary weight itself; quant_act=False keeps float activations (ablations)."""
    if not 0.0 <= lam <= 1.0:
        raise LowbitError(f"bitnet lam: expected a weight-mixing factor in [0, 1], got {lam!r}")
    w_q = ternary_weight(w) if lam == 1.0 else w + lam * (ternary_weight(w) - w)
    w_hat = ste(w, w_q.detach())
    x_hat = ste(x, act_quant_8bit(x)) if quant_act else x
    return torch.nn.functional.linear(x_hat, w_hat.to(x.dtype), bias)


def lam_schedule(step: int, warmup_steps: int) -> float:
    """Linear warm-up of the weight mixing factor: 0 -> 1 over `warmup_steps`, then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
