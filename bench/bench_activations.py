"""Activation quantization, SmoothQuant, AWQ and LLM.int8() on the bundled model (issue 19).

    .venv/bin/python bench/bench_activations.py --part w8a8        # W8A8 rows + torch quantize_dynamic
    .venv/bin/python bench/bench_activations.py --part awq         # AWQ / RTN / GPTQ at W4 and W3 g128
    .venv/bin/python bench/bench_activations.py --part llmc-awq    # llm-compressor's AWQModifier, same tokens
    .venv/bin/python bench/bench_activations.py --part int8        # LLM.int8() vs plain int8 W8A8
    .venv/bin/python bench/bench_activations.py --part kernel      # int8 GEMV/GEMM vs fp32 (one linear)
    .venv/bin/python bench/bench_activations.py --part speed --configs w8a8,torch-quantize-dynamic
    .venv/bin/python bench/bench_activations.py --part bnb-int8    # LLM.int8(): ours vs bitsandbytes' own
                                                                   # decode tok/s, rows interleaved

Every row: the same calibration windows (wiki-calibration, seeded: --samples x --seq-len, saved to
<work>/calib.pt for the peer), the same evaluation (lowbit.eval: perplexity on the first
--eval-windows 512-token windows of wiki-evaluation, KL and top-1 agreement to the fp32 model on
the first --kl-windows of them). Speed (--speed): greedy decode steps with the KV cache at batch
1 and batch 32 (a 16-token prompt, 16 steps, median of 3 runs), fp32 timed in the same process.
Results are kept per row in <work>/results.json (a finished row is not redone). --model picks
another built-in model (qwen2.5-coder-1.5b after `make qwen`), with the same text and settings.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# llm-compressor's venv (bash bench/setup_peers.sh llmc); LOWBIT_LLMC_PYTHON points at another one
LLMC_PY = Path(os.environ.get("LOWBIT_LLMC_PYTHON", ROOT / "bench" / ".venv-llmc" / "bin" / "python"))

PARTS = {
    "w8a8": ["w8a8", "torch-quantize-dynamic", "w8a8-smooth", "w8a8-static-minmax", "w8a8-static-kl",
             "llm-int8", "w8a8-static-percentile", "w8a8-static-mse", "w8a8-smooth-static-minmax", "w8a8-fp8",
             "w8a16", "w4a8", "w8a8-fp8-static"],
    "awq": ["w4g128-rtn", "w4g128-awq", "w4g128-gptq", "w4g128-awq-gptq",
            "w3g128-rtn", "w3g128-awq", "w3g128-gptq", "w3g128-awq-gptq"],
    "int8": ["w8a8", "llm-int8"],
}


def decode_speed(model, batch: int, prompt_len: int = 16, steps: int = 16, runs: int = 3) -> float:
    """Decode tokens/s (batch x steps / seconds) with the model's KV cache."""
    import torch
    ids = torch.randint(100, 20000, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for k in range(runs + 1):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            if k:
                times.append(time.perf_counter() - t0)
    return batch * steps / statistics.median(times)


def record(rec: dict) -> dict:
    """The figures of a lowbit.eval record: perplexity, mean KL to fp32, top-1 agreement."""
    kl = rec.get("kl", {})
    return {"ppl": rec["ppl"]["ppl"], "kl": kl.get("mean", 0.0), "kl_stderr": kl.get("mean_stderr", 0.0),
            "top1": kl.get("top1_agreement", 1.0), "eval_tokens": rec["ppl"].get("tokens_scored"),
            "kl_tokens": kl.get("tokens")}


def torch_dynamic(model):
    """torch.ao's own dynamic int8 (qint8 weights per tensor, fbgemm/x86), on the blocks' linears only."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    names = {n: default_dynamic_qconfig for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    return quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", required=True, choices=[*PARTS, "llmc-awq", "kernel", "speed", "bnb-int8"])
    ap.add_argument("--rounds", type=int, default=7, help="--part speed: interleaved rounds (median)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "activations"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--kl-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m", help="built-in model (qwen2.5-coder-1.5b: `make qwen`)")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--configs", default="", help="comma list of rows, in this order: the part's own names "
                    "or any recipe name lowbit resolves (e.g. w4g128-gptq-actorder-mse)")
    ap.add_argument("--llmc-group", type=int, default=64,
                    help="group size of the llmc-awq rows (llm-compressor refuses 128 on hidden 576)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    if args.part == "kernel":
        return kernel_bench(args)
    if args.part == "speed":
        return speed_bench(args)
    if args.part == "bnb-int8":
        return bnb_int8_bench(args)
    from lowbit import api
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.eval import evaluate, evaluate_reference
    from lowbit.models import load_model
    from lowbit.nn.w8a8 import prepare_w8a8
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    tokens = calibration_tokens(lm.tokenizer, CalibrationConfig(n_samples=args.samples, seq_len=args.seq_len))
    torch.save(tokens, work / "calib.pt")
    key = f"calib {args.samples}x{args.seq_len}, eval {args.eval_windows}x512, kl {args.kl_windows}x512"
    if args.model != "smollm2-135m":
        key = f"{args.model}: {key}"
    res_file = work / "results.json"
    allres = json.loads(res_file.read_text()) if res_file.is_file() else {}
    done = allres.setdefault(key, {})
    settings = {"max_tokens": args.eval_windows * 512, "kl_max_tokens": args.kl_windows * 512, "seq_len": 512,
                "progress": False}
    rec, ref = evaluate_reference(lm.model, lm.tokenizer, metrics=["ppl", "kl"], **settings)
    fp = record(rec)
    if args.speed:
        fp["tok_s_b1"], fp["tok_s_b32"] = decode_speed(lm.model, 1), decode_speed(lm.model, 32)
    done["fp32"] = {**done.get("fp32", {}), **fp}

    def save():
        tmp = res_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(allres, indent=1))
        os.replace(tmp, res_file)

    save()
    names = PARTS.get(args.part, [])
    if args.part == "llmc-awq":
        names = [f"llmc-awq-w4g{args.llmc_group}", f"llmc-awq-w3g{args.llmc_group}"]
    if args.configs:
        names = [n for n in args.configs.split(",") if n]
    for name in names:
        if name in done and (not args.speed or "tok_s_b1" in done[name]):
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        m = copy.deepcopy(lm.model)
        row = {}
        t0 = time.perf_counter()
        if name == "torch-quantize-dynamic":
            torch_dynamic(m)
        elif name.startswith("llmc-awq"):
            bits = 4 if "-w4" in name else 3
            group = int(name.rsplit("g", 1)[1])
            dump = work / f"{name}.pt"
            if not dump.is_file():
                from lowbit.models.load import gguf_to_hf_dir, resolve_source
                model_dir, _ = gguf_to_hf_dir(resolve_source(args.model)[1])
                out = subprocess.run([str(LLMC_PY), str(HERE / "peers" / "llmc_awq.py"), "--model-dir",
                                      str(model_dir), "--tokens", str(work / "calib.pt"), "--bits", str(bits),
                                      "--group-size", str(group), "--threads", str(args.threads), "--dump", str(dump),
                                      "--save", str(work / f"{name}-ct")],
                                     capture_output=True, text=True)
                line = (out.stdout.strip().splitlines() or ["{}"])[-1]
                row["peer"] = json.loads(line) if line.startswith("{") else {"error": out.stderr[-2000:]}
                if not dump.is_file():
                    done[name] = row
                    save()
                    continue
            sd = torch.load(dump)
            m.load_state_dict(sd, strict=False)
            row["n_loaded"] = len(sd)
        else:
            rep = api.quantize(m, name, tokenizer=lm.tokenizer, tokens=tokens, progress=False,
                               calibration={"batch_size": 8})
            row["notes"] = rep.notes[-3:]
            oc = {r["name"]: r["outlier_columns"] for r in rep.layers if "outlier_columns" in r}
            if oc:
                row["outlier_columns"] = oc
        row["quantize_s"] = time.perf_counter() - t0
        r = evaluate(m, lm.tokenizer, metrics=["ppl", "kl"], reference=ref, **settings)
        row.update(record(r))
        ct_dir = work / f"{name}-ct"
        if name.startswith("llmc-awq") and (ct_dir / "config.json").is_file():
            # llm-compressor's own compressed checkpoint through lowbit's compressed-tensors reader
            row["ct_reader"] = record(evaluate(api.load(ct_dir).model, lm.tokenizer, metrics=["ppl", "kl"],
                                               reference=ref, **settings))
        if args.speed:
            row["tok_s_b1"], row["tok_s_b32"] = decode_speed(m, 1), decode_speed(m, 32)
            if not name.startswith(("torch", "llmc")) and prepare_w8a8(m):   # the int8 GEMM path
                row["kernel_tok_s_b1"], row["kernel_tok_s_b32"] = decode_speed(m, 1), decode_speed(m, 32)
            row["fp32_tok_s_b1"], row["fp32_tok_s_b32"] = decode_speed(lm.model, 1), decode_speed(lm.model, 32)
        done[name] = row
        save()
        print(f"   {name}: {json.dumps(row)[:400]}", file=sys.stderr, flush=True)
        del m
    return 0


def median_us(fn, warmup: int = 20, repeats: int = 5, calls: int = 50) -> float:
    """Microseconds per call of fn(): the median of `repeats` timings of `calls` calls each."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        ts.append((time.perf_counter() - t0) / calls)
    return statistics.median(ts) * 1e6


def bnb_int8_bench(args) -> int:
    """LLM.int8() side by side: ours (`llm-int8` on the int8 op) and bitsandbytes' own
    (transformers' load_in_8bit, threshold 6.0, its CPU backend, in bench/.venv-bnb through
    bench/peers/bnb_peer.py), against fp32, on the same --eval-windows 512-token windows of
    wiki-evaluation, every row scored by the same function from its logits: perplexity over all
    windows, KL(fp32 || row) and top-1 on the first --kl-windows, in fp32."""
    import math
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file
    from lowbit import api
    from lowbit.data.text import load_text, token_windows, tokenize_text
    from lowbit.models import load_model
    from lowbit.models.load import gguf_to_hf_dir, resolve_source
    from lowbit.nn.w8a8 import prepare_w8a8
    bnb_py = ROOT / "bench" / ".venv-bnb" / "bin" / "python"
    if not bnb_py.is_file():
        print(f"{bnb_py} missing: bash bench/setup_peers.sh bnb", file=sys.stderr)
        return 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    ids = token_windows(tokenize_text(lm.tokenizer, load_text("wiki-evaluation")), 512, args.eval_windows)
    save_file({"ids": ids.contiguous()}, str(work / "ids.safetensors"))

    def logits_of(model):
        with torch.no_grad():
            return torch.cat([model(input_ids=ids[i:i + 1]).logits.float() for i in range(ids.shape[0])])

    def score(lg, ref):
        lp = F.log_softmax(lg[:, :-1], -1)
        nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
        k = args.kl_windows
        lr = F.log_softmax(ref[:k, :-1], -1)
        kl = (lr.exp() * (lr - lp[:k])).sum(-1)
        return {"ppl": math.exp(float(nll.mean())), "kl": float(kl.mean()),
                "kl_stderr": float(kl.std() / kl.numel() ** 0.5),
                "top1": float((lp[:k].argmax(-1) == lr.argmax(-1)).float().mean()),
                "eval_tokens": nll.numel(), "kl_tokens": kl.numel()}

    ref = logits_of(lm.model)
    rows = {"fp32": score(ref, ref)}
    m = copy.deepcopy(lm.model)
    tokens = torch.randint(100, 20000, (2, 64), generator=torch.Generator().manual_seed(0))
    api.quantize(m, "llm-int8", tokens=tokens, progress=False)       # dynamic: the tokens only count outliers
    rows["lowbit llm-int8, float reference path"] = score(logits_of(m), ref)
    if prepare_w8a8(m):                                                # where our C++ op loads
        rows["lowbit llm-int8, int8 op"] = score(logits_of(m), ref)
    del m
    src, _ = gguf_to_hf_dir(resolve_source(args.model)[1])
    t0 = time.perf_counter()
    r = subprocess.run([str(bnb_py), str(HERE / "peers" / "bnb_peer.py"), "quantize", str(src), "--quant", "int8",
                        "--ids", str(work / "ids.safetensors"), "--out", str(work / "bnb-int8")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-3000:], file=sys.stderr)
        return 1
    peer = json.loads(r.stdout.strip().splitlines()[-1])
    lg = load_file(str(work / "bnb-int8" / "logits.safetensors"))["logits"]
    rows["bitsandbytes load_in_8bit (LLM.int8(), threshold 6.0)"] = {
        **score(lg, ref), "seconds": round(time.perf_counter() - t0, 1),
        "peer": {k: peer[k] for k in ("bitsandbytes", "transformers", "classes", "footprint")}}
    f = rows["fp32"]["ppl"]
    for n, row in rows.items():
        row["dppl"] = row["ppl"] - f
        print(json.dumps({"row": n, **row}), flush=True)
    (work / "bnb_int8.json").write_text(json.dumps(rows, indent=1))
    return 0


def speed_bench(args) -> int:
    """Decode tokens/s at batch 1 and 32, every model timed in turn within each round (fp32, then
    each --configs row: a recipe on lowbit's int8 kernel, or torch-quantize-dynamic), the median
    of --rounds rounds: on a VM whose speed drifts, the rows see the same drift."""
    import torch
    from lowbit import api
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.models import load_model
    from lowbit.nn import ext
    from lowbit.nn.w8a8 import prepare_w8a8
    lm = load_model(args.model)
    models = {"fp32": lm.model}
    tokens = None
    for name in [n for n in args.configs.split(",") if n] or ["w8a8", "torch-quantize-dynamic"]:
        m = copy.deepcopy(lm.model)
        if name == "torch-quantize-dynamic":
            torch_dynamic(m)
        else:
            if tokens is None:
                tokens = calibration_tokens(lm.tokenizer, CalibrationConfig(n_samples=args.samples, seq_len=args.seq_len))
            api.quantize(m, name, tokenizer=lm.tokenizer, tokens=tokens, progress=False, calibration={"batch_size": 8})
            n = prepare_w8a8(m)
            print(f"{name}: {n} layers on the int8 kernel", file=sys.stderr, flush=True)
        models[name] = m
    from lowbit.nn.decode import generate
    ids = torch.randint(100, 20000, (1, 16), generator=torch.Generator().manual_seed(0))

    def step_speed(m) -> float:      # lowbit's step path at batch 1: what `lowbit generate` runs
        generate(m, ids, 4, min_new_tokens=4)
        return generate(m, ids, 32, min_new_tokens=32).decode_tokens_per_s

    times = {n: {1: [], 32: [], "step": []} for n in models}
    for r in range(args.rounds):
        for b in (1, 32, "step"):
            for n, m in models.items():
                times[n][b].append(step_speed(m) if b == "step" else decode_speed(m, b, runs=1))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    row = {"model": args.model, "threads": args.threads, "rounds": args.rounds,
           "isa": ext.isa() if ext.load() else None, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for n in models:
        for b in (1, 32, "step"):
            row[f"{n} b{b} tok/s"] = round(statistics.median(times[n][b]), 2)
            row[f"{n} b{b} spread"] = [round(min(times[n][b]), 2), round(max(times[n][b]), 2)]
    print(json.dumps(row), flush=True)
    return 0


def kernel_bench(args) -> int:
    """One linear, down_proj-shaped (1536 -> 576) and gate-shaped (576 -> 1536): fp32 F.linear vs
    lowbit's W8A8 kernel (our C++ op; torch._int_mm beside it where exact) vs torch.ao's dynamic
    quantized Linear, M = 1 and 32, on the threads torch has (--threads). LOWBIT_ISA picks the
    variant of ours."""
    import torch
    import torch.nn as nn
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    from lowbit.methods.rtn import RTNConfig, rtn
    from lowbit.nn.actquant import ActQuant
    from lowbit.nn.qlinear import QuantLinear
    from lowbit.nn.w8a8 import W8A8Kernel, has_int_mm
    from lowbit.numerics import int_scheme
    from lowbit.numerics.activation import ActScheme
    torch.manual_seed(0)
    rows = []
    for k, n in ((1536, 576), (576, 1536)):
        lin = nn.Linear(k, n, bias=False)
        ql = QuantLinear(rtn(lin.weight.detach(), int_scheme(8, None, True), RTNConfig()))
        ql.act_quant = ActQuant(ActScheme())
        kern = W8A8Kernel(ql)                       # our C++ op where it builds (backend 'ext')
        kern_mm = W8A8Kernel(ql, "int_mm") if has_int_mm() else None
        dyn = DynLinear(k, n, bias_=False, dtype=torch.qint8)
        dyn.set_weight_bias(torch.quantize_per_tensor(lin.weight.detach(), float(lin.weight.abs().max()) / 127, 0,
                                                      torch.qint8), None)
        for m in (1, 32):
            x = torch.randn(m, k)
            fns = {"fp32": lambda: lin(x), f"lowbit-w8a8-{kern.backend}": lambda: kern(x, ql),
                   "torch-dynamic": lambda: dyn(x)}
            if kern_mm is not None:
                fns["lowbit-w8a8-int_mm"] = lambda: kern_mm(x, ql)
            with torch.no_grad():
                t = {name: median_us(fn) for name, fn in fns.items()}
            from lowbit.nn import ext
            rows.append({"shape": f"{k}->{n}", "M": m, "isa": ext.isa() if ext.load() else None,
                         **{f"{kk}_us": round(v, 1) for kk, v in t.items()}})
            print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
