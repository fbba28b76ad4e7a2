"""GPTQ vs RTN vs llm-compressor on the bundled model: quality, wall time, peak memory.

    .venv/bin/python bench/bench_gptq.py                  # everything (hours on the shared 2-core box)
    .venv/bin/python bench/bench_gptq.py --quick          # smoke run: one config, tiny calibration / eval
    .venv/bin/python bench/bench_gptq.py --configs rtn-w3g128,gptq-w3g128 --skip-peers

Phases (each resumable: results are kept under --work and a finished config is not redone):
  1. calibration windows: `calibration_tokens` (wiki-calibration, seeded) saved to calib.pt, the
     file llm-compressor's runner reads too (bench/peers/llmc_gptq.py), so both see the same tokens;
  2. every lowbit config quantizes the fp32 model in its own process (clean peak-RSS figures:
     a sampler thread reads the process RSS every 20 ms around `api.quantize`) and writes a lowbit
     native directory;
  3. evaluation with lowbit.eval, one process: perplexity over the first --eval-windows
     non-overlapping 512-token windows of wiki-evaluation (every token after the first of each
     window scored), KL / top-1 agreement to the fp32 model on the first --kl-windows of them
     (lowbit.eval.kl: llama.cpp's KLD statistic, fp16 reference log-probs); llm-compressor's
     results are evaluated the same way, its dequantized weights loaded into the fp32 model.
The markdown table goes to stdout and <work>/results.md; raw figures to <work>/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLMC_PY = Path(os.environ.get("LOWBIT_LLMC_PYTHON", ROOT / "bench" / ".venv-llmc" / "bin" / "python"))

# name -> (lowbit recipe spec, extra method args). Preset grammar (lowbit.recipe):
#   w{bits}[g{group}][-sym]-{method}[-actorder[-static]][-mse]
CONFIGS = {
    "rtn-w4g128": ("w4g128-rtn", {}), "gptq-w4g128": ("w4g128-gptq", {}),
    "gptq-w4g128-ao": ("w4g128-gptq-actorder", {}),
    "rtn-w4c": ("w4-rtn", {}), "gptq-w4c": ("w4-gptq", {}), "gptq-w4c-ao": ("w4-gptq-actorder", {}),
    "rtn-w3g128": ("w3g128-rtn", {}), "gptq-w3g128": ("w3g128-gptq", {}),
    "gptq-w3g128-ao": ("w3g128-gptq-actorder", {}),
    "rtn-w2g64": ("w2g64-rtn", {}), "gptq-w2g64": ("w2g64-gptq", {}),
    "gptq-w2g64-ao": ("w2g64-gptq-actorder", {}),
    # side by side with llm-compressor (which refuses g128 on hidden 576; its default actorder is static)
    "rtn-w4g64": ("w4g64-rtn", {}), "gptq-w4g64": ("w4g64-gptq", {}),
    "gptq-w4g64-aos": ("w4g64-gptq-actorder-static", {}),
    "rtn-w3g64": ("w3g64-rtn", {}), "gptq-w3g64": ("w3g64-gptq", {}),
}
# lowbit's MSE range search per group (`-mse`: diag(H)-weighted for gptq), alone and with act-order,
# and RTN with its own MSE range search (the strongest data-free baseline)
for _pt in ("w4g128", "w4", "w3g128", "w2g64", "w4g64"):
    _tag = "w4c" if _pt == "w4" else _pt
    CONFIGS[f"gptq-{_tag}-mse"] = (f"{_pt}-gptq-mse", {})
    CONFIGS[f"gptq-{_tag}-ao-mse"] = (f"{_pt}-gptq-actorder-mse", {})
    CONFIGS[f"rtn-{_tag}-mse"] = (f"{_pt}-rtn-mse", {})
CONFIGS["gptq-w4g64-aos-mse"] = ("w4g64-gptq-actorder-static-mse", {})
# memory: re-run the block per linear group instead of pausing every batch's forward
CONFIGS["gptq-w4g128-nopause"] = ("w4g128-gptq", {})
CONFIGS["gptq-w4g128-b2"] = ("w4g128-gptq", {})          # forward batches of 2 windows instead of 8
# issue 20: symmetric 4/3/2-bit g64 beside AutoRound (bench/bench_low20.py runs these in its own --work)
SR_ITERS = int(os.environ.get("LOWBIT_SR_ITERS", "10"))
for _b in (4, 3, 2):
    _p = f"w{_b}g64-sym"
    CONFIGS[f"rtn-{_p}"] = (f"{_p}-rtn", {})
    CONFIGS[f"gptq-{_p}-ao-mse"] = (f"{_p}-gptq-actorder-mse", {})
    CONFIGS[f"rotgptq-{_p}-ao-mse"] = (f"{_p}-rot-gptq-actorder-mse", {})
    CONFIGS[f"sr-{_p}"] = (f"{_p}-signround-mse", {"iters": SR_ITERS, "init": "gptq", "act_order": True})
    CONFIGS[f"rotsr-{_p}"] = (f"{_p}-rot-signround-mse", {"iters": SR_ITERS, "init": "gptq", "act_order": True})
# issue 20 item 3: vector codebooks (methods/vq.py) at the same calibration, beside the int rows above
for _b in (2, 3):
    CONFIGS[f"vq-w{_b}g64"] = (f"w{_b}g64-vq", {})
    CONFIGS[f"rotvq-w{_b}g64"] = (f"w{_b}g64-rot-vq", {})
    CONFIGS[f"vqft-w{_b}g64"] = (f"w{_b}g64-vq", {"block_steps": 20})      # + block fine-tuning
    CONFIGS[f"rotvqft-w{_b}g64"] = (f"w{_b}g64-rot-vq", {"block_steps": 20})
# issue 20: then end-to-end fine-tuning of scales, codebooks and norms on the float model's KL
# (recipe suffix -ft, lowbit.train.tune) over the same calibration windows
for _b in (2, 3):
    CONFIGS[f"vq-w{_b}g64-ft"] = (f"w{_b}g64-vq-ft", {})
    CONFIGS[f"rotvq-w{_b}g64-ft"] = (f"w{_b}g64-rot-vq-ft", {})
    CONFIGS[f"vqft-w{_b}g64-ft"] = (f"w{_b}g64-vq-ft", {"block_steps": 20})
    CONFIGS[f"rotvqft-w{_b}g64-ft"] = (f"w{_b}g64-rot-vq-ft", {"block_steps": 20})
for _b in (4, 3, 2):
    CONFIGS[f"rotgptq-w{_b}g64-sym-ao-mse-ft"] = (f"w{_b}g64-sym-rot-gptq-actorder-mse-ft", {})
    CONFIGS[f"gptq-w{_b}g64-ao-mse-ft"] = (f"w{_b}g64-gptq-actorder-mse-ft", {})
    CONFIGS[f"rotgptq-w{_b}g64-sym-ao-mse-ft8"] = (f"w{_b}g64-sym-rot-gptq-actorder-mse-ft", {"ft_epochs": 8})
    CONFIGS[f"rotgptq-w{_b}g64-sym-ao-mse-ftlr3"] = (f"w{_b}g64-sym-rot-gptq-actorder-mse-ft", {"ft_lr": 3e-3})
    # 2 epochs: for 64 calibration windows (4x the steps per epoch of 16)
    CONFIGS[f"rotgptq-w{_b}g64-sym-ao-mse-ft2"] = (f"w{_b}g64-sym-rot-gptq-actorder-mse-ft", {"ft_epochs": 2})
    CONFIGS[f"rotgptq-w{_b}g64-sym-ao-mse-ft1"] = (f"w{_b}g64-sym-rot-gptq-actorder-mse-ft", {"ft_epochs": 1})
for _b in (2, 3):
    CONFIGS[f"rotvq-w{_b}g64-ft2"] = (f"w{_b}g64-rot-vq-ft", {"ft_epochs": 2})
    CONFIGS[f"vq-w{_b}g64-ft2"] = (f"w{_b}g64-vq-ft", {"ft_epochs": 2})
# calibration-loop overrides per config (lowbit.calibration.CalibrationConfig fields)
CALIBRATION = {"gptq-w4g128-nopause": {"pause_forward": False}, "gptq-w4g128-b2": {"batch_size": 2}}
# llm-compressor runs: name -> runner arguments (bench/peers/llmc_gptq.py)
PEERS = {
    "llmc-w4g64": ["--bits", "4", "--group-size", "64"],
    "llmc-w4g128": ["--bits", "4", "--group-size", "128"],
    "llmc-w4g128-bypass": ["--bits", "4", "--group-size", "128", "--bypass-divisibility"],
    "llmc-w4c": ["--bits", "4", "--group-size", "-1"],
    "llmc-w4g64-static": ["--bits", "4", "--group-size", "64", "--actorder", "static"],
    "llmc-w3g64": ["--bits", "3", "--group-size", "64"],
}
QUICK = {"samples": 4, "seq_len": 128, "eval_windows": 2, "kl_windows": 1, "configs": "rtn-w4g128,gptq-w4g128"}


def _recipe(name: str):
    from lowbit.recipe import Recipe, get_recipe
    spec, extra = CONFIGS[name]
    r = get_recipe(spec)
    if extra:
        d = r.to_dict()
        d["name"] = f"{spec}+{','.join(f'{k}={v}' for k, v in extra.items())}"
        ft = {k[3:]: v for k, v in extra.items() if k.startswith("ft_")}       # finetune options
        if ft:
            d["finetune"] = {**d.get("finetune", {}), **ft}
        for rule in d["rules"]:
            rule["method_args"].update({k: v for k, v in extra.items() if not k.startswith("ft_")})
        r = Recipe.from_dict(d)
    return r


# ---------------------------------------------------------------------------------------------
# phase 2: one lowbit config, in its own process
# ---------------------------------------------------------------------------------------------
class RSSSampler:
    """Peak resident set size of this process, sampled every `period` s while running."""

    def __init__(self, period: float = 0.02):
        import psutil
        self.proc, self.period, self.peak, self._stop = psutil.Process(), period, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def __enter__(self):
        self.start_rss = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_config(name: str, work: Path, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    from lowbit import api
    from lowbit.models import load_model
    out = work / "models" / name
    tokens = torch.load(work / "calib.pt")
    lm = load_model("smollm2-135m")
    recipe = _recipe(name)
    with torch.no_grad():   # page every weight in, so the baseline RSS holds the whole fp32 model
        _ = sum(float(p.sum()) for p in lm.model.parameters())
    with RSSSampler() as rss:
        t0 = time.perf_counter()
        report = api.quantize(lm.model, recipe, tokens=tokens, progress=False, calibration=CALIBRATION.get(name),
                              log=lambda m: print(f"[{name}] {m}", file=sys.stderr, flush=True))
        wall = time.perf_counter() - t0
    api.save_quantized(lm, report, out, overwrite=True)
    res = {"config": name, "recipe": recipe.name, "wall_s": wall, "threads": threads,
           "finetune": report.finetune,
           "rss_before_mb": rss.start_rss / 2**20, "rss_peak_mb": rss.peak / 2**20,
           "rss_peak_delta_mb": (rss.peak - rss.start_rss) / 2**20,
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "activation_mb": report.activation_bytes / 2**20, "timing": report.timing,
           "loss": sum(r.get("loss", 0.0) for r in report.layers), "n_layers": len(report.layers),
           "load_avg": os.getloadavg()}
    (work / "runs").mkdir(exist_ok=True)
    (work / "runs" / f"{name}.json").write_text(json.dumps(res, indent=1))


# ---------------------------------------------------------------------------------------------
# phase 3: evaluation (all models, one reference)
# ---------------------------------------------------------------------------------------------
def _record(rec: dict) -> dict:
    kl = rec.get("kl", {})
    return {"ppl": rec["ppl"]["ppl"], "kl": kl.get("mean", 0.0), "kl_stderr": kl.get("mean_stderr", 0.0),
            "kl_p99": kl.get("p99", 0.0), "top1": kl.get("top1_agreement", 1.0),
            "eval_tokens": rec["ppl"].get("tokens"), "kl_tokens": kl.get("tokens"),
            "ppl_method": rec["ppl"].get("method"), "seconds": rec.get("seconds")}


def evaluate_all(work: Path, names: list[str], peers: list[str], eval_windows: int, kl_windows: int,
                 threads: int) -> dict:
    """lowbit.eval on every model: the same windows, scoring and fp32 reference for all."""
    import torch
    torch.set_num_threads(threads)
    from lowbit.eval import evaluate, evaluate_reference
    from lowbit.models import load_model
    cache = work / "eval.json"
    key = f"lowbit.eval {eval_windows}x512 kl{kl_windows}x512"
    allres = json.loads(cache.read_text()) if cache.is_file() else {}
    done = allres.get(key, {})
    settings = {"max_tokens": eval_windows * 512, "kl_max_tokens": kl_windows * 512, "seq_len": 512,
                "progress": False}
    fp = load_model("smollm2-135m")
    rec, ref = evaluate_reference(fp.model, fp.tokenizer, metrics=["ppl", "kl"], **settings)
    done["fp32"] = _record(rec)
    del fp

    def save():
        allres[key] = done
        cache.write_text(json.dumps(allres, indent=1))

    def one(name: str, model, tok) -> None:
        t0 = time.perf_counter()
        done[name] = _record(evaluate(model, tok, metrics=["ppl", "kl"], reference=ref, **settings))
        print(f"eval {name}: {done[name]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        save()

    save()
    for name in names:
        if name in done or not (work / "models" / name / "lowbit.json").is_file():
            continue
        q = load_model(work / "models" / name)      # the native directory, QuantLinear modules
        one(name, q.model, q.tokenizer)
        del q
    for name in peers:
        dump = work / "peers" / f"{name}.pt"
        if name in done or not dump.is_file():
            continue
        lm = load_model("smollm2-135m")
        weights = torch.load(dump)
        for lname, w in weights.items():             # llm-compressor's dequantized grid values
            lm.model.get_submodule(lname).weight.data = w
        one(name, lm.model, lm.tokenizer)
        done[name]["n_loaded"] = len(weights)
        save()
        del lm, weights
    return done


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------
def run_peer(name: str, work: Path, threads: int, model_dir: Path) -> None:
    out = work / "peers"
    out.mkdir(exist_ok=True)
    cmd = [str(LLMC_PY), str(HERE / "peers" / "llmc_gptq.py"), "--model-dir", str(model_dir),
           "--tokens", str(work / "calib.pt"), "--batch-size", "8", "--threads", str(threads),
           "--dump", str(out / f"{name}.pt"), *PEERS[name]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1]) if lines else {"ok": False, "error": f"runner exited {proc.returncode}"}
    res.update(process_wall_s=time.perf_counter() - t0, load_avg=os.getloadavg(), config=name)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))


def table(work: Path, names: list[str], peers: list[str], evals: dict) -> str:
    fp = evals.get("fp32", {})
    rows = ["| config | method | PPL | dPPL | KL | top-1 | quantize wall s | peak RSS delta MiB |",
            "|---|---|---|---|---|---|---|---|"]
    if fp:
        rows.append(f"| fp32 | - | {fp['ppl']:.3f} | 0 | 0 | 100% | - | - |")
    for name in names + peers:
        e = evals.get(name)
        run_f = (work / "runs" / f"{name}.json") if name in names else (work / "peers" / f"{name}.json")
        run = json.loads(run_f.read_text()) if run_f.is_file() else {}
        if not e:
            if run.get("ok") is False:
                rows.append(f"| {name} | llm-compressor | refused: {run.get('error', '')[:140]} | | | | | |")
            continue
        wall = run.get("wall_s")
        mem = run.get("rss_peak_delta_mb")
        rows.append(f"| {name} | {'llm-compressor' if name in peers else name.split('-')[0]} | {e['ppl']:.3f} | "
                    f"{e['ppl'] - fp.get('ppl', float('nan')):+.3f} | {e['kl']:.4f} | {100 * e['top1']:.1f}% | "
                    f"{'-' if wall is None else f'{wall:.0f}'} | {'-' if mem is None else f'{mem:.0f}'} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 configs, tiny calibration and eval")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--kl-windows", type=int, default=8)
    ap.add_argument("--no-eval", action="store_true", help="quantize (and run peers) only")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "gptq"))
    ap.add_argument("--run-config", help=argparse.SUPPRESS)    # internal: phase 2 in a subprocess
    args = ap.parse_args()
    if args.quick:
        args.samples, args.seq_len = QUICK["samples"], QUICK["seq_len"]
        args.eval_windows, args.kl_windows, args.configs = QUICK["eval_windows"], QUICK["kl_windows"], QUICK["configs"]
        args.skip_peers = True
        args.work = str(Path(args.work).with_name("gptq-quick"))
    work = Path(args.work)
    if args.run_config:
        run_config(args.run_config, work, args.threads)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        sys.exit(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    peers = [] if args.skip_peers else [p for p in args.peers.split(",") if p]

    import torch
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.models import load_tokenizer
    from lowbit.models.load import gguf_to_hf_dir, resolve_source
    calib = work / "calib.pt"
    want = CalibrationConfig(n_samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    tokens = calibration_tokens(load_tokenizer("smollm2-135m"), want)
    if not calib.is_file() or not torch.equal(torch.load(calib), tokens):
        torch.save(tokens, calib)
    for name in names:
        if not (work / "runs" / f"{name}.json").is_file():
            print(f"== quantize {name}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--run-config", name, "--work", str(work),
                            "--threads", str(args.threads)], check=True)
    if peers:
        if not LLMC_PY.is_file():
            print(f"llm-compressor venv not found at {LLMC_PY}; skipping peers (make peers)", file=sys.stderr)
            peers = []
        model_dir, _ = gguf_to_hf_dir(resolve_source("smollm2-135m")[1])
        for name in peers:
            if not (work / "peers" / f"{name}.json").is_file():
                print(f"== llm-compressor {name}", file=sys.stderr, flush=True)
                run_peer(name, work, args.threads, model_dir)
    if args.no_eval:
        return 0
    evals = evaluate_all(work, names, peers, args.eval_windows, args.kl_windows, args.threads)
    md = table(work, names, peers, evals)
    head = (f"calibration: {args.samples} x {args.seq_len} tokens of wiki-calibration (seed {args.seed}); "
            f"eval: {args.eval_windows} x 512 windows of wiki-evaluation, KL/top-1 on the first "
            f"{args.kl_windows}; threads {args.threads}; {platform.machine()}, {os.cpu_count()} cpus")
    (work / "results.md").write_text(head + "\n\n" + md + "\n")
    (work / "results.json").write_text(json.dumps({"settings": vars(args), "eval": evals}, indent=1))
    print(head)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
