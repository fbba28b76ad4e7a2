"""The budget's sensitivity pass over many processes: torch.distributed (gloo) splits the blocks.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m lowbit.budget.distributed MODEL --samples 32 --seq-len 512
    lowbit quantize MODEL --budget 3.5bpw --samples 32 --seq-len 512 --out OUT   # finds it cached

torchrun starts the processes (--nnodes / --rdzv-endpoint span machines: gloo runs over TCP).
Every rank loads the model and draws the same calibration windows as `lowbit quantize --budget`
does for the same options. The gradient pass runs on every rank (it is short, and the labels are
drawn from one generator in batch order). Each rank then runs the float block pass and scores
the candidates of blocks r, r + W, ... (and the first exact_blocks blocks, which fix the GPTQ
estimate's correction, on every rank: the scoring of the other blocks needs it), and the ranks'
rows are gathered (sensitivity.py, `shard`). Scoring is per (block, group, candidate) and is
the pass's cost, so W ranks take about 1/W of it. Every number is the single process's.

Rank 0 writes the table to the sensitivity cache under the key `lowbit quantize --budget` looks
for (same model weights, windows, candidates, format, settings), and to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

# the settings `lowbit quantize --budget` computes its table with (budget.load_or_compute's
# defaults): the cached table is found only under the same key
FISHER_SAMPLES, EXACT_GPTQ, ANCHOR, EXACT_BLOCKS = 8, False, None, 1


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from lowbit.budget.sensitivity import cache_path, default_candidates, sensitivity, tokens_digest
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.eval.distributed import load_on_rank0_first
    from lowbit.eval.kl import model_fingerprint
    p = argparse.ArgumentParser(prog="python -m torch.distributed.run ... -m lowbit.budget.distributed",
                                description="the budget's sensitivity pass with its blocks split across "
                                            "torch.distributed ranks")
    p.add_argument("model", help="built-in name, .gguf or Hugging Face directory (float)")
    p.add_argument("--format", default="native", help="the output format the plan is for (bytes per candidate)")
    p.add_argument("--candidates", help="comma-separated candidate schemes (default: the format's)")
    p.add_argument("--samples", type=int, help="calibration windows (as lowbit quantize --samples)")
    p.add_argument("--seq-len", type=int, help="calibration window length")
    p.add_argument("--calib-text", help="calibration text (as lowbit quantize --calib-text)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--no-cache", action="store_true", help="do not write the table to the sensitivity cache")
    p.add_argument("--out", help="rank 0 also writes the table here as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        lm = load_on_rank0_first(a.model)
        overrides = {k: v for k, v in {"n_samples": a.samples, "seq_len": a.seq_len, "text": a.calib_text,
                                       "batch_size": a.batch_size}.items() if v is not None}
        tokens = calibration_tokens(lm.tokenizer, CalibrationConfig.from_dict(overrides))
        candidates = a.candidates.split(",") if a.candidates else list(default_candidates(a.format))
        t0 = time.perf_counter()
        s = sensitivity(lm.model, tokens, candidates=candidates, fmt=a.format, source_dir=lm.path,
                        fisher_samples=FISHER_SAMPLES, exact_gptq=EXACT_GPTQ, anchor=ANCHOR,
                        exact_blocks=EXACT_BLOCKS, shard=(rank, world),
                        log=(lambda m: print(f"[rank {rank}] {m}", file=sys.stderr, flush=True)))
        seconds = time.perf_counter() - t0
        if rank == 0:
            fp = model_fingerprint(lm.model)
            key, path = cache_path(fp, tokens, candidates, a.format, FISHER_SAMPLES, EXACT_GPTQ, ANCHOR,
                                   EXACT_BLOCKS)
            s.meta.update(key=key, model_sha256=fp, tokens_sha256=tokens_digest(tokens))
            if not a.no_cache:
                s.save(path)
            if a.out:
                s.save(a.out)
            print(json.dumps({"modules": len(s.modules), "candidates": len(candidates), "world_size": world,
                              "seconds": round(seconds, 1), "cache": None if a.no_cache else str(path)}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
