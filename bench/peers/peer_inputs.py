"""Write the inputs every peer checkpoint is made from and checked on, with lowbit's own code.

Runs in lowbit's venv (it needs lowbit's loader and text windows):

    PYTHONPATH=src .venv/bin/python bench/peers/peer_inputs.py --out bench/out/peers/inputs \
        [--samples 16 --seq-len 256 --seed 0 --eval-tokens 64]

Writes into --out:
  model_dir.txt   the bundled model's fp32 Hugging Face directory (lowbit's cache; the peers load it)
  calib.npy       (samples, seq_len) int64: lowbit.data.text.calibration_batches of wiki-calibration
                  (seeded, the same windows lowbit's own GPTQ calibrates on)
  eval_ids.npy    (1, eval_tokens) int64: the first tokens of wiki-evaluation, no special tokens;
                  the fixed sequence every peer's logits are saved for
  inputs.json     what was written and how
Peer venvs only need numpy to read these, so no pickles cross the venv boundary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=64)
    args = ap.parse_args()

    from lowbit.data.text import calibration_batches, load_text, tokenize_text
    from lowbit.models.load import load_model

    lm = load_model(args.model)
    tok = lm.tokenizer
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = calibration_batches(tok, args.samples, args.seq_len, args.seed).numpy().astype(np.int64)
    ev = tokenize_text(tok, load_text("wiki-evaluation"))[: args.eval_tokens].numpy().astype(np.int64)[None, :]
    _save_npy(out / "calib.npy", calib)
    _save_npy(out / "eval_ids.npy", ev)
    (out / "model_dir.txt").write_text(str(lm.path) + "\n")
    info = {"model": args.model, "model_dir": str(lm.path),
            "calib": {"file": "calib.npy", "text": "wiki-calibration", "shape": list(calib.shape),
                      "seed": args.seed, "how": "lowbit.data.text.calibration_batches"},
            "eval_ids": {"file": "eval_ids.npy", "text": "wiki-evaluation", "shape": list(ev.shape),
                         "how": "first tokens of lowbit.data.text.tokenize_text (no special tokens)"}}
    (out / "inputs.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
