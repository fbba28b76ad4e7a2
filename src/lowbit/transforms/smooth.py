"""SmoothQuant: migrate activation outliers into the weights before W8A8.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", arXiv:2211.10438, eq. (4): per input channel j,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          alpha = 0.5 by default (sec. 4)

with max|W_j| over every consumer of the input (q, k and v share one s), then X' = X / s,
W' = W diag(s) (transforms/fold.py folds it into the preceding norm or linear). Pure math here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError


@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5                       # migration strength (0: none, 1: all to the weights)
    pairs: str = "all"                       # "all" | "norms" (only norm -> linear pairs)

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise LowbitError(f"smoothquant option alpha: expected a number in [0, 1], got {self.alpha!r}")
        if self.pairs not in ("all", "norms"):
            raise LowbitError(f"smoothquant option pairs: expected 'all' or 'norms', got {self.pairs!r}")


def smooth_scales(act_abs_max: torch.Tensor, weight_abs_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """eq. (4); both (d,) per input channel. Channels calibration never activated keep s = 1."""
    a = act_abs_max.double().clamp(min=1e-5)
    w = weight_abs_max.double().clamp(min=1e-5)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)
    return torch.where(act_abs_max > 0, s, torch.ones_like(s)).float()
