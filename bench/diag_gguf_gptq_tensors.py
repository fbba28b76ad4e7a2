"""Which tensors make <mix>-gptq lose perplexity against <mix> (llama-quantize's bytes, same imatrix)?

    .venv/bin/python bench/diag_gguf_gptq_tensors.py [MIX=q2_k] [WINDOWS=16]

Quantizes SmolLM2 with MIX (llama.cpp's encoders) and MIX-gptq on the same 32 x 512 calibration
tokens and imatrix, keeps both sets of dequantized weights (bench/_work/gguf_gptq/W_<mix>.pt), and
scores hybrids with lowbit's evaluator (perplexity, KL and top-1 against fp32 on WINDOWS x 512
tokens of wiki-evaluation): GPTQ's weights on every linear, on down_proj only (SmolLM2's only
k-quant tensors: 1536 columns), on everything but down_proj (the legacy fallback types of its
576-column rows).
"""
import copy, json, os, sys, time
from pathlib import Path

import torch

from lowbit import api
from lowbit.models import load_model
from lowbit.calibration import CalibrationConfig, calibration_tokens
from lowbit.calibration.imatrix import compute_imatrix
from lowbit.eval import evaluate, reference_for
torch.set_num_threads(2)
WORK = Path(__file__).resolve().parent / "_work" / "gguf_gptq"
WORK.mkdir(parents=True, exist_ok=True)
preset = sys.argv[1] if len(sys.argv) > 1 else "q2_k"
NW = int(sys.argv[2]) if len(sys.argv) > 2 else 16
lm = load_model("smollm2-135m")
opts = dict(text="wiki-evaluation", seq_len=512, max_tokens=NW * 512, kl_max_tokens=NW * 512, progress=False)
ref = reference_for(lm.model, lm.tokenizer, **opts)

W = torch.load(str(WORK / f"W_{preset}.pt")) if os.path.exists(str(WORK / f"W_{preset}.pt")) else {}
if not W:
    im = compute_imatrix(lm, "wiki-calibration", 32, 512, seed=0, progress=False)
    toks = calibration_tokens(lm.tokenizer, CalibrationConfig(n_samples=32, seq_len=512, seed=0))
for p in ([] if W else (preset, preset + "-gptq")):
    t0 = time.time()
    m = copy.deepcopy(lm.model)
    api.quantize(m, p, tokens=toks, imatrix=im, progress=False)
    W[p] = {n: (mod.dequantize_weight(), getattr(mod, "ggml_type", "?")) for n, mod in m.named_modules() if hasattr(mod, "dequantize_weight")}
    del m
    print(p, "quantized", f"{time.time()-t0:.0f}s", flush=True)
if not os.path.exists(str(WORK / f"W_{preset}.pt")): torch.save(W, str(WORK / f"W_{preset}.pt"))
def run(label, pick):
    m = copy.deepcopy(lm.model)
    mods = dict(m.named_modules())
    for n, (w, t) in W[preset].items():
        src = W[preset + "-gptq"] if pick(n, t) else W[preset]
        mod = mods[n]
        if isinstance(mod, torch.nn.Embedding): mod.weight.data.copy_(src[n][0])
        else: mod.weight.data.copy_(src[n][0].reshape(mod.weight.shape))
    r = evaluate(m, lm.tokenizer, metrics="ppl,kl", reference=ref, **opts)
    print(json.dumps({"label": label, "ppl": round(r["ppl"]["ppl"] if isinstance(r["ppl"], dict) else r["ppl"], 4), "kl": round(r["kl"]["mean"], 5), "top1": round(r["kl"]["top1_agreement"], 4)}), flush=True)
types = sorted({t for _, t in W[preset].values()})
print("types", types, flush=True)
run("encoder (llama.cpp bytes)", lambda n, t: False)
run("gptq all", lambda n, t: True)
run("gptq only down_proj", lambda n, t: "down_proj" in n)
run("gptq all but down_proj", lambda n, t: "down_proj" not in n)
