"""Input-activation quantization attached to a QuantLinear (the scheme: numerics/activation.py).

    ql.act_quant = ActQuant(ActScheme(...))        # dynamic: nothing else needed
    ql.act_quant.scale = static_scale(lo, hi, s)   # static: from calibration (calibration/activations.py)

QuantLinear.forward runs `x = ql.act_quant(x, name)` before its matmul: the reference path
(fake quantization, exact to what an int8 x int8 -> int32 GEMM computes up to float summation
order); an integer kernel (nn/w8a8.py) uses the same scales and codes. A plain object, not an
nn.Module, so a QuantLinear's state_dict is what it was; the static scale travels in the export.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.activation import ActScheme, fake_quant_act, llm_int8_act


class ActQuant:
    def __init__(self, scheme: ActScheme, scale: torch.Tensor | None = None):
        self.scheme = scheme
        self.scale = scale                          # 0-d float32, static schemes only
        self.enabled = True                         # off while calibration observes float inputs
        self.outlier_hits: torch.Tensor | None = None   # LLM.int8(): per column, inputs it was an outlier in
        self.count_outliers = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scheme
        if s.outlier_threshold is not None:
            x_hat, cols = llm_int8_act(x, s)
            self.record_outliers(cols)
            return x_hat
        if s.dynamic:
            return fake_quant_act(x, s)
        if self.scale is None:
            raise LowbitError(f"static input activations ({s.short_name()}): no calibrated scale; "
                              "quantize with calibration data (lowbit.quantize(..., tokenizer=...))")
        return fake_quant_act(x, s, self.scale)

    def record_outliers(self, cols: torch.Tensor) -> None:
        """LLM.int8(): add one input's outlier columns (bool (in,)) to the counts, when counting."""
        if self.count_outliers:
            c = cols.to(torch.int64)
            self.outlier_hits = c if self.outlier_hits is None else self.outlier_hits + c

    def __repr__(self) -> str:
        sc = "" if self.scale is None else f", scale={float(self.scale):.4g}"
        return f"ActQuant({self.scheme.short_name()}{sc})"
