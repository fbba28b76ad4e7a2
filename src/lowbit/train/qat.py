"""Quantization-aware training of a PTQ result: QuantLinear -> QATLinear -> train -> QuantLinear.

    report = api.quantize(lm.model, "w4g128-rtn")                  # the PTQ start (RTN, GPTQ, ...)
    prepare_qat(lm.model, report, learn_scales=True)                # latent floats, codes unchanged
    train(lm.model, windows, cfg, loss_fn=kd_loss(teacher))          # lowbit.train.loop
    freeze_qat(lm.model, report)                                     # real QuantizedWeights again

`run_qat` does all of it on wiki-calibration windows (never the evaluation text). Afterwards the
model holds ordinary QuantLinear modules and `report.qweights` the trained QuantizedWeights, so
api.export writes it in any format that holds the scheme and lowbit.eval scores it as usual.

The loss is either next-token cross-entropy ("ce") or knowledge distillation ("kd"): the KL
divergence KL(P_teacher || P_student) of the float teacher's next-token distribution per token
(Hinton et al. 2015; the data-free LLM-QAT of Liu et al. 2023, arXiv:2305.17888, distils the
same way). The teacher's logits for a batch are computed under no_grad right before the
student's: (batch, seq, vocab) fp32 = 4 x 256 x 49152 x 4 B = 201 MB for the bundled model.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.methods.qat import check_reproduces, codes_of, fake_quantize_weight, freeze, latent_from_qweight
from lowbit.nn.qlinear import QuantLinear, set_submodule
from lowbit.train.loop import TrainConfig, TrainResult, causal_lm_loss, text_windows, train

LOSSES = ("kd", "ce")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class QATConfig:
    steps: int = 200
    lr: float = 1e-3                  # latent weights (Adam; one int4 g128 grid step is ~0.065 on the bundled model)
    scale_lr: float | None = 1e-4     # LSQ scales (~0.065 at int4 g128); None keeps the PTQ scales fixed
    batch_size: int = 4
    seq_len: int = 256
    seed: int = 0
    loss: str = "kd"                  # "kd": KL to the teacher's logits; "ce": next-token loss
    temperature: float = 1.0          # kd softmax temperature (loss scaled by T^2)
    text: str = "wiki-calibration"
    max_windows: int | None = None
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    grad_checkpointing: bool = False
    optimizer: str = "adamw"          # or "adamw8bit" (lowbit.train.optim8bit): a quarter of the state memory

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise LowbitError(f"QATConfig.optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.loss not in LOSSES:
            raise LowbitError(f"QATConfig.loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.text == "wiki-evaluation":
            raise LowbitError("QATConfig.text: 'wiki-evaluation' is the evaluation text; train on "
                              "'wiki-calibration' (or your own file) so evaluation stays held out")
        if self.scale_lr is not None and not (math.isfinite(self.scale_lr) and self.scale_lr > 0):
            raise LowbitError(f"QATConfig.scale_lr: expected None or a positive number, got {self.scale_lr!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LowbitError(f"QATConfig.temperature: expected a positive number, got {self.temperature!r}")
        self.train_config().check()

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, seq_len=self.seq_len,
                           seed=self.seed, warmup_steps=self.warmup_steps, grad_clip=self.grad_clip,
                           grad_checkpointing=self.grad_checkpointing)


class QATLinear(nn.Module):
    """A linear trained through fake quantization: latent float `weight`, `scale` (trainable
    when learn_scale), fixed zero point / g_idx / scheme taken from a QuantizedWeight."""

    def __init__(self, qweight, bias: torch.Tensor | None = None, learn_scale: bool = False):
        super().__init__()
        lat = latent_from_qweight(qweight)
        self.scheme = lat.scheme
        self.fp16_scales = lat.fp16_scales
        self.out_features, self.in_features = qweight.shape
        self.info = dict(qweight.info)
        self.weight = nn.Parameter(lat.weight)
        self.scale = nn.Parameter(lat.scale, requires_grad=learn_scale)
        self.register_buffer("zero_point", lat.zero)
        self.register_buffer("g_idx", lat.g_idx)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def latent(self):
        from lowbit.methods.qat import LatentWeight
        return LatentWeight(self.weight, self.scale, self.zero_point, self.g_idx, self.scheme, self.fp16_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize_weight(self.weight, self.scale, self.zero_point, self.scheme, self.g_idx)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.short_name()}, learn_scale={self.scale.requires_grad}")


def prepare_qat(model: nn.Module, report, learn_scales: bool = False) -> list[str]:
    """Swap every QuantLinear that `report` quantized for a QATLinear; freeze everything else.

    Each swap is checked to reproduce the PTQ codes exactly (methods.qat.check_reproduces)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n in report.qweights]
    if not names:
        raise LowbitError("qat: the model has no QuantLinear from this report; quantize it first "
                          "(api.quantize with an int or NF4 recipe)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        mod = model.get_submodule(name)
        if getattr(mod, "act_quant", None) is not None:
            raise LowbitError(f"qat {name}: input-activation quantization is not trained through; "
                              "use a weight-only recipe")
        qw = report.qweights[name]
        q = QATLinear(qw, mod.bias, learn_scale=learn_scales)
        check_reproduces(qw, q.latent, name)
        set_submodule(model, name, q)
    return names


def freeze_qat(model: nn.Module, report, note: str = "qat") -> dict:
    """QATLinear -> QuantLinear holding the trained QuantizedWeight; updates report.qweights and
    report.layers. Returns {"layers", "codes_changed" (fraction), "scales_changed" (max rel.)}."""
    from lowbit.api import layer_row
    changed, total, scale_rel = 0, 0, 0.0
    rows = {r["name"]: i for i, r in enumerate(report.layers)}
    n = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QATLinear):
            continue
        old = report.qweights[name]
        qw = freeze(mod.latent, mod.weight, mod.scale, mod.info)
        changed += int((qw.qdata != old.qdata).sum())
        total += qw.qdata.numel()
        scale_rel = max(scale_rel, float(((qw.scale - old.scale).abs() / old.scale.abs().clamp_min(1e-30)).max()))
        report.qweights[name] = qw
        if name in rows:
            method = report.layers[rows[name]]["method"]
            report.layers[rows[name]] = layer_row(name, qw, method if method.endswith("+qat") else f"{method}+qat")
        set_submodule(model, name, QuantLinear(qw, mod.bias))
        n += 1
    if not n:
        raise LowbitError("qat freeze: the model has no QATLinear (prepare_qat was not run)")
    stats = {"layers": n, "codes_changed": changed / max(1, total), "scales_changed": scale_rel}
    report.notes.append(f"{note}: {stats['codes_changed'] * 100:.2f} % of codes changed in {n} layers")
    return stats


def kd_loss(teacher: nn.Module, temperature: float = 1.0):
    """loss_fn(model, ids) for lowbit.train.loop.train: mean per-token KL(P_teacher || P_student)."""
    teacher.eval()           # its forward runs under no_grad: nothing of it is trained or kept

    def fn(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits.float()
            log_p = F.log_softmax(t.reshape(-1, t.shape[-1]) / temperature, dim=-1)
            del t
        s = model(input_ids=ids, use_cache=False).logits.float()
        log_q = F.log_softmax(s.reshape(-1, s.shape[-1]) / temperature, dim=-1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature ** 2
    return fn


@dataclass
class QATResult:
    train: TrainResult
    freeze: dict
    config: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"train": self.train.to_dict(), "freeze": self.freeze, "config": self.config, "seconds": self.seconds}


def run_qat(model: nn.Module, report, tokenizer, cfg: QATConfig | None = None, *, teacher: nn.Module | None = None,
            windows: torch.Tensor | None = None, log=None) -> QATResult:
    """QAT of `model` (quantized in place by api.quantize, `report` its QuantizeReport) on
    `cfg.text` windows (or `windows`), then frozen back to QuantizedWeights in `report`."""
    cfg = cfg or QATConfig()
    cfg.check()
    if cfg.loss == "kd" and teacher is None:
        raise LowbitError("qat: loss 'kd' needs teacher= (the float model); or set loss='ce'")
    if windows is None:
        windows = text_windows(tokenizer, cfg.text, cfg.seq_len, seed=cfg.seed, max_windows=cfg.max_windows)
    t0 = time.perf_counter()
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    prepare_qat(model, report, learn_scales=cfg.scale_lr is not None)
    weights = [m.weight for m in model.modules() if isinstance(m, QATLinear)]
    groups = [{"params": weights, "lr": cfg.lr}]
    if cfg.scale_lr is not None:
        groups.append({"params": [m.scale for m in model.modules() if isinstance(m, QATLinear)],
                       "lr": cfg.scale_lr, "lr_ratio": cfg.scale_lr / cfg.lr})
    if cfg.optimizer == "adamw8bit":
        from lowbit.train.optim8bit import AdamW8bit
        opt = AdamW8bit(groups, lr=cfg.lr, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    loss_fn = kd_loss(teacher, cfg.temperature) if cfg.loss == "kd" else causal_lm_loss
    try:
        res = train(model, windows, cfg.train_config(), optimizer=opt, loss_fn=loss_fn, log=log)
    finally:
        stats = freeze_qat(model, report, note=f"qat ({cfg.loss}, {cfg.steps} steps on {cfg.text})")
        for n, p in model.named_parameters():     # the float parameters left as they were
            p.requires_grad_(trainable.get(n, False))
    return QATResult(res, stats, asdict(cfg), time.perf_counter() - t0)


def codes_match(model: nn.Module, report) -> bool:
    """Every QATLinear still encodes to its report's codes (true right after prepare_qat)."""
    return all(torch.equal(codes_of(m.latent), report.qweights[n].qdata)
               for n, m in model.named_modules() if isinstance(m, QATLinear))
