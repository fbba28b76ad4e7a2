"""compressed-tensors export: one quantization, written as compressed-tensors and as lowbit native;
read-back perplexity vs in-memory, file sizes, and (when llm-compressor's venv exists) the
compressed-tensors package's own decompression and transformers' logits on our files.

    PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_compressed_tensors.py \
        --recipe w4g64-gptq --out bench/out/ct [--max-tokens 8192] [--json bench/out/ct/bench.json]

Perplexity: lowbit.eval.perplexity (wiki-evaluation, seq_len 512, the first --max-tokens tokens),
the quantized linears on the same packed kernels (`prepare_for_inference(backend)`) on both sides,
as `lowbit eval DIR --metrics ppl` runs them.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w4g64-gptq")
    ap.add_argument("--out", default=str(ROOT / "bench/out/ct"))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json")
    args = ap.parse_args()

    from lowbit import api
    from lowbit.eval import perplexity
    from lowbit.models import LoadedModel, load_model
    from lowbit.nn.prepare import prepare_for_inference
    from lowbit.nn.qlinear import QuantLinear

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_model("smollm2-135m")
    model = copy.deepcopy(base.model)
    t0 = time.perf_counter()
    rep = api.quantize(model, args.recipe, tokenizer=base.tokenizer)
    qsec = time.perf_counter() - t0
    lm = LoadedModel(model, base.tokenizer, base.path, base.source, base.source_sha256)
    ct_dir = api.export(lm, rep, out / f"{args.recipe}-ct", format="compressed-tensors", overwrite=True)
    nat_dir = api.export(lm, rep, out / f"{args.recipe}-native", format="native", overwrite=True)
    rec = {"recipe": args.recipe, "quantize_s": round(qsec, 1), "max_tokens": args.max_tokens,
           "backend": args.backend, "bytes": {"compressed-tensors": _size(ct_dir), "native": _size(nat_dir)}}
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 1001, 30, 4, 17, 2000, 9, 12, 48, 71]])
    with torch.no_grad():
        ref_logits = model(ids).logits
    deq = {n: m.dequantize_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}

    back = load_model(ct_dir)
    with torch.no_grad():
        rec["readback_logits_equal"] = bool(torch.equal(back.model(ids).logits, ref_logits))
    for m in (model, back.model):
        prepare_for_inference(m, args.backend)
    rec["ppl_in_memory"] = perplexity(model, base.tokenizer, max_tokens=args.max_tokens, progress=False).ppl
    rec["ppl_read_back"] = perplexity(back.model, back.tokenizer, max_tokens=args.max_tokens, progress=False).ppl

    py = Path(os.environ.get("LOWBIT_PEERS_ROOT", ROOT)) / "bench/.venv-llmc/bin/python"
    if py.is_file():
        from safetensors.torch import load_file
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        np.save(out / "ids.npy", ids.numpy())

        def peer(*a):
            r = subprocess.run([str(py), str(ROOT / "bench/ct_peer_check.py"), *map(str, a)],
                               capture_output=True, text=True, env=env)
            return json.loads(r.stdout.strip().splitlines()[-1])
        d = peer("dequant", ct_dir, out / "ct_deq.safetensors")
        rec["peer_versions"] = d.get("versions")
        if d.get("ok"):
            theirs = load_file(str(out / "ct_deq.safetensors"))
            rec["ct_dequant_max_abs_diff"] = max(float((theirs[f"{n}.weight"] - w).abs().max()) for n, w in deq.items())
            rec["ct_dequant_equals_ours_rounded_to_fp16"] = all(
                torch.equal(theirs[f"{n}.weight"], w.half().float()) for n, w in deq.items())
        t = time.perf_counter()
        lg = peer("logits", ct_dir, out / "ids.npy", out / "tf_logits.npy")
        rec["transformers_load_forward_s"] = round(time.perf_counter() - t, 1)
        if lg.get("ok"):
            tf = torch.from_numpy(np.load(out / "tf_logits.npy"))
            rec["transformers_logits_max_abs_diff"] = float((tf - ref_logits).abs().max())
            rec["transformers_argmax_agree"] = float((tf.argmax(-1) == ref_logits.argmax(-1)).float().mean())
        else:
            rec["transformers_error"] = lg.get("error")
    print(json.dumps(rec, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
