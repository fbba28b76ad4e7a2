"""One small, seeded training loop shared by QAT, QLoRA and BitNet continued training.

Causal-LM next-token loss on token windows; the caller chooses which parameters train (anything
with requires_grad) and the optimizer. Gradient checkpointing goes through transformers' own
switch (non-reentrant, so a frozen base with trainable adapters still gets gradients). The loss
curve comes back per step, with the seconds and peak RSS it took, so benchmarks can plot it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lowbit.data.text import load_text, token_windows, tokenize_text
from lowbit.errors import LowbitError


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 256
    seed: int = 0
    weight_decay: float = 0.0
    warmup_steps: int = 0          # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    grad_checkpointing: bool = False
    log_every: int = 10

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise LowbitError(f"TrainConfig.{name}: expected a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise LowbitError(f"TrainConfig.lr: expected a positive finite number, got {self.lr!r}")
        if not (0 <= self.warmup_steps < self.steps or self.warmup_steps == 0):
            raise LowbitError(f"TrainConfig.warmup_steps: expected 0 <= warmup_steps < steps ({self.steps}), "
                              f"got {self.warmup_steps!r}")


@dataclass
class TrainResult:
    losses: list[float]                 # training loss per step
    lrs: list[float]
    seconds: float
    tokens: int
    peak_rss_bytes: int | None
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def text_windows(tokenizer, text, seq_len: int, *, seed: int | None = 0,
                 max_windows: int | None = None) -> torch.Tensor:
    """(n, seq_len) non-overlapping windows of a named text or file, shuffled by `seed` (None: in order)."""
    w = token_windows(tokenize_text(tokenizer, load_text(text)), seq_len)
    if seed is not None:
        w = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))]
    return (w if max_windows is None else w[:max_windows]).clone()


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (b, L) batch, in float32."""
    logits = model(input_ids=ids, use_cache=False).logits
    return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       ids[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token loss over held-out windows (every token weighted equally)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        k = ids.shape[0] * (ids.shape[1] - 1)
        total += float(causal_lm_loss(model, ids)) * k
        n += k
    model.train(was)
    return total / n


def cosine_decay(frac: float, min_ratio: float) -> float:
    """The learning-rate factor at fraction `frac` of the decay: 1 at 0, cosine down to
    min_ratio at 1 (and after)."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * cosine_decay((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), cfg.min_lr_ratio)


def _peak_rss() -> int | None:
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # KiB on Linux
    except Exception:
        return None


def _checkpointing(model: nn.Module, on: bool) -> None:
    """transformers 5 names it activation checkpointing; 4.x gradient checkpointing."""
    new, old = ("activation_checkpointing_enable", "gradient_checkpointing_enable") if on else \
        ("activation_checkpointing_disable", "gradient_checkpointing_disable")
    if hasattr(model, new):
        fn, kw = getattr(model, new), ("activation_checkpointing_kwargs" if on else None)
    elif hasattr(model, old):
        fn, kw = getattr(model, old), ("gradient_checkpointing_kwargs" if on else None)
    else:
        raise LowbitError(f"train: grad_checkpointing asked, but {type(model).__name__} has no {new}()")
    fn(**({kw: {"use_reentrant": False}} if kw else {}))


def train(model: nn.Module, windows: torch.Tensor, cfg: TrainConfig, *, optimizer: torch.optim.Optimizer | None = None,
          loss_fn=causal_lm_loss, log=None) -> TrainResult:
    """`cfg.steps` optimizer steps over `windows` (cycled in order, `cfg.batch_size` per step).

    Trains whatever in `model` has requires_grad; `optimizer` defaults to AdamW over those. A
    non-finite loss stops the run with an error naming the step, never a silent NaN model."""
    cfg.check()
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise LowbitError(f"windows: expected a (n, seq_len) int64 tensor, got {tuple(windows.shape)} {windows.dtype}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LowbitError("train: no parameter of the model has requires_grad; nothing to train")
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(cfg.seed)
    if cfg.grad_checkpointing:
        _checkpointing(model, True)
    model.train()
    losses, lrs = [], []
    t0 = time.perf_counter()
    n = windows.shape[0]
    try:
        for step in range(cfg.steps):
            idx = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % n
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:   # a group's "lr_ratio" keeps it at a fixed fraction
                g["lr"] = lr * g.get("lr_ratio", 1.0)
            loss = loss_fn(model, windows[idx])
            if not torch.isfinite(loss):
                raise LowbitError(f"train: loss is {float(loss)} at step {step}; lower the learning rate "
                                  f"(lr={cfg.lr}) or check the model's weights")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            losses.append(float(loss))
            lrs.append(lr)
            if log and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                log(f"step {step + 1}/{cfg.steps} loss {losses[-1]:.4f} lr {lr:.2e}")
    finally:
        model.eval()
        if cfg.grad_checkpointing:
            _checkpointing(model, False)
    return TrainResult(losses=losses, lrs=lrs, seconds=time.perf_counter() - t0,
                       tokens=cfg.steps * cfg.batch_size * windows.shape[1], peak_rss_bytes=_peak_rss(),
                       config=asdict(cfg))
