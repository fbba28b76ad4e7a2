"""Make a compressed-tensors checkpoint of a Hugging Face model with llm-compressor (GPTQ), on CPU.

Runs in llm-compressor's venv (bench/.venv-llmc):

    bench/.venv-llmc/bin/python bench/peers/llmc_export.py --model-dir DIR --calib calib.npy \
        --scheme w4a16-g64-sym|w4a16-g64-asym|w8a8 --out OUT_DIR [--actorder static|none] [--threads 2]

`calib.npy` is the (n, seq) int64 token array written by bench/peers/peer_inputs.py (lowbit's
own calibration windows). Schemes (compressed-tensors QuantizationArgs; lm_head ignored, it is
tied to the embedding here):
  w4a16-g64-sym   int4 weights, group 64, symmetric     -> format pack-quantized (no zero point)
  w4a16-g64-asym  int4 weights, group 64, asymmetric    -> format pack-quantized + weight_zero_point
  w8a8            int8 weights per output channel, symmetric; int8 activations dynamic per token,
                  symmetric (compressed-tensors' INT8_W8A8 preset) -> format int-quantized
Group 64, not 128: hidden size 576 is not a multiple of 128 and llm-compressor refuses groups
that do not divide a layer. The model is saved with llm-compressor's
`save_pretrained(save_compressed=True)` (+ tokenizer) into OUT_DIR (written to OUT_DIR.tmp, then
renamed), and OUT_DIR/peer.json records tool, versions, scheme and the command line.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

SCHEMES = ("w4a16-g64-sym", "w4a16-g64-asym", "w8a8")


def build_scheme(name: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    if name == "w8a8":
        w = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        a = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        return QuantizationScheme(targets=["Linear"], weights=w, input_activations=a)
    sym = name.endswith("-sym")
    w = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=64)
    return QuantizationScheme(targets=["Linear"], weights=w)


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--calib", required=True, help=".npy (n, seq) int64 token ids")
    ap.add_argument("--scheme", required=True, choices=SCHEMES)
    ap.add_argument("--actorder", default="static", choices=["static", "none"],
                    help="llm-compressor 0.14 knows only weight/static ordering (it does not change "
                         "the stored format: no g_idx); default static = llm-compressor's default")
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = np.load(args.calib)
    if tokens.ndim != 2:
        sys.exit(f"{args.calib}: expected an (n, seq) token array, got shape {tokens.shape}")
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": np.ones_like(tokens).tolist()})
    scheme = build_scheme(args.scheme)
    modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                            dampening_frac=args.dampening,
                            actorder=None if args.actorder == "none" else args.actorder)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=int(tokens.shape[0]),
            max_seq_length=int(tokens.shape[1]), batch_size=1, shuffle_calibration_samples=False)
    wall = time.perf_counter() - t0
    model.save_pretrained(str(tmp), save_compressed=True)
    tok.save_pretrained(str(tmp))
    cfg = json.loads((tmp / "config.json").read_text())["quantization_config"]
    info = {"tool": "llm-compressor", "versions": {
                "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__},
            "format": "compressed-tensors", "scheme": args.scheme,
            "recipe": {"modifier": "GPTQModifier", "config_groups": {"group_0": scheme.model_dump(mode="json")},
                       "ignore": ["lm_head"], "dampening_frac": args.dampening, "actorder": args.actorder},
            "calibration": {"file": os.path.abspath(args.calib), "shape": list(tokens.shape),
                            "batch_size": 1},
            "source_model_dir": os.path.abspath(args.model_dir),
            "command": [sys.executable, *sys.argv], "threads": args.threads,
            "oneshot_wall_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "quantization_config": cfg}
    (tmp / "peer.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(json.dumps({k: info[k] for k in ("tool", "scheme", "oneshot_wall_s", "peak_rss_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
