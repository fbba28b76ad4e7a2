"""Perplexity over many processes: torch.distributed (gloo backend) splits the windows across ranks.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m lowbit.eval.distributed MODEL --seq-len 512 --max-tokens 8192 --out ppl.json

torchrun (torch.distributed.run) starts the processes and sets RANK / WORLD_SIZE / MASTER_ADDR;
the same command spans machines with --nnodes and --rdzv-endpoint (gloo runs over TCP). Every
rank loads the model and tokenizes the same text into the same windows (eval/perplexity.py's
method, unchanged). Rank r scores windows r, r + W, r + 2W, ... Each window's float64 NLL sum,
sum of squares and token count goes into its slot of an (n, 3) float64 tensor that is zero
elsewhere. One all_reduce(SUM) adds those tensors: a slot gets its own value plus zeros, which is
exact. Every rank then sums the windows in window order, as score_windows does. With the same
per-window arithmetic (the same torch thread count per process) the result is the single
process's to the last bit; across thread counts only the fp32 forward differs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from lowbit.errors import LowbitError
from lowbit.eval.perplexity import PerplexityResult, method_string, score_start, window_logprobs


def window_nll(model: torch.nn.Module, window: torch.Tensor, start: int) -> tuple[float, float, int]:
    """One window's (sum NLL, sum NLL^2, scored tokens), float64, as score_windows computes them."""
    seq_len = window.shape[0]
    lp = window_logprobs(model, window)[start:seq_len - 1]
    nll = -lp.gather(1, window[start + 1:].view(-1, 1)).squeeze(1).double()
    return float(nll.sum()), float((nll * nll).sum()), nll.numel()


def score_windows_distributed(model: torch.nn.Module, windows: torch.Tensor, *, score: str = "all",
                              group=None) -> PerplexityResult:
    """score_windows over the ranks of the initialised default process group (or `group`)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        raise LowbitError("distributed perplexity: torch.distributed is not initialised (run under torchrun, "
                          "or call torch.distributed.init_process_group('gloo') first)")
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise LowbitError(f"windows: expected a (n, seq_len) int64 tensor, got {tuple(windows.shape)} "
                          f"{windows.dtype}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n, seq_len = windows.shape
    start = score_start(seq_len, score)
    # every rank must hold the same windows: compare a digest first (a mismatch would mix texts)
    digest = torch.tensor([float(windows.sum()), float((windows * torch.arange(seq_len)).sum()), n],
                          dtype=torch.float64)
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        raise LowbitError(f"distributed perplexity: rank {rank}'s windows differ from another rank's "
                          "(same model, text, seq_len and max_tokens on every rank?)")
    sums = torch.zeros(n, 3, dtype=torch.float64)
    t0 = time.perf_counter()
    for i in range(rank, n, world):
        sums[i] = torch.tensor(window_nll(model, windows[i], start), dtype=torch.float64)
    mine = time.perf_counter() - t0
    dist.all_reduce(sums, dist.ReduceOp.SUM, group=group)
    slowest = torch.tensor([mine], dtype=torch.float64)
    dist.all_reduce(slowest, dist.ReduceOp.MAX, group=group)
    nll_sum = nll_sq = 0.0
    count = 0
    for i in range(n):                       # window order, as score_windows adds them
        nll_sum += float(sums[i, 0])
        nll_sq += float(sums[i, 1])
        count += int(sums[i, 2])
    mean = nll_sum / count
    var = max(nll_sq / count - mean * mean, 0.0)
    seconds = float(slowest)
    return PerplexityResult(
        ppl=math.exp(mean), nll_mean=mean, nll_stderr=math.sqrt(var / max(count - 1, 1)),
        tokens_scored=count, windows=n, seq_len=seq_len, score=score,
        method=method_string(seq_len, score, n) + f"; windows split over {world} gloo ranks",
        seconds=seconds, tokens_per_second=n * seq_len / seconds if seconds > 0 else float("inf"))


def load_on_rank0_first(model: str):
    """load_model on rank 0, then on the others: a GGUF's fp32 copy is made once, in the shared
    cache, by rank 0 (transformers saves checkpoints on rank 0 only; the others wait for it)."""
    import torch.distributed as dist

    from lowbit.models import load_model
    lm = load_model(model) if dist.get_rank() == 0 else None
    dist.barrier()
    return lm if lm is not None else load_model(model)


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from lowbit.eval.perplexity import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, eval_windows
    p = argparse.ArgumentParser(prog="python -m torch.distributed.run ... -m lowbit.eval.distributed",
                                description="perplexity with the windows split across torch.distributed ranks")
    p.add_argument("model", help="built-in name, .gguf, Hugging Face directory or any quantized output")
    p.add_argument("--text", default="wiki-evaluation")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--score", default="all", choices=("all", "second-half"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--out", help="rank 0 writes the result here as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo")
    try:
        lm = load_on_rank0_first(a.model)
        windows = eval_windows(lm.tokenizer, a.text, a.seq_len, a.max_tokens)
        res = score_windows_distributed(lm.model, windows, score=a.score)
        if dist.get_rank() == 0:
            rec = {**res.to_dict(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
                   "threads_per_rank": a.threads, "model": str(a.model)}
            if a.out:
                from lowbit.io import atomic_file
                with atomic_file(a.out, "w") as fh:
                    fh.write(json.dumps(rec, indent=1, sort_keys=True) + "\n")
            print(json.dumps({k: rec[k] for k in ("ppl", "tokens_scored", "windows", "world_size", "seconds")}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
