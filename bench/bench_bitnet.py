"""BitNet b1.58 on the bundled model: continued training into ternary weights vs ternary PTQ, and
ternary decode speed on our kernels vs our 4-bit, in one script (BENCHMARKS.md "BitNet b1.58").

    nice -n 10 .venv/bin/python bench/bench_bitnet.py --work WORKDIR --steps 48 --seq-len 128 \
        --batch 2 --lr 1e-3 --lam-warmup 12 [--part train|base|eval|acts|speed|all] [--md ROWS.md]

Parts (train, eval and acts in one run by default; --part train caches the trained latent weights
in WORKDIR, so a later --part eval scores them without training again; --part base scores the
models that do not need training while it runs; --part speed re-measures decode alone, on the
trained latents or, with --ptq, on ternary PTQ weights; LOWBIT_ISA=avx2 for the AVX2 variant;
--cpu-time --threads 1 counts process CPU time per decode step, for a box others load):
  train  swap every block linear of SmolLM2-135M for BitLinear (lowbit.nn.bitlinear), then
         lowbit.train.loop.train on wiki-calibration windows, loss = KL(teacher || student) on the
         logits with the fp32 model as teacher (knowledge distillation), the BitLinear weight
         mixing factor lam warmed up 0 -> 1 over --lam-warmup steps (float -> ternary). Loss curve
         -> WORKDIR/bitnet_loss.svg (lowbit.eval.svg) and bitnet_train.json.
  eval   three models scored by lowbit's harness (lowbit.eval.evaluate, wiki-evaluation):
           fp32         the bundled model
           ptq          ternary PTQ: RTN absmean per tensor of the fp32 weights, int8 per-token
                        activations, frozen exactly as the trained model (same format)
           trained      the continued-trained model, frozen (freeze_bitlinear)
         then decode tokens/s with our packed kernels (prepare_for_inference, backend auto) for
         trained-ternary vs w4g64-rtn in the same process (ratio vs fp32 from the same run), and
         the ternary GGUF (TQ2_0 where rows are 256-multiples, Q8_0 exactly elsewhere) written by
         lowbit.api.export and read back; llama.cpp's perplexity on it when bench/.venv-llamacpp exists.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from lowbit.models import load_model  # noqa: E402
from lowbit.nn.bitlinear import freeze_bitlinear, set_lam, swap_to_bitlinear  # noqa: E402
from lowbit.methods.bitnet import lam_schedule  # noqa: E402
from lowbit.train.loop import TrainConfig, text_windows, train  # noqa: E402

STATE = "bitnet_latent.pt"


class DistillLoss:
    """KL(teacher || student) per token on the logits (mean over tokens), temperature 1; sets
    the students' lam by the warm-up schedule each call (one call per optimizer step)."""

    def __init__(self, teacher, lam_warmup: int):
        self.teacher, self.lam_warmup, self.step, self.lams = teacher, lam_warmup, 0, []

    def __call__(self, model, ids):
        lam = lam_schedule(self.step, self.lam_warmup)
        set_lam(model, lam)
        self.lams.append(lam)
        self.step += 1
        with torch.no_grad():
            t = self.teacher(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        s = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        return torch.nn.functional.kl_div(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]),
                                          log_target=True, reduction="batchmean")


def part_train(args, work: Path) -> dict:
    lm = load_model()
    teacher = lm.model
    teacher.eval()
    student = copy.deepcopy(teacher)
    names = swap_to_bitlinear(student)
    windows = text_windows(lm.tokenizer, "wiki-calibration", args.seq_len, seed=0)
    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch, seq_len=args.seq_len, seed=0,
                      warmup_steps=args.warmup, log_every=1)
    loss = DistillLoss(teacher, args.lam_warmup)
    res = train(student, windows, cfg, loss_fn=loss, log=lambda s: print(s, flush=True))
    latent = {k: v for k, v in student.state_dict().items() if any(k.startswith(n + ".") for n in names)}
    tmp = work / (STATE + ".tmp")
    torch.save(latent, tmp)
    os.replace(tmp, work / STATE)
    out = {**res.to_dict(), "lams": loss.lams, "swapped": len(names), "windows_available": int(windows.shape[0])}
    (work / "bitnet_train.json").write_text(json.dumps(out, indent=1))
    _plot(out, work / "bitnet_loss.svg")
    return out


def _plot(res: dict, path: Path) -> None:
    from lowbit.eval.svg import scatter
    pts = [(i + 1, v, "") for i, v in enumerate(res["losses"])]
    svg = scatter([{"name": "KL(fp32 || BitLinear), nats/token", "points": pts, "line": True, "markers": True}], "optimizer step",
                  "distillation loss (nats/token)", "BitNet b1.58 continued training of SmolLM2-135M "
                  f"(seq {res['config']['seq_len']}, batch {res['config']['batch_size']}, lam warm-up)",
                  log_y=True)
    path.write_text(svg)


def _frozen(lm, state: dict | None):
    """A copy of the fp32 model swapped to BitLinear (latent weights from `state` if given), then
    frozen: -> (model, QuantizeReport, max |BitLinear logits - frozen logits| on one window)."""
    m = copy.deepcopy(lm.model)
    swap_to_bitlinear(m)
    if state is not None:
        missing = set(state) - set(m.state_dict())
        if missing:
            raise SystemExit(f"{STATE}: tensors {sorted(missing)[:3]} not in the swapped model")
        m.load_state_dict(state, strict=False)
    set_lam(m, 1.0)
    m.eval()
    ids = text_windows(lm.tokenizer, "wiki-calibration", 64, seed=1, max_windows=1)
    with torch.no_grad():
        a = m(input_ids=ids).logits
        rep = freeze_bitlinear(m)
        b = m(input_ids=ids).logits
    return m, rep, float((a - b).abs().max())


def _ppl(model, tok, args, label, key: str | None = None) -> dict:
    """lowbit's harness perplexity; cached in WORK/ppl_<key>_<tokens>.json (--part base fills the
    models that do not depend on training while it runs)."""
    from lowbit.eval import evaluate
    cache = args.work / f"ppl_{key}_{args.eval_tokens}.json" if key else None
    if cache is not None and cache.exists():
        p = json.loads(cache.read_text())
    else:
        p = evaluate(model, tok, metrics=("ppl",), max_tokens=args.eval_tokens, label=label, progress=False)["ppl"]
        if cache is not None:
            cache.write_text(json.dumps(p))
    print(f"{label}: ppl {p['ppl']:.2f} (nll {p['nll_mean']:.4f} +- {p['nll_stderr']:.4f}, "
          f"{p['tokens_scored']} tokens)", flush=True)
    return p


def _decode_speed(model, tok, args) -> float:
    from lowbit.data.text import load_text, tokenize_text
    from lowbit.eval.speed import measure_speed
    ids = tokenize_text(tok, load_text("wiki-evaluation"))[:16]
    return measure_speed(model, ids, new_tokens=args.new_tokens, runs=args.runs, warmup=1,
                         progress=False).decode_tokens_per_s


def _decode_cpu_s(model, tok, args) -> float:
    """Process CPU seconds per decode step on the step path (greedy, 16-token prompt): the work a
    token costs, much less disturbed than wall time by other processes on a shared box (run it
    with --threads 1, where CPU time is the one thread's, no pool spin)."""
    from lowbit.data.text import load_text, tokenize_text
    from lowbit.nn.step import step_model
    ids = tokenize_text(tok, load_text("wiki-evaluation"))[:16]
    sm = step_model(model, True)
    cache = sm.new_cache(16 + args.new_tokens)
    with torch.inference_mode():
        nxt = sm.step(ids, 0, cache).argmax()
        t0 = time.process_time()
        for i in range(args.new_tokens):
            nxt = sm.step(nxt.view(1), 16 + i, cache).argmax()
        return (time.process_time() - t0) / args.new_tokens


def _export_gguf(lm, model, rep, out: Path, ternary_type: str) -> dict:
    """api.export -> GGUF; read back with lowbit's GGUF reader; every linear compared bit for bit."""
    import numpy as np

    from lowbit import api
    from lowbit.models.base import LoadedModel
    from lowbit.export.gguf.reader import load_gguf
    loaded = LoadedModel(model, lm.tokenizer, lm.path, lm.source)
    api.export(loaded, rep, out, format="gguf", overwrite=True, ternary_type=ternary_type)
    back, _, meta = load_gguf(out, torch.float32)
    sd = back.state_dict()
    exact = all(np.array_equal(sd[f"{n}.weight"].numpy(), qw.dequantize().numpy()) for n, qw in rep.qweights.items())
    side = json.loads(Path(str(out) + ".lowbit.json").read_text()) if Path(str(out) + ".lowbit.json").exists() else {}
    types: dict = {}
    for t in (side.get("gguf") or {}).get("tensors", {}).values():
        types[t["used"]] = types.get(t["used"], 0) + 1
    return {"file": str(out), "bytes": out.stat().st_size, "linears_bit_exact": bool(exact), "types": types}


def _llamacpp_ppl(gguf: Path, tok, args, work: Path) -> dict | None:
    import subprocess

    import numpy as np

    from lowbit.data.text import load_text, token_windows, tokenize_text
    env = os.environ.get("LOWBIT_LLAMACPP_PY")      # a venv elsewhere (shared by worktrees)
    py = Path(env) if env else ROOT / "bench" / ".venv-llamacpp" / "bin" / "python"
    if not py.exists():
        print("llama.cpp: bench/.venv-llamacpp not built (LOWBIT_LLAMACPP_PY unset); skipped", flush=True)
        return None
    w = token_windows(tokenize_text(tok, load_text("wiki-evaluation")), 512, args.eval_tokens // 512)
    np.save(work / "windows.npy", w.numpy())
    r = subprocess.run([str(py), str(ROOT / "bench" / "peers" / "llamacpp_ids_ppl.py"), str(gguf),
                        str(work / "windows.npy"), "--threads", str(args.threads)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"llama.cpp failed on {gguf}: {r.stderr[-2000:]}", flush=True)
        return {"error": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


class BlockInt8Act:
    """llama.cpp's activation rounding for a ggml dot product, emulated: int8 absmax per block of
    `block` columns (Q8_0's 32 with an fp16 scale for Q8_0 weights; Q8_K's 256 with an fp32 scale
    for TQ1_0 / TQ2_0 weights; ggml-cpu quantize_row_q8_0 / quantize_row_q8_K)."""

    def __init__(self, block: int, fp16_scale: bool):
        self.block, self.fp16_scale = block, fp16_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // self.block, self.block)
        d = xb.abs().amax(-1, keepdim=True) / 127.0
        if self.fp16_scale:
            d = d.half().float()
        q = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1.0)).clamp(-127, 127), 0.0)
        return (q * d).reshape(x.shape).to(x.dtype)


def part_acts(args, work: Path) -> dict:
    """The trained ternary model under three activation roundings (lowbit harness, same windows):
    BitNet's int8 per token (as trained), llama.cpp's int8 per block (emulated, per GGUF type of
    each tensor), and float activations."""
    lm = load_model()
    model, rep, _ = _frozen(lm, torch.load(work / STATE))
    out = {}
    per_token = {n: model.get_submodule(n).act_quant for n in rep.qweights}
    for key, label in (("per_block", "llama.cpp-style int8 per block (Q8_0: 32, Q8_K: 256)"),
                       ("float", "float activations")):
        for n in rep.qweights:
            k = model.get_submodule(n).in_features
            model.get_submodule(n).act_quant = (None if key == "float" else
                                                BlockInt8Act(256, False) if k % 256 == 0 else BlockInt8Act(32, True))
        out[key] = _ppl(model, lm.tokenizer, args, f"trained ternary, {label}", f"trained_{key}")
    for n, aq in per_token.items():
        model.get_submodule(n).act_quant = aq
    (work / "bitnet_acts.json").write_text(json.dumps(out, indent=1))
    return out


def part_speed(args, work: Path) -> dict:
    """Decode tok/s on our kernels in one process: fp32, the frozen ternary model (int8 per-token
    activations) on the 2-bit ternary kernel (TernaryKernel, t2x64) and on the 4-bit nibble
    container it used before (kernels.TERNARY_T2 = False: fp32 table GEMV, rounding in torch), and
    w4g64-rtn. --rounds R measures every model once per round, interleaved (a loaded box drifts),
    and reports each model's median over rounds. Ternary weights: the trained latents in WORK, or
    with --ptq ternary PTQ of the bundled model (speed does not depend on the weights' values)."""
    from lowbit import api
    from lowbit.data.text import load_text, tokenize_text
    from lowbit.nn import ext, kernels
    from lowbit.nn.prepare import prepare_for_inference
    from lowbit.nn.step import step_model
    lm = load_model()
    tok = lm.tokenizer
    state = None if args.ptq else torch.load(work / STATE)
    tern, _, _ = _frozen(lm, state)
    ids = tokenize_text(tok, load_text("wiki-evaluation"))[:16]
    with torch.no_grad():
        ref = tern(input_ids=ids.view(1, -1)).logits[0, -1]      # QuantLinear reference forward
    old = copy.deepcopy(tern)
    kernels.TERNARY_T2 = False
    prepare_for_inference(old)
    kernels.TERNARY_T2 = True
    info = prepare_for_inference(tern)
    with torch.no_grad():
        packed = tern(input_ids=ids.view(1, -1)).logits[0, -1]
        packed_old = old(input_ids=ids.view(1, -1)).logits[0, -1]
        sm = step_model(tern, True)
        got = sm.step(ids, 0, sm.new_cache(32))
    res = {"isa": ext.isa(), "threads": torch.get_num_threads(), "weights": "ptq" if args.ptq else "trained",
           "ternary_kernels": sum(isinstance(m, kernels.TernaryKernel) for m in tern.modules()),
           "ternary_packed_bytes": info["packed_bytes"],
           "logit_absmax": float(ref.abs().max()),
           "max_abs_logit_diff": {"t2_forward_vs_reference": float((packed - ref).abs().max()),
                                  "t2_step_vs_reference": float((got - ref).abs().max()),
                                  "q4_forward_vs_reference": float((packed_old - ref).abs().max())}}
    q4 = copy.deepcopy(lm.model)
    api.quantize(q4, "w4g64-rtn", progress=False)
    prepare_for_inference(q4)
    models = {"fp32": lm.model, "ternary-t2": tern, "ternary-q4-nibble": old, "w4g64-rtn": q4}
    per = {k: [] for k in models}
    for r in range(args.rounds):
        for k, m in models.items():
            per[k].append(1.0 / _decode_cpu_s(m, tok, args) if args.cpu_time else _decode_speed(m, tok, args))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in per.items()), flush=True)
    med = {k: float(sorted(v)[len(v) // 2]) for k, v in per.items()}
    res["measure"] = ("decode steps per process-CPU second (step path)" if args.cpu_time
                      else "decode tokens/s, wall (measure_speed)")
    res["decode_tokens_per_s_rounds"] = per
    res["decode_tokens_per_s"] = med
    res["ratios"] = {"ternary-t2/w4g64-rtn": med["ternary-t2"] / med["w4g64-rtn"],
                     "ternary-t2/fp32": med["ternary-t2"] / med["fp32"],
                     "ternary-q4-nibble/w4g64-rtn": med["ternary-q4-nibble"] / med["w4g64-rtn"],
                     "w4g64-rtn/fp32": med["w4g64-rtn"] / med["fp32"]}
    res["load_average"] = os.getloadavg()
    print(json.dumps(res), flush=True)
    tmp = work / f"bitnet_speed_{res['isa']}.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, work / f"bitnet_speed_{res['isa']}.json")
    return res


def part_eval(args, work: Path) -> dict:
    from lowbit import api
    from lowbit.nn.prepare import prepare_for_inference
    state_path = work / STATE
    lm = load_model()
    tok = lm.tokenizer
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
                 "threads": args.threads, "eval_tokens": args.eval_tokens}
    res["fp32"] = _ppl(lm.model, tok, args, "fp32", "fp32")
    ptq, ptq_rep, _ = _frozen(lm, None)
    res["ptq"] = _ppl(ptq, tok, args, "ternary PTQ (RTN absmean)", "ptq")
    del ptq
    q4 = copy.deepcopy(lm.model)
    api.quantize(q4, "w4g64-rtn", progress=False)
    prepare_for_inference(q4)
    res["w4g64_ppl"] = _ppl(q4, tok, args, "w4g64-rtn", "w4g64")
    if args.part == "base":
        return res
    if not state_path.exists():
        raise SystemExit(f"{state_path}: no trained state; run --part train first")
    trained, rep, diff = _frozen(lm, torch.load(state_path))
    res["freeze_max_abs_logit_diff"] = diff
    res["trained"] = _ppl(trained, tok, args, "ternary continued-trained")
    gg = work / "smollm2-bitnet-tq2_0.gguf"
    res["gguf"] = _export_gguf(lm, trained, rep, gg, "TQ2_0")
    if args.tq1_0:
        res["gguf_tq1_0"] = _export_gguf(lm, trained, rep, work / "smollm2-bitnet-tq1_0.gguf", "TQ1_0")
    print(f"gguf: {res['gguf']}", flush=True)
    res["llamacpp"] = _llamacpp_ppl(gg, tok, args, work)
    # decode speed on our packed kernels: fp32, trained ternary (int8 per-token activations), w4g64-rtn
    speeds = {"fp32": _decode_speed(lm.model, tok, args)}
    prepare_for_inference(trained)
    speeds["ternary"] = _decode_speed(trained, tok, args)
    speeds["w4g64-rtn"] = _decode_speed(q4, tok, args)
    res["decode_tokens_per_s"] = speeds
    res["train"] = json.loads((work / "bitnet_train.json").read_text()) if (work / "bitnet_train.json").exists() else {}
    (work / "bitnet_eval.json").write_text(json.dumps(res, indent=1))
    md = _markdown(res, args)
    print(md)
    if args.md:
        args.md.write_text(md)
    return res


def _markdown(res: dict, args) -> str:
    t = res.get("train", {}).get("config", {})
    sp = res["decode_tokens_per_s"]
    lines = [f"Command: `nice -n 10 .venv/bin/python bench/bench_bitnet.py --work WORK --steps {t.get('steps')} "
             f"--seq-len {t.get('seq_len')} --batch {t.get('batch_size')} --lr {t.get('lr')} "
             f"--lam-warmup {args.lam_warmup} --eval-tokens {args.eval_tokens}`; machine: {res['machine']}, "
             f"torch threads {res['threads']}; date {res['date']}. Perplexity: lowbit harness, wiki-evaluation, "
             f"first {args.eval_tokens // 512} windows of 512.", "",
             "| model | weights | activations | PPL | NLL +- stderr | decode tok/s (ours) | vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for key, name, w, a, s in (("fp32", "SmolLM2-135M", "fp32", "fp32", "fp32"),
                               ("ptq", "ternary PTQ (RTN absmean)", "ternary per tensor", "int8 per token", None),
                               ("trained", "ternary, continued-trained (KD)", "ternary per tensor", "int8 per token",
                                "ternary"),
                               ("w4g64_ppl", "w4g64-rtn", "int4 g64", "fp32 (int8 in kernel)", "w4g64-rtn")):
        p = res[key]
        v = sp.get(s) if s else None
        lines.append(f"| {name} | {w} | {a} | {p['ppl']:.2f} | {p['nll_mean']:.3f} +- {p['nll_stderr']:.3f} | "
                     + (f"{v:.1f} | {v / sp['fp32']:.2f}x |" if v else "- | - |"))
    lines += ["", f"Decode ternary / w4g64-rtn: {sp['ternary'] / sp['w4g64-rtn']:.2f}x (same process, same prompt). "
              f"Freeze: max |BitLinear logits - frozen logits| = {res['freeze_max_abs_logit_diff']:.3g}. "
              f"GGUF ({res['gguf']['bytes'] / 2**20:.1f} MiB): tensor types {res['gguf']['types']}, every linear "
              f"read back bit-exact: {res['gguf']['linears_bit_exact']}."]
    lc = res.get("llamacpp")
    if lc and "ppl" in lc:
        lines.append(f"llama.cpp (llama-cpp-python) perplexity of that GGUF on the same windows: {lc['ppl']:.2f}.")
    else:
        lines.append(f"llama.cpp: not run ({'no bench/.venv-llamacpp' if lc is None else lc.get('error', '')[:120]}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--part", choices=("train", "base", "eval", "acts", "speed", "all"), default="all")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--lam-warmup", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="--part speed: interleaved rounds over the models")
    ap.add_argument("--cpu-time", action="store_true",
                    help="--part speed: decode steps per process-CPU second instead of wall tokens/s")
    ap.add_argument("--ptq", action="store_true",
                    help="--part speed: ternary PTQ weights instead of the trained latents in WORK")
    ap.add_argument("--tq1_0", action="store_true", help="also write (and check) the TQ1_0 file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part in ("train", "all"):
        part_train(args, args.work)
    if args.part in ("base", "eval", "all"):
        part_eval(args, args.work)
    if args.part in ("acts", "all"):
        part_acts(args, args.work)
    if args.part == "speed":
        part_speed(args, args.work)


if __name__ == "__main__":
    main()
