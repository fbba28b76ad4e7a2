"""SignRound's block output error on the first blocks of the bundled model, beside AutoRound's own
log of the same quantity (`loss iter 0 -> iter N` per block) on the same calibration tokens.

    .venv/bin/python bench/bench_low20_blocks.py --blocks 3 --iters 20 --bits 3 --init rtn

Block 0..B-1 are quantized with signround (the rest stay float, which does not change these
blocks' losses: block b sees blocks < b quantized, as in AutoRound). Prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--init", default="rtn")
    ap.add_argument("--rotate", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", default=str(HERE / "_work" / "low20" / "gptq" / "calib.pt"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from lowbit import api
    from lowbit.models import load_model
    from lowbit.numerics import int_scheme
    from lowbit.recipe import Recipe, Rule
    lm = load_model("smollm2-135m")
    tokens = torch.load(args.calib)
    pat = r"model\.layers\.(" + "|".join(str(b) for b in range(args.blocks)) + r")\."
    recipe = Recipe("blocks", [Rule(pat, int_scheme(args.bits, args.group, True), "signround",
                                    {"iters": args.iters, "init": args.init})],
                    transforms=[{"name": "rotate", "seed": 0}] if args.rotate else [])
    t0 = time.perf_counter()
    rep = api.quantize(lm.model, recipe, tokens=tokens, progress=False,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    per_block = {}
    for r in rep.layers:
        b = int(r["name"].split(".")[2])
        per_block[b] = (r["signround_loss_init"], r["signround_loss_best"])
    print(json.dumps({"args": vars(args), "wall_s": time.perf_counter() - t0, "timing": rep.timing,
                      "block_loss": per_block}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
