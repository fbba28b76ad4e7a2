"""Round-to-nearest (RTN): the data-free baseline. Each weight is rounded onto its scheme's grid.

clip="minmax" uses each unit's full range; other values name a range calibrator from
numerics/ranges.py (e.g. "mse": search the shrink ratio that minimises the unit's squared error),
which helps at 2-3 bits where one outlier stretches a whole group.

Scales are rounded to `scale_dtype` (fp16 by default, what every file format stores) before the
codes are chosen, so a saved model reproduces exactly what was measured in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods import register_method
from lowbit.numerics.affine import QParams, choose_qparams, qparams_from_range
from lowbit.numerics.ranges import calibrate_range
from lowbit.numerics.qweight import QuantizedWeight, quantize_weight
from lowbit.numerics.scheme import Scheme


SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round scales to what a file stores (kept as float32 values); a scale that would round to
    0 takes the smallest positive value of `dtype` (codes divide by it)."""
    if dtype == torch.float32:
        return scale
    tiny = torch.finfo(dtype).smallest_normal if dtype == torch.bfloat16 else 2.0 ** -24
    out = scale.to(dtype).float()
    if not bool(torch.isfinite(out).all()):     # a finite weight range past what dtype holds
        from lowbit.errors import LowbitError
        big = float(scale[torch.isfinite(scale)].abs().max()) if bool(torch.isfinite(scale).any()) else float("nan")
        raise LowbitError(f"a quantization scale of {big:.4g} exceeds the {str(dtype).split('.')[-1]} range "
                          f"(max {torch.finfo(dtype).max:g}): the weight range is too wide for "
                          "fp16 scales; use method option scale_dtype='float32' or clip the outlier")
    return out.clamp_min(tiny)


@dataclass
class RTNConfig:
    clip: str = "minmax"          # minmax | percentile | mse | kl (numerics/ranges.py)
    scale_dtype: str = "float16"  # scales are rounded to it before rounding the weights

    def __post_init__(self) -> None:
        from lowbit.errors import LowbitError
        from lowbit.numerics.ranges import METHODS
        if self.clip not in METHODS:
            raise LowbitError(f"rtn option clip: expected one of {METHODS}, got {self.clip!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"rtn option scale_dtype: expected one of {sorted(SCALE_DTYPES)}, "
                              f"got {self.scale_dtype!r}")


@register_method("rtn", RTNConfig)
def rtn(weight: torch.Tensor, scheme: Scheme, config: RTNConfig, stats: dict | None = None) -> QuantizedWeight:
    w = weight.detach().float()
    if config.clip == "minmax":
        qp = choose_qparams(w, scheme)
    else:
        lo, hi = calibrate_range(w, scheme, method=config.clip)
        qp = qparams_from_range(lo, hi, scheme)
    qp = QParams(round_scale(qp.scale, SCALE_DTYPES[config.scale_dtype]), qp.zero)
    return quantize_weight(weight, scheme, qp=qp)
