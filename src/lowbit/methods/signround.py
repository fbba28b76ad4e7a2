"""SignRound (Cheng et al., arXiv:2309.05516): learned rounding by signed gradient descent.

Per linear of a block, on the scheme's integer grid (numerics/affine.py):

    s = s0 * a                 a: per-group scale factor, trained, clamped to [min_scale, max_scale]
    z = z0 + round(dz)         dz: per-group zero shift (asymmetric schemes), clamped to +-max_zero_shift
    code  = clamp(round(W / s + z + V), qmin, qmax)      V: per-weight offset in [-0.5, 0.5], trained
    W_hat = (code - z) * s

round() passes gradients straight through (STE). The loss is the block's output error,
mean((block_{W_hat}(X_q) - block_W(X_fp))^2) over a batch of calibration windows: X_q the inputs
the quantized model feeds this block, X_fp the float model's (the target is the float block's
output on float inputs, AutoRound's default). Each step moves every parameter by lr * sign(grad),
lr decaying linearly to 0 over `iters` steps (the paper's schedule, lr = 1 / iters by default); the
parameters of the step with the lowest loss are kept.

Initialisation (`init`): "rtn" starts at V = 0 on round-to-nearest qparams (the paper); "gptq"
starts from this package's GPTQ solution (its scales, zeros, act-order g_idx, and a constant
integer shift D = GPTQ code - round(W / s + z) inside the rounding, so V = 0 is GPTQ exactly), so
the tuning improves on GPTQ instead of on RTN. If no step beats the starting point's loss on the
calibration batches, the starting point is kept.

This file is the per-weight math (parameters, fake-quantization, the signed step, the final
QuantizedWeight); calibration/blockwise.py runs the block forward and backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError
from lowbit.methods import get_method, register_method
from lowbit.numerics.affine import expand_qparams
from lowbit.numerics.qweight import QuantizedWeight
from lowbit.numerics.scheme import Scheme


@dataclass
class SignRoundConfig:
    iters: int = 50               # signed-gradient steps per block
    lr: float = 0.0               # 0: 1 / iters (the paper's default), at most 0.05
    batch_size: int = 0           # calibration windows per step; 0: the calibration loop's batch
    init: str = "rtn"             # rtn | gptq
    clip: str = "minmax"          # the init's range choice (rtn / gptq option of the same name)
    act_order: bool = False       # gptq init: act-order (g_idx)
    min_scale: float = 0.5        # bounds of the learned scale factor a
    max_scale: float = 1.2
    max_zero_shift: float = 2.0   # bound of the learned zero shift dz (asymmetric schemes)
    scale_dtype: str = "float16"
    seed: int = 0
    init_args: dict = field(default_factory=dict)   # extra options for the init method

    def __post_init__(self) -> None:
        if self.init not in ("rtn", "gptq"):
            raise LowbitError(f"signround option init: expected 'rtn' or 'gptq', got {self.init!r}")
        if not (isinstance(self.iters, int) and self.iters >= 0):
            raise LowbitError(f"signround option iters: expected an integer >= 0, got {self.iters!r}")
        if self.lr < 0 or self.batch_size < 0:
            raise LowbitError(f"signround options lr / batch_size: expected >= 0, got {self.lr!r} / "
                              f"{self.batch_size!r}")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise LowbitError(f"signround options min_scale / max_scale: expected 0 < min_scale <= 1 <= "
                              f"max_scale, got {self.min_scale} / {self.max_scale}")

    @property
    def step_lr(self) -> float:
        # 1 / iters is AutoRound's default for its 200 steps (0.005); with the few steps a CPU
        # affords, 1 / 6 moved every offset so far that no step beat the start (2-bit, block 0)
        return self.lr or min(1.0 / max(self.iters, 1), 0.05)


def _init_method(config: SignRoundConfig):
    spec = get_method(config.init)
    args = {"clip": config.clip, "scale_dtype": config.scale_dtype, **config.init_args}
    if config.init == "gptq" and config.act_order:
        args["act_order"] = True
    return spec, spec.make_config(args)


@register_method("signround", SignRoundConfig, needs=("hessian",))
def signround(weight: torch.Tensor, scheme: Scheme, config: SignRoundConfig, stats: dict) -> QuantizedWeight:
    """The starting point (RTN or GPTQ); the calibration loop then tunes the whole block
    (`block_level`: calibration/blockwise.py, with the functions below)."""
    if scheme.format != "int" or scheme.granularity not in ("group", "channel"):
        raise LowbitError(f"signround: needs an integer scheme per group or channel, got {scheme.short_name()}")
    spec, cfg = _init_method(config)
    qw = spec.fn(weight, scheme, cfg, stats if spec.needs else None)
    qw.info["signround_init"] = config.init
    return qw


signround.block_level = True


class RoundingParams:
    """The trainable state of one linear: V (out, in), a and dz (qparam_shape)."""

    def __init__(self, weight: torch.Tensor, qw: QuantizedWeight, config: SignRoundConfig):
        sc = qw.scheme
        self.scheme, self.config, self.g_idx = sc, config, qw.g_idx
        self.W = weight.detach().float()
        self.s0 = qw.scale.float()
        self.z0 = (qw.zero_point.float() if qw.zero_point is not None
                   else torch.full_like(self.s0, float(sc.sym_zero)))
        self.a = torch.ones_like(self.s0, requires_grad=True)
        self.dz = torch.zeros_like(self.s0, requires_grad=not sc.symmetric)
        # D (integer, constant): the init's codes minus round-to-nearest's, so that V = 0 starts
        # exactly at the init (GPTQ moves some weights by more than half a step)
        x = self.W / self._full(self.s0) + self._full(self.z0)
        self.D = qw.qdata.float() - torch.round(x)
        self.V = torch.zeros_like(self.W, requires_grad=True)
        self.best: tuple | None = None

    def _full(self, p: torch.Tensor) -> torch.Tensor:
        return expand_qparams(p, tuple(self.W.shape), self.scheme, self.g_idx)

    def tensors(self) -> list[torch.Tensor]:
        return [self.V, self.a] + ([self.dz] if self.dz.requires_grad else [])

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s0 * self.a
        dz = self.dz + (torch.round(self.dz) - self.dz).detach()          # STE: integer zero shift
        return s, self.z0 + dz

    def fake_quant(self) -> torch.Tensor:
        """W_hat, differentiable in V, a, dz (straight-through rounding)."""
        s, z = self.qparams()
        s, z = self._full(s), self._full(z)
        x = self.W / s + z + self.V + self.D
        code = x + (torch.round(x) - x).detach()
        code = code.clamp(self.scheme.qmin, self.scheme.qmax)
        return (code - z) * s

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Signed gradient descent, then the parameters back into their bounds."""
        for t in self.tensors():
            if t.grad is not None:
                t -= lr * torch.sign(t.grad)
                t.grad = None
        self.V.clamp_(-0.5, 0.5)
        self.a.clamp_(self.config.min_scale, self.config.max_scale)
        self.dz.clamp_(-self.config.max_zero_shift, self.config.max_zero_shift)

    def keep(self) -> None:
        self.best = tuple(t.detach().clone() for t in (self.V, self.a, self.dz))

    @torch.no_grad()
    def result(self, info: dict) -> QuantizedWeight:
        """The QuantizedWeight of the kept parameters; scales rounded as the file stores them
        (then the codes chosen with those scales, so a saved model is what was measured)."""
        from lowbit.methods.rtn import SCALE_DTYPES, round_scale
        if self.best is not None:
            self.V.copy_(self.best[0])
            self.a.copy_(self.best[1])
            self.dz.copy_(self.best[2])
        s, z = self.qparams()
        s = round_scale(s.detach(), SCALE_DTYPES[self.config.scale_dtype])
        z = z.detach().clamp(0, self.scheme.qmax)
        code = torch.round(self.W / self._full(s) + self._full(z) + self.V + self.D)
        code = code.clamp(self.scheme.qmin, self.scheme.qmax).to(torch.uint8)
        zero = z if not self.scheme.symmetric else self.z0
        return QuantizedWeight(code, s, zero, self.scheme,
                               None if self.g_idx is None else self.g_idx.clone(), dict(info))
