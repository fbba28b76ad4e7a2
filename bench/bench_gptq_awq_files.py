"""GPTQ / AWQ checkpoints written by lowbit: perplexity read back vs in memory, file sizes, and the
peer loader (transformers + optimum + GPTQModel in bench/.venv-gptq) on the same ids.

    .venv/bin/python bench/bench_gptq_awq_files.py --recipe w4g128-gptq-actorder --format gptq \
        --out bench/_work/files/ao [--samples 32 --seq-len 256] [--max-tokens 8192] [--peer] \
        [--peer-backend torch]

Prints one JSON record: ppl of the quantized model in memory and of load_model(out), the
directory's file sizes, and (with --peer) the peer's logits agreement on 64 tokens of
wiki-evaluation against lowbit's reference forward and against lowbit's weights rounded to
float16 (what GPTQModel's torch kernels dequantize to). --peer-backend passes GPTQConfig(backend=)
to transformers (GPTQModel's CPU default, TorchAtenLinear, refuses K % group_size != 0).
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

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = Path(os.environ.get("LOWBIT_GPTQ_PY", ROOT / "bench/.venv-gptq/bin/python"))

# run inside the peer venv: load DIR with transformers, save logits for IDS (argv: dir ids out backend)
PEER_SNIPPET = r"""
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM, GPTQConfig
from importlib import metadata
torch.set_num_threads(2)
d, ids, out, backend = sys.argv[1:5]
kw = {} if backend == "auto" else {"quantization_config": GPTQConfig(bits=4, backend=backend)}
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, device_map="cpu", **kw)
kinds = sorted({type(x).__name__ for x in m.modules() if hasattr(x, "qweight")})
with torch.no_grad():
    lg = m(input_ids=torch.as_tensor(np.load(ids)).reshape(1, -1)).logits.float().numpy()
np.save(out, lg)
print({"kernels": kinds, "versions": {p: metadata.version(p) for p in ("transformers", "optimum", "gptqmodel")}})
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2", "awq"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (calibrated recipes)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window")
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--peer-backend", default="auto")
    args = ap.parse_args()

    import numpy as np
    import torch

    from lowbit import api
    from lowbit.data.text import load_text
    from lowbit.models import LoadedModel, load_model
    from lowbit.nn.qlinear import QuantLinear, set_submodule

    base = load_model("smollm2-135m")
    model = copy.deepcopy(base.model)
    t0 = time.perf_counter()
    calib = {k: v for k, v in (("n_samples", args.samples), ("seq_len", args.seq_len)) if v}
    rep = api.quantize(model, args.recipe, tokenizer=base.tokenizer, calibration=calib or None, progress=False)
    lm = LoadedModel(model, base.tokenizer, base.path, base.source, base.source_sha256)
    quant_s = time.perf_counter() - t0
    out = api.export(lm, rep, args.out, args.format, overwrite=True)
    back = load_model(out)
    opts = {"metrics": ["ppl"], "max_tokens": args.max_tokens, "progress": False, "cache": False}
    mem = api.evaluate(lm, **opts)
    disk = api.evaluate(back, **opts)
    rec = {"recipe": args.recipe, "format": args.format, "quantize_s": round(quant_s, 1),
           "ppl_in_memory": mem.get("ppl"), "ppl_read_back": disk.get("ppl"),
           "files": {f.name: f.stat().st_size for f in sorted(Path(out).iterdir())},
           "total_bytes": sum(f.stat().st_size for f in Path(out).iterdir())}
    if args.peer:
        ids = base.tokenizer(load_text("wiki-evaluation"), add_special_tokens=False)["input_ids"][:64]
        ids_f = Path(out).parent / f".{Path(out).name}.ids.npy"
        np.save(ids_f, np.asarray(ids, dtype=np.int64))
        logits_f = Path(out).parent / f".{Path(out).name}.peer_logits.npy"
        r = subprocess.run([str(PEER_PY), "-c", PEER_SNIPPET, str(out), str(ids_f), str(logits_f),
                            args.peer_backend], capture_output=True, text=True)
        rec["peer"] = {"backend": args.peer_backend, "rc": r.returncode,
                       "said": (r.stdout.strip().splitlines() or [""])[-1] if r.returncode == 0
                       else r.stderr.strip()[-600:]}
        if r.returncode == 0:
            peer = np.load(logits_f)
            x = torch.tensor([ids])
            with torch.no_grad():
                ours = back.model(x).logits.numpy()
            m16 = copy.deepcopy(back.model)
            for name, mod in list(m16.named_modules()):
                if isinstance(mod, QuantLinear):
                    lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                    lin.weight.data = mod.dequantize_weight(torch.float32).half().float()
                    if mod.bias is not None:
                        lin.bias.data = mod.bias.float()
                    set_submodule(m16, name, lin)
            with torch.no_grad():
                ours16 = m16(x).logits.numpy()
            rec["peer"].update(max_abs_vs_lowbit=float(np.abs(peer - ours).max()),
                               max_abs_vs_lowbit_fp16_weights=float(np.abs(peer - ours16).max()),
                               logit_absmax=float(np.abs(ours).max()),
                               top1_agreement=float((peer.argmax(-1) == ours.argmax(-1)).mean()))
    print(json.dumps(rec, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
