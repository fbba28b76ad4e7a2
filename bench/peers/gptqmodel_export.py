"""Make a GPTQ checkpoint (quant_method gptq) of a Hugging Face model with GPTQModel, on CPU.

Runs in bench/.venv-gptq:

    bench/.venv-gptq/bin/python bench/peers/gptqmodel_export.py --model-dir DIR --calib calib.npy \
        --out OUT_DIR [--bits 4 --group-size 64] [--desc-act] [--asym] [--dtype float32] [--threads 2]

GPTQModel's own GPTQ (QuantizeConfig + GPTQModel.load(...).quantize(...).save(...)), calibrated on
`calib.npy` (bench/peers/peer_inputs.py: lowbit's windows, passed as input_ids/attention_mask
lists, so no dataset is fetched). --desc-act = activation order (columns quantized by decreasing
Hessian diagonal; the checkpoint's g_idx then maps each input column to its group out of order);
without it, act_group_aware (GPTQModel's GAR default) is switched off too so g_idx is sequential.
--dtype float32 (default) loads and calibrates the model in fp32 like lowbit does; GPTQModel's own
default on CPU is bfloat16 (then the unquantized embedding/norms are saved as bf16 too).
Saved in GPTQ v1 layout (format "gptq": qzeros hold zero-1), which is what transformers reads.
OUT_DIR/peer.json records tool, versions, config and the command line.
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
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--damp-percent", type=float, default=0.01)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    # gptqmodel sizes its CPU thread pool as (cores+1)//2 = 1 on a 2-core box, then its model-loader
    # sub-pool asks for 2 and quantize() dies with "Virtual pool 'model_loader:cpu' requests 2
    # workers but parent 'cpu' only has 1"; its GPTQMODEL_CPU_WORKERS override avoids that.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, args.threads)))
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    import gptqmodel
    import transformers
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    tokens = np.load(args.calib)
    args.model_dir, args.calib = os.path.abspath(args.model_dir), os.path.abspath(args.calib)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    os.chdir(out.parent)  # quantize() writes logs/gptq_log_*.log into the cwd: keep them by the output
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    qcfg = dict(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, act_group_aware=False,
                sym=not args.asym, damp_percent=args.damp_percent, format="gptq", device="cpu")
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in tokens]
    t0 = time.perf_counter()
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = GPTQModel.load(args.model_dir, QuantizeConfig(**qcfg), dtype=dtype)  # QuantizeConfig.device="cpu"
    model.quantize(calib, batch_size=1, calibration_sort=None)
    wall = time.perf_counter() - t0
    model.save(str(tmp))
    AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(str(tmp))
    cfg = json.loads((tmp / "config.json").read_text()).get("quantization_config")
    info = {"tool": "gptqmodel", "versions": {"gptqmodel": gptqmodel.__version__,
                                              "transformers": transformers.__version__, "torch": torch.__version__},
            "format": "gptq", "quantize_config": qcfg, "dtype": args.dtype,
            "calibration": {"file": os.path.abspath(args.calib), "shape": list(tokens.shape), "batch_size": 1},
            "source_model_dir": os.path.abspath(args.model_dir),
            "command": [sys.executable, *sys.argv], "threads": args.threads,
            "quantize_wall_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "quantization_config": cfg}
    (tmp / "peer.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(json.dumps({k: info[k] for k in ("tool", "format", "quantize_wall_s", "peak_rss_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
