"""The KV cache's rounding at long context: perplexity, KL and top-1 of a quantized cache against
the float cache, on the same model and windows, by position.

    for each window of `ctx` tokens, chunk by chunk (`chunk` tokens per step):
        float cache:  logits_f = step(chunk, pos, cache_f, all_logits)
        kv cache:     logits_q = step(chunk, pos, cache_q, all_logits)
        per position: nll_f, nll_q (next token), KL(p_f || p_q), argmax equal

Both caches run through lowbit.nn.step (the path `lowbit generate` decodes with), so the rows
differ only by the cache's rounding; every position after the first chunk reads earlier chunks
back from the cache, which is what decoding at that depth does. The float model or a quantized
one: the weights are whatever `model` holds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError


@torch.inference_mode()
def long_context(model: torch.nn.Module, ids: torch.Tensor, ctx: int, kv: str, *, chunk: int = 256,
                 windows: int | None = None, buckets: int = 4) -> dict:
    """ids (N,) token ids; windows of `ctx` tokens (the first `windows` of them). Returns
    {"kv", "ctx", "chunk", "tokens", "ppl_float", "ppl_kv", "dppl", "kl", "top1",
     "by_position": [{"from", "to", "dnll", "kl"}, ...], "cache_bytes_float", "cache_bytes_kv"}."""
    from lowbit.nn.step import step_model
    sm = step_model(model, True)     # LowbitError naming why, for a model the step path cannot run
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ctx < 2 or (limit and ctx > int(limit)):
        raise LowbitError(f"KV cache evaluation: ctx must be in 2..{limit}, got {ctx}")
    if chunk < 1:
        raise LowbitError(f"KV cache evaluation: chunk must be >= 1, got {chunk}")
    ids = ids.reshape(-1)
    n = ids.numel() // ctx if windows is None else min(windows, ids.numel() // ctx)
    if n < 1:
        raise LowbitError(f"KV cache evaluation: {ids.numel()} tokens hold no window of {ctx}")
    edges = [round(i * (ctx - 1) / buckets) for i in range(buckets + 1)]
    nll_f = torch.zeros(ctx - 1, dtype=torch.float64)
    nll_q = torch.zeros(ctx - 1, dtype=torch.float64)
    kl = torch.zeros(ctx - 1, dtype=torch.float64)
    top = torch.zeros(ctx - 1, dtype=torch.float64)
    bytes_f = bytes_q = 0
    for w in range(n):
        seq = ids[w * ctx:(w + 1) * ctx]
        cf, cq = sm.new_cache(ctx), sm.new_cache(ctx, kv)
        bytes_f, bytes_q = cf.nbytes(), cq.nbytes()
        for p0 in range(0, ctx, chunk):
            p1 = min(ctx, p0 + chunk)
            lf = sm.step(seq[p0:p1], p0, cf, all_logits=True).float()
            lq = sm.step(seq[p0:p1], p0, cq, all_logits=True).float()
            if not bool(torch.isfinite(lq).all()):
                raise LowbitError(f"KV cache evaluation: the {kv} cache gives NaN/inf logits in window {w}, "
                                  f"positions {p0}..{p1 - 1}")
            r1 = min(p1, ctx - 1)           # rows with a next token inside the window
            if r1 <= p0:
                continue
            lf, lq = lf[:r1 - p0], lq[:r1 - p0]
            tgt = seq[p0 + 1:r1 + 1]
            lpf, lpq = F.log_softmax(lf, -1), F.log_softmax(lq, -1)
            nll_f[p0:r1] += -lpf.gather(1, tgt[:, None])[:, 0].double()
            nll_q[p0:r1] += -lpq.gather(1, tgt[:, None])[:, 0].double()
            kl[p0:r1] += (lpf.exp() * (lpf - lpq)).sum(-1).clamp_min(0).double()
            top[p0:r1] += (lf.argmax(-1) == lq.argmax(-1)).double()
    tokens = n * (ctx - 1)
    out = {"kv": kv, "ctx": ctx, "chunk": chunk, "windows": n, "tokens": tokens,
           "ppl_float": math.exp(float(nll_f.sum()) / tokens), "ppl_kv": math.exp(float(nll_q.sum()) / tokens),
           "kl": float(kl.sum()) / tokens, "top1": float(top.sum()) / tokens,
           "cache_bytes_float": bytes_f, "cache_bytes_kv": bytes_q, "by_position": []}
    out["dppl"] = out["ppl_kv"] - out["ppl_float"]
    for a, b in zip(edges[:-1], edges[1:]):
        m = n * (b - a)
        out["by_position"].append({"from": a, "to": b, "dnll": float((nll_q[a:b] - nll_f[a:b]).sum()) / m,
                                   "kl": float(kl[a:b].sum()) / m})
    return out
