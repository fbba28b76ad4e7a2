"""Fold a per-channel scale into a (producer, consumers) pair: the float outputs are unchanged.

    producer (norm or linear) ─ x ─┬─ consumer_1 (W_1)         x' = x / s        (producer / s)
                                   └─ consumer_2 (W_2)         W_i' = W_i * s    (columns)
    W_i' x' = (W_i diag(s)) (diag(s)^-1 x) = W_i x

s lives in the producer's output space (d,). A consumer reading more channels than the producer
makes (grouped-query attention: o_proj reads n_heads * head_dim, v_proj makes n_kv * head_dim)
sees each kv head repeated for the n_rep query heads that share it (transformers' repeat_kv:
query head h reads kv head h // n_rep), so the consumer's column scale is `expand_heads(s)`.

    producer = norm: weight (offset + w) / s - offset (offset 1 for Gemma's x * (1 + w)), bias / s
    producer = linear: rows / s (weight (out, in)), bias / s
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lowbit.errors import LowbitError


def n_rep_of(producer_out: int, consumer_in: int, name: str) -> int:
    if consumer_in % producer_out:
        raise LowbitError(f"smoothing pair {name}: the consumer reads {consumer_in} channels, not a "
                          f"multiple of the producer's {producer_out}")
    return consumer_in // producer_out


def expand_heads(s: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """(n_kv * head_dim,) -> (n_kv * n_rep * head_dim,): each kv head's scales for its n_rep query heads."""
    if n_rep == 1:
        return s
    return s.view(-1, 1, head_dim).expand(-1, n_rep, head_dim).reshape(-1)


def reduce_heads(v: torch.Tensor, n_rep: int, head_dim: int, how: str) -> torch.Tensor:
    """Consumer-space (.., n_kv * n_rep * head_dim) statistics back to the producer's (.., n_kv * head_dim):
    the mean or max over the query heads sharing a kv head."""
    if n_rep == 1:
        return v
    lead = v.shape[:-1]
    g = v.reshape(*lead, -1, n_rep, head_dim)
    r = g.mean(-2) if how == "mean" else g.amax(-2)
    return r.reshape(*lead, -1)


def producer_channels(producer: nn.Module) -> int:
    if isinstance(producer, nn.Linear):
        return producer.out_features
    w = getattr(producer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise LowbitError(f"smoothing producer {type(producer).__name__}: expected a norm with a 1-D weight "
                          "or an nn.Linear")
    return w.shape[0]


def fold_scales(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor, *, n_rep: int = 1,
                head_dim: int = 1, norm_offset: float = 0.0) -> None:
    """Apply x -> x / s at the producer's output and W -> W diag(s) at every consumer, in place."""
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise LowbitError("fold_scales: scales must be finite and positive")
    s64 = s.double()
    if isinstance(producer, nn.Linear):
        w = producer.weight
        producer.weight = nn.Parameter((w.double() / s64[:, None]).to(w.dtype), requires_grad=False)
    else:
        w = producer.weight
        producer.weight = nn.Parameter(((norm_offset + w.double()) / s64 - norm_offset).to(w.dtype),
                                       requires_grad=False)
    b = getattr(producer, "bias", None)
    if isinstance(b, torch.Tensor):
        producer.bias = nn.Parameter((b.double() / s64).to(b.dtype), requires_grad=False)
    full = expand_heads(s64, n_rep, head_dim)
    for c in consumers:
        if not isinstance(c, nn.Linear):
            raise LowbitError(f"smoothing consumer {type(c).__name__}: expected an nn.Linear")
        c.weight = nn.Parameter((c.weight.double() * full[None, :]).to(c.weight.dtype), requires_grad=False)
