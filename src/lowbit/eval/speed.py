"""Speed: prompt processing and decode tokens/s at batch 1, greedy, with a KV cache.

One run = greedy_generate(prompt, new_tokens) (through lowbit.nn.step for Llama-family models:
fused q/k/v and gate/up calls, a preallocated KV cache; the HF forward otherwise):

    prefill   one forward over the prompt_len prompt tokens (fresh KV cache, logits of the last
              position only)                               -> prompt tokens/s = prompt_len / t_prefill
    decode    new_tokens - 1 single-token forwards, each feeding the previous argmax and reading
              the KV cache; the first new token comes from the prefill
                                                           -> decode tokens/s = (new_tokens-1) / t_decode

`warmup` runs are made first (allocator, oneDNN primitive caches) and dropped; the figures are the
median over `runs` runs (the spread is kept in the record). This is llama-bench's pp / tg split
(llama.cpp tools/llama-bench), measured through the model's own forward.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from lowbit.errors import LowbitError


_PATHS = {
    "reference": "reference (dequantize the whole weight on every forward, then matmul)",
    "ext": "packed codes, lowbit C++ kernels",
    "torch": "packed codes, torch int4/int8 kernels",
    "tiled": "packed codes, tile-by-tile dequantize + matmul",
}


def inference_path(model: torch.nn.Module) -> dict:
    """How the model's quantized layers run (reported next to speed; changes nothing).

    QuantLinear's own forward is the reference path; `lowbit.nn.prepare.prepare_for_inference`
    swaps in PackedLinear modules with packed kernels, which is what a user runs.
    """
    from collections import Counter

    from lowbit.nn.qlinear import QuantLinear
    kinds: Counter = Counter()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            b = getattr(m, "backend", None)
            kinds[b if isinstance(b, str) else ("custom kernel" if m.kernel is not None else "reference")] += 1
    if not kinds:
        return {"quant_linears": 0, "backends": {}, "path": "float (no quantized layers)"}
    path = "; ".join(f"{n} layers: {_PATHS.get(k, k)}" for k, n in kinds.most_common())
    return {"quant_linears": sum(kinds.values()), "backends": dict(kinds), "path": path}


def _supports_logits_to_keep(model) -> bool:
    import inspect
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class Generation:
    tokens: list[int]              # the new tokens (greedy)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt_ids: torch.Tensor, new_tokens: int,
                    eos_token_id: int | None = None) -> Generation:
    """Batch-1 greedy decoding with the model's KV cache (past_key_values), timed in two parts."""
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise LowbitError(f"prompt_ids: expected a non-empty 1-D tensor of token ids, got shape "
                          f"{tuple(prompt_ids.shape)}")
    if new_tokens < 1:
        raise LowbitError(f"new_tokens: expected >= 1, got {new_tokens}")
    from lowbit.nn.step import step_model
    sm = step_model(model)
    if sm is not None:   # Llama-family: lowbit.nn.step (fused calls, preallocated KV cache)
        return _greedy_step(sm, prompt_ids, new_tokens, eos_token_id)
    kw = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    t0 = time.perf_counter()
    out = model(input_ids=prompt_ids.view(1, -1), use_cache=True, **kw)
    nxt = out.logits[0, -1].argmax()
    t1 = time.perf_counter()
    past = out.past_key_values
    toks = [int(nxt)]
    steps = 0
    for _ in range(new_tokens - 1):
        if eos_token_id is not None and toks[-1] == eos_token_id:
            break
        out = model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True, **kw)
        past = out.past_key_values
        nxt = out.logits[0, -1].argmax()
        toks.append(int(nxt))
        steps += 1
    t2 = time.perf_counter()
    return Generation(toks, t1 - t0, t2 - t1, steps)


def _greedy_step(sm, prompt_ids: torch.Tensor, new_tokens: int, eos_token_id: int | None) -> Generation:
    cache = sm.new_cache(prompt_ids.numel() + new_tokens)
    t0 = time.perf_counter()
    nxt = sm.step(prompt_ids, 0, cache).argmax()
    t1 = time.perf_counter()
    toks, steps = [int(nxt)], 0
    for _ in range(new_tokens - 1):
        if eos_token_id is not None and toks[-1] == eos_token_id:
            break
        nxt = sm.step(nxt.view(1), cache.pos, cache).argmax()
        toks.append(int(nxt))
        steps += 1
    return Generation(toks, t1 - t0, time.perf_counter() - t1, steps)


@dataclass
class SpeedResult:
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    prompt_len: int
    new_tokens: int
    runs: int
    warmup: int
    threads: int
    prefill_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    inference_path: str = ""
    method: str = ""
    completion: list[int] = field(default_factory=list)   # greedy tokens of the runs (all equal)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_speed(model: torch.nn.Module, prompt_ids: torch.Tensor, *, new_tokens: int = 32,
                  runs: int = 3, warmup: int = 1, progress: bool = True) -> SpeedResult:
    """Median prompt-processing and decode tokens/s over `runs` greedy runs (after `warmup`)."""
    if runs < 1:
        raise LowbitError(f"runs: expected >= 1, got {runs}")
    if new_tokens < 2:
        raise LowbitError(f"new_tokens: need >= 2 to time at least one decode step, got {new_tokens}")
    path = inference_path(model)["path"]
    it = range(warmup + runs)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="speed", unit="run", dynamic_ncols=True)
    pre, dec, completion = [], [], None
    for k in it:
        # warm-up runs decode 2 tokens: enough to build every kernel the timed runs use
        g = greedy_generate(model, prompt_ids, 2 if k < warmup else new_tokens)
        if k < warmup:
            continue
        if g.decode_steps != new_tokens - 1:
            raise LowbitError(f"speed: decoded {g.decode_steps} steps, expected {new_tokens - 1}")
        pre.append(g.prefill_seconds)
        dec.append(g.decode_seconds)
        if completion is None:
            completion = g.tokens
        elif completion != g.tokens:  # greedy on fixed weights must repeat itself
            raise LowbitError("speed: greedy decoding gave different tokens on two runs "
                              "(non-deterministic kernels?)")
    n = prompt_ids.numel()
    return SpeedResult(
        prompt_tokens_per_s=n / statistics.median(pre),
        decode_tokens_per_s=(new_tokens - 1) / statistics.median(dec),
        prompt_len=n, new_tokens=new_tokens, runs=runs, warmup=warmup, threads=torch.get_num_threads(),
        prefill_seconds=[round(x, 4) for x in pre], decode_seconds=[round(x, 4) for x in dec],
        inference_path=path, completion=completion or [],
        method=(f"batch 1, greedy, KV cache; prefill of {n} prompt tokens (last-position logits), then "
                f"{new_tokens - 1} single-token decode steps; median of {runs} runs after {warmup} "
                f"warm-up; torch threads {torch.get_num_threads()}"))
