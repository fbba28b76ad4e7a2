"""Perplexity over non-overlapping token windows, and the one forward pass every quality metric
shares.

Method (stated in every result, `PerplexityResult.method`):

    text  -> token ids (no special tokens, no BOS inserted)
          -> non-overlapping windows of `seq_len` tokens from the start (stride = seq_len; the
             ragged tail and anything past `max_tokens` are dropped)
    each window is one forward pass with an empty cache; logits at position j predict token j+1:

        window   t0 t1 t2 ... t(L-2) t(L-1)
        logits   l0 l1 l2 ... l(L-2)            l_j scores t(j+1)
        scored   j in [start, L-1)              start = 0 ("all") or L//2 ("second-half")

    PPL = exp(mean NLL), the mean over every scored token of every window, accumulated in float64.

"all" scores every token after the first of each window (L-1 per window). "second-half" is
llama.cpp's `llama-perplexity` convention (tools/perplexity/perplexity.cpp: `first = n_ctx/2`,
`n_ctx - 1 - first` tokens per chunk), so every scored token has at least L/2 tokens of context;
use it to compare with llama.cpp like-for-like. llama.cpp also puts BOS at the start of each chunk
when the vocabulary asks for one; SmolLM2's does not (add_bos_token=False), so neither do we.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from lowbit.data import load_text, token_windows, tokenize_text
from lowbit.errors import LowbitError

SCORE_MODES = ("all", "second-half")
DEFAULT_SEQ_LEN = 512
# 64 windows of 512 = 32,704 scored tokens. Measured on the 2-core box: the fp32 bundled model
# runs ~230 tokens/s over 512-token windows when the box is quiet (so ~2.5 min), and 3-8x slower
# when other jobs share the two cores.
DEFAULT_MAX_TOKENS = 32768

# consumer(window_index, logprobs (T, V) float32, targets (T,) int64) for the scored positions
WindowConsumer = Callable[[int, torch.Tensor, torch.Tensor], None]


def score_start(seq_len: int, score: str) -> int:
    """First scored logit position of a window (see module docstring)."""
    if score not in SCORE_MODES:
        raise LowbitError(f"score: expected one of {SCORE_MODES}, got {score!r}")
    if seq_len < 2:
        raise LowbitError(f"seq_len: need at least 2 tokens per window to score one, got {seq_len}")
    return 0 if score == "all" else seq_len // 2


def method_string(seq_len: int, score: str, n_windows: int) -> str:
    start = score_start(seq_len, score)
    per = seq_len - 1 - start
    which = ("every token after the first of each window" if score == "all"
             else f"the second half of each window (positions {start + 1}..{seq_len - 1}, as llama.cpp)")
    return (f"{n_windows} non-overlapping windows of {seq_len} tokens (stride {seq_len}, empty cache "
            f"per window, no BOS inserted); scored {which}: {per} tokens/window; "
            "PPL = exp(mean NLL), NLL summed in float64")


def eval_windows(tokenizer, text: str | os.PathLike = "wiki-evaluation", seq_len: int = DEFAULT_SEQ_LEN,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> torch.Tensor:
    """(n_windows, seq_len) int64: the first max_tokens // seq_len non-overlapping windows of `text`."""
    if not isinstance(max_tokens, int) or max_tokens < seq_len:
        raise LowbitError(f"max_tokens: expected an integer >= seq_len ({seq_len}), got {max_tokens!r}")
    ids = tokenize_text(tokenizer, load_text(text))
    return token_windows(ids, seq_len, max_windows=max_tokens // seq_len)


@torch.no_grad()
def window_logprobs(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """(L,) token ids -> (L, V) float32 log-softmax of the next-token logits, one forward pass."""
    logits = model(input_ids=window.view(1, -1), use_cache=False).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    if not bool(torch.isfinite(lp).all()):
        raise LowbitError("model output: non-finite log-probabilities (NaN/inf in the logits); "
                          "the model or its quantized weights are broken")
    return lp


@dataclass
class PerplexityResult:
    ppl: float
    nll_mean: float             # nats per scored token
    nll_stderr: float           # standard error of nll_mean (std / sqrt(n)); PPL's ~1-sigma band is ppl*(1 +- this)
    tokens_scored: int
    windows: int
    seq_len: int
    score: str
    method: str
    seconds: float
    tokens_per_second: float    # forward throughput over the windows (includes log-softmax)

    def to_dict(self) -> dict:
        return asdict(self)


def score_windows(model: torch.nn.Module, windows: torch.Tensor, *, score: str = "all",
                  consumers: Iterable[WindowConsumer] = (), progress: bool = True,
                  desc: str = "perplexity") -> PerplexityResult:
    """One forward pass per window: perplexity, and each consumer sees the scored log-probs
    (KL against a reference and reference collection ride on the same pass)."""
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise LowbitError(f"windows: expected a (n, seq_len) int64 tensor, got {tuple(windows.shape)} "
                          f"{windows.dtype}")
    n, seq_len = windows.shape
    start = score_start(seq_len, score)
    consumers = list(consumers)
    it = range(n)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, unit="window", total=n, dynamic_ncols=True)
    nll_sum = 0.0
    nll_sq = 0.0
    count = 0
    t0 = time.perf_counter()
    for i in it:
        w = windows[i]
        lp = window_logprobs(model, w)[start:seq_len - 1]       # (T, V), T = L-1-start
        targets = w[start + 1:]                                 # (T,)
        nll = -lp.gather(1, targets.view(-1, 1)).squeeze(1).double()
        nll_sum += float(nll.sum())
        nll_sq += float((nll * nll).sum())
        count += nll.numel()
        for c in consumers:
            c(i, lp, targets)
    seconds = time.perf_counter() - t0
    mean = nll_sum / count
    var = max(nll_sq / count - mean * mean, 0.0)
    return PerplexityResult(
        ppl=math.exp(mean), nll_mean=mean, nll_stderr=math.sqrt(var / max(count - 1, 1)),
        tokens_scored=count, windows=n, seq_len=seq_len, score=score,
        method=method_string(seq_len, score, n), seconds=seconds,
        tokens_per_second=n * seq_len / seconds if seconds > 0 else float("inf"))


def perplexity(model: torch.nn.Module, tokenizer, *, text: str | os.PathLike = "wiki-evaluation",
               seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int = DEFAULT_MAX_TOKENS,
               score: str = "all", progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `text` (see the module docstring for the exact method)."""
    score_start(seq_len, score)
    windows = eval_windows(tokenizer, text, seq_len, max_tokens)
    return score_windows(model, windows, score=score, progress=progress)
