"""lowbit's one exception type, and the input checks every entry point shares.

Errors name the argument, file or tensor, what was expected and what was found.
"""
from __future__ import annotations

import torch


class LowbitError(ValueError):
    """Bad input or a state lowbit refuses to work from; the message says what was expected."""


def check_float_tensor(x, name: str = "tensor", *, allow_empty: bool = False) -> torch.Tensor:
    """Refuse non-tensors, non-float dtypes, empty tensors and NaN/inf (never a silent NaN)."""
    if not isinstance(x, torch.Tensor):
        raise LowbitError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise LowbitError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0 and not allow_empty:
        raise LowbitError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")
    # Fast path: a finite sum proves every element finite (one reduction, no mask). An infinite
    # sum may be NaN/inf input or mere overflow of large finite values: then check element-wise.
    if x.numel() and not bool(torch.isfinite(x.sum(dtype=torch.float64))) and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise LowbitError(f"{name}: contains {n_bad} NaN/inf value(s) of {x.numel()}; "
                          "refusing to quantize non-finite input")
    return x


def check_context(config, seq_len: int, what: str = "seq_len") -> int:
    """Refuse a window longer than the model's context (config.max_position_embeddings)."""
    ctx = getattr(config, "max_position_embeddings", None)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise LowbitError(f"{what}: expected an integer >= 1, got {seq_len!r}")
    if isinstance(ctx, int) and ctx > 0 and seq_len > ctx:
        raise LowbitError(f"{what} {seq_len}: longer than the model's context of {ctx} tokens "
                          "(max_position_embeddings in config.json)")
    return seq_len
