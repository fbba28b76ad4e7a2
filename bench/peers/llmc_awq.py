"""Run llm-compressor's AWQModifier (+ QuantizationModifier) on a Hugging Face directory with given
calibration windows; the peer row of bench/bench_activations.py --part llmc-awq.

Runs in llm-compressor's own venv (bench/.venv-llmc, llm-compressor 0.14 API):

    bench/.venv-llmc/bin/python bench/peers/llmc_awq.py --model-dir DIR --tokens calib.pt \
        --bits 4 --group-size 64 --dump OUT.pt [--save DIR] [--bypass-divisibility]

AWQ folds its scales into the norms and linears, so OUT.pt holds every floating tensor lowbit must
load: the norms' (smoothed) weights and, per quantized linear, the weight quantized and
dequantized by compressed-tensors' own fake_quantize with the scales llm-compressor chose. A
JSON line on stdout gives wall time, peak RSS and versions, or the error llm-compressor raised
(a group size that does not divide a layer: 576 % 128 != 0 on the bundled model, so g128 is
refused unless --bypass-divisibility). --save DIR also writes llm-compressor's own compressed
checkpoint (save_pretrained, save_compressed=True) for lowbit's compressed-tensors reader.
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
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bypass-divisibility", action="store_true",
                    help="llm-compressor's bypass_divisibility_checks (it refuses a ragged group by default)")
    ap.add_argument("--save", default="", help="also save llm-compressor's compressed checkpoint here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dump", required=True)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM

    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins the cached block inputs before each grid search (for
        # faster host-to-device copies); pin_memory needs an accelerator and raises on a CPU-only
        # torch ("Cannot access accelerator device when none is available"). Pinning changes no
        # value, so on the CPU it is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        result_patch = "IntermediatesCache.pin_memory skipped (CPU-only torch)"
    else:
        result_patch = None
    tokens = torch.load(args.tokens)
    result = {"tool": "llm-compressor AWQModifier", "llmcompressor": llmcompressor.__version__,
              "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__,
              "n_samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "bits": args.bits,
              "group_size": args.group_size, "bypass_divisibility_checks": args.bypass_divisibility,
              "patch": result_patch}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=False, strategy="group",
                               group_size=args.group_size)
    recipe = [AWQModifier(),
              QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                   ignore=["lm_head"], bypass_divisibility_checks=args.bypass_divisibility)]
    t0 = time.perf_counter()
    try:
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=int(tokens.shape[0]),
                max_seq_length=int(tokens.shape[1]), shuffle_calibration_samples=False)
    except Exception as e:
        traceback.print_exc()                 # the whole stack to stderr, its tail in the JSON line
        result.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
        print(json.dumps(result))
        return 0
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dump = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale"):
                dump[f"{name}.weight"] = fake_quantize(mod.weight, mod.weight_scale, getattr(mod, "weight_zero_point", None),
                                                       mod.quantization_scheme.weights).float().clone()
            elif "norm" in name.rsplit(".", 1)[-1] and getattr(mod, "weight", None) is not None:
                dump[f"{name}.weight"] = mod.weight.detach().float().clone()
    tmp = args.dump + f".tmp{os.getpid()}"
    torch.save(dump, tmp)
    os.replace(tmp, args.dump)
    result.update(ok=True, n_tensors=len(dump))
    if args.save:
        model.save_pretrained(args.save, save_compressed=True)
        import shutil
        from pathlib import Path
        for f in Path(args.model_dir).iterdir():      # the tokenizer, for a loader that wants one
            if f.name.startswith(("tokenizer", "special_tokens_map", "chat_template")):
                shutil.copy2(f, Path(args.save) / f.name)
        result["saved"] = args.save
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
