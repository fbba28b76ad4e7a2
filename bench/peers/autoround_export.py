"""Make a GPTQ-format or AWQ-format checkpoint of a Hugging Face model with AutoRound, on CPU.

Runs in bench/.venv-llmc (auto-round comes with llm-compressor there):

    bench/.venv-llmc/bin/python bench/peers/autoround_export.py --model-dir DIR --calib calib.npy \
        --format auto_gptq|auto_awq --out OUT_DIR [--bits 4 --group-size 64] [--asym] \
        [--iters 0] [--nsamples 16] [--threads 2]

AutoRound's `quantize_and_save(format=...)` writes the classic packed layouts:
  auto_gptq  quantization_config.quant_method "gptq": qweight int32 (in/8, out), qzeros int32
             (groups, out/8), scales fp16 (groups, out), g_idx int32 (in,) (sequential: AutoRound
             has no activation reordering, so desc_act is false)
  auto_awq   quant_method "awq", version "gemm": qweight int32 (in, out/8) in AWQ's interleaved
             nibble order, qzeros int32 (groups, out/8), scales fp16 (groups, out); AWQ is asymmetric
--iters 0 is AutoRound's RTN mode (no sign-gradient tuning; fast); --iters N > 0 tunes N steps per
block on the calibration windows (`calib.npy` from bench/peers/peer_inputs.py, passed as a list
of (1, seq) tensors so no dataset is fetched). lm_head is left in float (tied to the embedding).
OUT_DIR/peer.json records tool, versions, arguments and the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--calib", required=True, help=".npy (n, seq) int64 token ids")
    ap.add_argument("--format", required=True, choices=["auto_gptq", "auto_awq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true", help="asymmetric (zero points); auto_awq is always asym")
    ap.add_argument("--iters", type=int, default=0, help="0 = RTN mode")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sym = not args.asym and args.format != "auto_awq"

    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    import auto_round
    import transformers
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = np.load(args.calib)[: args.nsamples]
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = [torch.as_tensor(row, dtype=torch.long)[None, :] for row in tokens]
    kwargs = dict(bits=args.bits, group_size=args.group_size, sym=sym, iters=args.iters,
                  nsamples=int(tokens.shape[0]), seqlen=int(tokens.shape[1]), dataset=dataset,
                  device_map="cpu", seed=42)
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, **kwargs)
    ar.quantize_and_save(str(tmp), format=args.format)
    wall = time.perf_counter() - t0
    # quantize_and_save may put the files in a sub-folder per format; find the config.json
    cfgs = sorted(tmp.rglob("config.json"))
    if not cfgs:
        sys.exit(f"AutoRound wrote no config.json under {tmp}")
    src = cfgs[0].parent
    cfg = json.loads(cfgs[0].read_text()).get("quantization_config")
    info = {"tool": "auto-round", "versions": {"auto_round": auto_round.__version__,
                                               "transformers": transformers.__version__,
                                               "torch": torch.__version__},
            "format": {"auto_gptq": "gptq", "auto_awq": "awq"}[args.format], "autoround_format": args.format,
            "arguments": {k: v for k, v in kwargs.items() if k != "dataset"},
            "calibration": {"file": os.path.abspath(args.calib), "shape": list(tokens.shape)},
            "source_model_dir": os.path.abspath(args.model_dir),
            "command": [sys.executable, *sys.argv], "threads": args.threads,
            "quantize_wall_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "quantization_config": cfg}
    (src / "peer.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(src, out)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: info[k] for k in ("tool", "format", "quantize_wall_s", "peak_rss_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
