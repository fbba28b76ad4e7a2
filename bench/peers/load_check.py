"""Load a quantized checkpoint directory with a peer's own loader and save its logits (CPU).

The proof that a checkpoint (a peer's, or one lowbit exported) is what the format's own tooling
expects: transformers `AutoModelForCausalLM.from_pretrained(dir)` in the peer's venv, with the
quantizer transformers picks from config.json's `quantization_config.quant_method`.

    # compressed-tensors (llm-compressor's format): bench/.venv-llmc
    bench/.venv-llmc/bin/python bench/peers/load_check.py --dir CKPT --format compressed-tensors \
        --ids ids.npy --out OUT_DIR
    # GPTQ (quant_method gptq) / AWQ (quant_method awq): bench/.venv-gptq (gptqmodel + optimum)
    bench/.venv-gptq/bin/python bench/peers/load_check.py --dir CKPT --format gptq --ids ids.npy --out OUT_DIR
    # optional: --backend torch|auto|... (gptqmodel kernel), --float-dir DIR (top-1/KL vs the float model)

gptq/awq load through transformers' GptqHfQuantizer (optimum.gptq) / AwqQuantizer, which swap the
Linears for gptqmodel QuantLinear modules. --backend picks gptqmodel's kernel: default `torch`
(gptq) / `torch_awq` (awq), the plain dequantize-then-matmul torch kernels, whose
`dequantize_weight()` is also what dequant.safetensors is made from; `auto` lets gptqmodel choose
(on CPU it picks TorchAtenLinear: aten's int4pack bf16 kernel, which repacks the weights so
`dequantize_weight()` no longer works, hence not the default).

Writes into OUT_DIR (atomically, file by file):
  logits.npy        float32 (batch, seq, vocab): the loaded model's logits for `ids` (int64, (seq,)
                    or (batch, seq)), computed with --dtype (default float32) on CPU
  dequant.safetensors  (compressed-tensors) every quantized weight decompressed by the
                    compressed_tensors package itself (CompressedTensorsDequantizer -> each scheme's
                    compressor class `decompress`), float32, named `<module>.weight`; read from the
                    checkpoint's safetensors files, independent of the transformers load
                    (gptq/awq) each quantized module's own `dequantize_weight()` (gptqmodel's
                    QuantLinear), transposed back to torch's (out, in) layout, float32
  load_check.json   versions, format, quantization_config, the module classes transformers built,
                    counts, timings, logits summary (or the error, with exit status 1)
Refuses (exit 1, JSON with the error) a checkpoint whose quant_method is not the one asked for,
one that loads with no quantized module (a silent float fallback), and NaN/inf logits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

QUANT_METHOD = {"compressed-tensors": "compressed-tensors", "gptq": "gptq", "awq": "awq"}
VERSION_OF = ("torch", "transformers", "numpy", "safetensors", "compressed-tensors", "llmcompressor",
              "gptqmodel", "optimum", "auto-round")


def _versions() -> dict:
    out = {}
    for name in VERSION_OF:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def _ct_dequantize(ckpt: Path) -> dict:
    """compressed_tensors' own model-free decompression of every quantized weight in `ckpt`."""
    import torch
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no *.safetensors files")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    quantized = {k.rpartition(".")[0] for k in tensors if k.endswith((".weight_packed", ".weight_scale"))}
    # The model-free dequantizer matches "Linear" targets by tensor name only: for the int-quantized
    # (8-bit) format the root param is plain `weight`, so it also claims the embedding and the norms
    # and fails ("Missing expected compression param 'model.embed_tokens.weight_scale'", compressed-
    # tensors 0.19.0). Telling it to ignore every module that has no weight_scale avoids that.
    plain = sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".weight")} - quantized)
    deq = CompressedTensorsDequantizer(str(ckpt), ignore=plain, dtype=torch.float32)
    out = deq.validate(tensors)
    return {f"{m}.weight": out[f"{m}.weight"].float().contiguous() for m in sorted(quantized)}


def _gptq_dequantize(model) -> dict:
    """gptqmodel's own dequantization of each QuantLinear: GPTQ modules' `dequantize_weight()`
    (qweight/qzeros/scales/g_idx), AWQ modules' `dequantize_gemm` (the function their forward calls)."""
    import torch
    out = {}
    for name, mod in model.named_modules():
        if not hasattr(mod, "qweight"):
            continue
        fn = getattr(mod, "dequantize_weight", None)
        with torch.no_grad():
            if callable(fn):
                w = fn()
            elif type(mod).__name__.startswith("Awq"):
                from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
                w = dequantize_gemm(qweight=mod.qweight, qzeros=mod.qzeros, scales=mod.scales,
                                    bits=mod.bits, group_size=mod.group_size)
            else:
                continue
            w = w.float()
            if w.shape == (mod.in_features, mod.out_features):  # gptqmodel returns (in, out)
                w = w.t()
            out[f"{name}.weight"] = w.contiguous()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("--format", required=True, choices=sorted(QUANT_METHOD))
    ap.add_argument("--ids", required=True, help=".npy int token ids, (seq,) or (batch, seq)")
    ap.add_argument("--out", required=True, help="directory for logits.npy, load_check.json, dequant.safetensors")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-dequant", action="store_true", help="skip writing dequant.safetensors")
    ap.add_argument("--backend", default=None,
                    help="gptqmodel kernel for gptq/awq (default torch / torch_awq; 'auto': gptqmodel picks)")
    ap.add_argument("--float-dir", help="float HF directory: also record top-1 agreement and KL(float||quant)")
    ap.add_argument("--annotate", help="a JSON file (e.g. the checkpoint's peer.json) to merge a `peer_check` "
                                       "summary into (atomic rewrite)")
    args = ap.parse_args()

    ckpt, out = Path(args.dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(ckpt.resolve()), "format": args.format, "dtype": args.dtype,
              "threads": args.threads, "versions": _versions(), "command": [sys.executable, *sys.argv]}

    def finish(ok: bool, code: int) -> int:
        result["ok"] = ok
        _atomic(out / "load_check.json", lambda p: p.write_text(json.dumps(result, indent=1) + "\n"))
        if args.annotate:
            target = Path(args.annotate)
            doc = json.loads(target.read_text()) if target.is_file() else {}
            keep = ("ok", "error", "format", "dtype", "backend_requested", "backend_used", "versions", "modules",
                    "logits", "vs_float", "dequant", "dequant_vs_loaded", "load_s", "forward_s")
            doc["peer_check"] = {"load_check_json": str((out / "load_check.json").resolve()),
                                 "out_dir": str(out.resolve()), **{k: result[k] for k in keep if k in result}}
            _atomic(target, lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
        print(json.dumps({k: result.get(k) for k in ("ok", "format", "error", "logits", "modules")}))
        return code

    try:
        import numpy as np
        import torch
        torch.set_num_threads(args.threads)
        from transformers import AutoModelForCausalLM

        cfg = json.loads((ckpt / "config.json").read_text())
        qcfg = cfg.get("quantization_config")
        result["quantization_config"] = qcfg
        method = (qcfg or {}).get("quant_method")
        if method != QUANT_METHOD[args.format]:
            result["error"] = (f"{ckpt / 'config.json'}: quantization_config.quant_method is {method!r}, "
                               f"expected {QUANT_METHOD[args.format]!r} for --format {args.format}")
            return finish(False, 1)
        ids = np.load(args.ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            result["error"] = f"{args.ids}: expected integer token ids (seq,) or (batch, seq), got {ids.dtype} {ids.shape}"
            return finish(False, 1)

        kwargs = {}
        if args.format in ("gptq", "awq"):
            backend = args.backend or {"gptq": "torch", "awq": "torch_awq"}[args.format]
            result["backend_requested"] = backend
            if backend != "auto":  # a loading attribute: merged into the checkpoint's own config
                from transformers import AwqConfig, GPTQConfig
                cls = GPTQConfig if args.format == "gptq" else AwqConfig
                kwargs["quantization_config"] = cls(bits=int(qcfg.get("bits", 4)), backend=backend)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, args.dtype),
                                                     device_map="cpu", **kwargs)
        model.eval()
        result["load_s"] = round(time.perf_counter() - t0, 2)
        classes: dict[str, int] = {}
        n_quant = 0
        for _, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) or "QuantLinear" in type(mod).__name__ or hasattr(mod, "qweight"):
                key = f"{type(mod).__module__}.{type(mod).__name__}"
                classes[key] = classes.get(key, 0) + 1
                if hasattr(mod, "qweight") or hasattr(mod, "quantization_scheme"):
                    n_quant += 1
        result["modules"] = {"classes": classes, "quantized": n_quant}
        if hasattr(model.config, "quantization_config"):
            qc = model.config.quantization_config
            result["backend_used"] = str(getattr(qc, "backend", None))
        if n_quant == 0:
            result["error"] = "transformers loaded no quantized module (float fallback?)"
            return finish(False, 1)
        with torch.no_grad():
            t0 = time.perf_counter()
            logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float()
            result["forward_s"] = round(time.perf_counter() - t0, 2)
        arr = logits.numpy()
        if not np.isfinite(arr).all():
            result["error"] = f"logits hold {int((~np.isfinite(arr)).sum())} NaN/inf values"
            return finish(False, 1)
        _atomic(out / "logits.npy", lambda p: np.save(p, arr))
        result["logits"] = {"file": "logits.npy", "shape": list(arr.shape), "ids": os.path.abspath(args.ids),
                            "mean": float(arr.mean()), "std": float(arr.std()),
                            "argmax_head": arr[0].argmax(-1)[:16].tolist()}

        if args.float_dir:
            ref = AutoModelForCausalLM.from_pretrained(args.float_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                fl = ref(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float()
            lp, lq = torch.log_softmax(fl, -1), torch.log_softmax(logits, -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            result["vs_float"] = {"float_dir": os.path.abspath(args.float_dir),
                                  "top1_agreement": float((fl.argmax(-1) == logits.argmax(-1)).float().mean()),
                                  "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                                  "max_abs_logit_diff": float((fl - logits).abs().max())}
            del ref

        if not args.no_dequant:
            from safetensors.torch import save_file
            t0 = time.perf_counter()
            deq = _ct_dequantize(ckpt) if args.format == "compressed-tensors" else _gptq_dequantize(model)
            bad = [k for k, v in deq.items() if not torch.isfinite(v).all()]
            if bad:
                result["error"] = f"dequantized weights hold NaN/inf: {bad[:5]}"
                return finish(False, 1)
            if args.format == "compressed-tensors":
                # the two compressed_tensors paths must agree: model-free decompression vs the
                # weights transformers' loader decompressed into the model for the forward
                sd = model.state_dict()
                diffs = [float((sd[k].float() - v).abs().max()) for k, v in deq.items() if k in sd]
                result["dequant_vs_loaded"] = {"compared": len(diffs), "max_abs_diff": max(diffs) if diffs else None}
            if not deq:
                result["error"] = "no quantized weight was found to dequantize"
                return finish(False, 1)
            _atomic(out / "dequant.safetensors", lambda p: save_file(deq, str(p)))
            result["dequant"] = {"file": "dequant.safetensors", "n_tensors": len(deq),
                                 "how": {"compressed-tensors": "compressed_tensors CompressedTensorsDequantizer (model-free)",
                                         "gptq": "gptqmodel QuantLinear.dequantize_weight()",
                                         "awq": "gptqmodel awq packing_utils.dequantize_gemm"}[args.format],
                                 "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # the peer refused it: that is the finding, keep its words
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=8)[-4000:]
        return finish(False, 1)
    return finish(True, 0)


if __name__ == "__main__":
    sys.exit(main())
