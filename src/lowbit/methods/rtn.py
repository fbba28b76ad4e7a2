"""Round-to-nearest (RTN): the data-free baseline. Each weight is rounded onto its scheme's grid.

clip="minmax" uses each unit's full range; other values name a range calibrator from
numerics/ranges.py (e.g. "mse": search the shrink ratio that minimises the unit's squared error),
which helps at 2-3 bits where one outlier stretches a whole group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods import register_method
from lowbit.numerics.affine import qparams_from_range
from lowbit.numerics.ranges import calibrate_range
from lowbit.numerics.qweight import QuantizedWeight, quantize_weight
from lowbit.numerics.scheme import Scheme


@dataclass
class RTNConfig:
    clip: str = "minmax"   # minmax | percentile | mse | kl (numerics/ranges.py)

    def __post_init__(self) -> None:
        from lowbit.errors import LowbitError
        from lowbit.numerics.ranges import METHODS
        if self.clip not in METHODS:
            raise LowbitError(f"rtn option clip: expected one of {METHODS}, got {self.clip!r}")


@register_method("rtn", RTNConfig)
def rtn(weight: torch.Tensor, scheme: Scheme, config: RTNConfig, stats: dict | None = None) -> QuantizedWeight:
    if config.clip == "minmax":
        return quantize_weight(weight, scheme)
    lo, hi = calibrate_range(weight.detach().float(), scheme, method=config.clip)
    return quantize_weight(weight, scheme, qp=qparams_from_range(lo, hi, scheme))
