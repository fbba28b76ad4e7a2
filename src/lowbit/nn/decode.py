"""Token generation with a KV cache, timed: prefill (prompt tokens/s) and decode (tokens/s).

One loop for every model (float, QuantLinear reference, PackedLinear kernels), so speed
comparisons differ only in the linear layers. Llama-family models run lowbit.nn.step (fused
q/k/v and gate/up calls, a preallocated KV cache, fewer ops per block); others call the Hugging
Face model's forward with a DynamicCache directly instead of `model.generate`, whose per-step
logits processors and stopping criteria cost ~1 ms a token at this model size.

    prompt (1, P) --prefill--> logits[-1] --argmax/sample--> t1 --step--> t2 ... (KV cache grows)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lowbit.errors import LowbitError


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)   # generated ids (the prompt not included)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0                        # for tokens[1:], each one a cached step
    stopped_by: str = "max_new_tokens"

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1   # the first token comes from the prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds else float("nan")


def _pick(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator | None) -> int:
    if not bool(torch.isfinite(logits).all()):
        raise LowbitError(f"generate: the model's logits contain {int((~torch.isfinite(logits)).sum())} "
                          "NaN/inf value(s); the model's weights or activations are broken")
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0:
        v, i = torch.topk(logits, min(top_k, logits.numel()))
        return int(i[torch.multinomial(torch.softmax(v, -1), 1, generator=gen)])
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


def _forward_fn(model: torch.nn.Module, length: int, step: bool | None,
                kv_cache: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids (1, M) -> logits of the last position, keeping a KV cache of up to `length` positions
    (lowbit.nn.step when it runs the model, else the HF forward with a DynamicCache)."""
    from lowbit.nn.step import step_model, why_unsupported
    quant_kv = kv_cache not in (None, "float")
    sm = step_model(model, True if quant_kv and step is None else step)
    if sm is not None:
        cache = sm.new_cache(length, kv_cache)
        return lambda ids: sm.step(ids, cache.pos, cache)
    if quant_kv:
        raise LowbitError(f"generate: a {kv_cache} KV cache runs on lowbit's step path"
                          + (f", which does not run this model ({why_unsupported(model)})" if step is not False
                             else ", and step=False turns it off"))
    from transformers import DynamicCache
    state = {"past": DynamicCache()}

    def hf(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, past_key_values=state["past"], use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1]
    return hf


@torch.inference_mode()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             eos_token_id: int | list[int] | None = None, min_new_tokens: int = 0,
             on_token: Callable[[int], None] | None = None, step: bool | None = None,
             kv_cache: str | None = None) -> GenerationResult:
    """Greedy (temperature 0) or sampled generation of up to `max_new_tokens` after `input_ids` (1, P).

    on_token(id) is called as each token is chosen (streaming). EOS stops generation once
    `min_new_tokens` are out (benchmarks set min_new_tokens = max_new_tokens for a fixed count).
    step: None = lowbit.nn.step where it supports the model, else the HF forward; False = always
    the HF forward; True = the step path or LowbitError.
    kv_cache: None / "float" (the model's dtype), "int8" or "fp8": keys and values rounded per token
    and head as they enter the cache (nn/step.py KVCache; the step path only).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise LowbitError(f"generate: expected input_ids of shape (1, P>0), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise LowbitError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise LowbitError(f"generate: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise LowbitError(f"generate: top_k must be an integer >= 0 (0 = all), got {top_k!r}")
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None) if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and input_ids.numel() and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
        raise LowbitError(f"generate: token id {int(input_ids.max())} is outside the model's vocabulary "
                          f"of {vocab} (tokenizer and model do not match)")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    res = GenerationResult(prompt_tokens=int(input_ids.shape[1]))
    forward = _forward_fn(model, int(input_ids.shape[1]) + max_new_tokens, step, kv_cache)
    t0 = time.perf_counter()
    tok = _pick(forward(input_ids), temperature, top_k, gen)
    res.prefill_seconds = time.perf_counter() - t0
    res.tokens.append(tok)
    if on_token:
        on_token(tok)
    ids = torch.empty((1, 1), dtype=torch.long)
    t1 = time.perf_counter()
    while len(res.tokens) < max_new_tokens:
        if tok in eos and len(res.tokens) >= min_new_tokens:
            res.stopped_by = "eos"
            break
        ids[0, 0] = tok
        tok = _pick(forward(ids), temperature, top_k, gen)
        res.tokens.append(tok)
        if on_token:
            on_token(tok)
    res.decode_seconds = time.perf_counter() - t1
    return res
