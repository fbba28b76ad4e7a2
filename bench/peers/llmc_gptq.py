"""Run llm-compressor's GPTQModifier on a Hugging Face directory with given calibration windows.

Runs in llm-compressor's own venv (bench/.venv-llmc, never lowbit's .venv):

    bench/.venv-llmc/bin/python bench/peers/llmc_gptq.py --model-dir DIR --tokens calib.pt \
        --bits 4 --group-size 64 [--sym] [--actorder static|weight|none] --dump OUT.pt

`calib.pt` holds the (n_samples, seq_len) LongTensor of token windows lowbit calibrates on
(bench/bench_gptq.py writes it), so both tools see the very same tokens. The quantized weights
that llm-compressor leaves in the model (module.weight = its dequantized grid values, next to
weight_scale / weight_zero_point) are written to OUT.pt as {linear name: fp32 weight} so lowbit can
evaluate them with the same perplexity code and text as its own models; a JSON line on stdout
gives wall time (oneshot only, model load excluded), peak RSS and versions, or the error
llm-compressor raised (e.g. a group size that does not divide a layer).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--tokens", required=True, help=".pt file with an (n, seq) LongTensor")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="-1: per output channel")
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--actorder", default="none", choices=["none", "static", "weight", "group"])
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bypass-divisibility", action="store_true",
                    help="llm-compressor's bypass_divisibility_checks: allow a group size that does "
                         "not divide a layer (it refuses by default)")
    ap.add_argument("--dump", required=True, help="where to write {name: dequantized weight}")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    tokens = torch.load(args.tokens)
    result = {"tool": "llm-compressor", "llmcompressor": llmcompressor.__version__,
              "compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__,
              "torch": torch.__version__, "threads": args.threads, "n_samples": int(tokens.shape[0]),
              "seq_len": int(tokens.shape[1]), "bits": args.bits, "group_size": args.group_size,
              "symmetric": args.sym, "actorder": args.actorder, "dampening": args.dampening,
              "bypass_divisibility_checks": args.bypass_divisibility, "batch_size": args.batch_size}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(),
                            "attention_mask": torch.ones_like(tokens).tolist()})
    strategy = "channel" if args.group_size == -1 else "group"
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym, strategy=strategy,
                               group_size=None if args.group_size == -1 else args.group_size)
    modifier = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            ignore=["lm_head"], dampening_frac=args.dampening, block_size=args.block_size,
                            actorder=None if args.actorder == "none" else args.actorder,
                            bypass_divisibility_checks=args.bypass_divisibility)
    t0 = time.perf_counter()
    try:
        oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=int(tokens.shape[0]),
                max_seq_length=int(tokens.shape[1]), batch_size=args.batch_size,
                shuffle_calibration_samples=False)
    except Exception as e:  # record what the peer refuses, e.g. a ragged group size
        result.update(ok=False, error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc(limit=4)[-2000:],
                      wall_s=time.perf_counter() - t0)
        print(json.dumps(result))
        return 0
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dump = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale"):
            dump[name] = mod.weight.detach().float().clone()
    tmp = args.dump + f".tmp{os.getpid()}"
    torch.save(dump, tmp)
    os.replace(tmp, args.dump)
    result.update(ok=True, n_quantized=len(dump))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
