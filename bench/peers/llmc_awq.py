"""Run llm-compressor's AWQModifier (+ QuantizationModifier) on a Hugging Face directory with given
calibration windows; the peer row of bench/bench_activations.py --part llmc-awq.

Runs in llm-compressor's own venv (bench/.venv-llmc, llm-compressor 0.14 API):

    bench/.venv-llmc/bin/python bench/peers/llmc_awq.py --model-dir DIR --tokens calib.pt \
        --bits 4 --group-size 128 --dump OUT.pt

AWQ folds its scales into the norms and linears, so OUT.pt holds every floating tensor lowbit must
load: the norms' (smoothed) weights and, per quantized linear, the weight quantized and
dequantized by compressed-tensors' own fake_quantize with the scales llm-compressor chose. A
JSON line on stdout gives wall time, peak RSS and versions, or the error llm-compressor raised
(a group size that does not divide a layer: 576 % 128 != 0 on the bundled model, hence
--bypass-divisibility by default).
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
    ap.add_argument("--group-size", type=int, default=128)
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

    tokens = torch.load(args.tokens)
    result = {"tool": "llm-compressor AWQModifier", "llmcompressor": llmcompressor.__version__,
              "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__,
              "n_samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "bits": args.bits,
              "group_size": args.group_size}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=False, strategy="group",
                               group_size=args.group_size)
    recipe = [AWQModifier(),
              QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                   ignore=["lm_head"], bypass_divisibility_checks=True)]
    t0 = time.perf_counter()
    try:
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=int(tokens.shape[0]),
                max_seq_length=int(tokens.shape[1]), shuffle_calibration_samples=False)
    except Exception as e:
        result.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4)[-2000:])
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
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
