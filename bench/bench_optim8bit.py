"""8-bit AdamW (lowbit.train.optim8bit) vs torch's fp32 AdamW on one fixed fine-tuning run.

    nice -n 10 .venv/bin/python bench/bench_optim8bit.py --steps 60
    nice -n 10 .venv/bin/python bench/bench_optim8bit.py --quick        # smoke run

The run: the bundled SmolLM2-135M, training every RMSNorm weight and every linear of the last
--layers decoder layers (the tied embedding / lm_head and the other layers frozen), next-token
loss on wiki-calibration windows of --seq tokens, --batch per step, cosine LR from --lr, AdamW
weight decay 0.01, grad clip 1.0 (lowbit.train.loop.train). The last --heldout windows of
wiki-calibration (in text order) are held out and never trained on; the rest are shuffled by the
seed, which is the only thing that differs between seeds.

Noise: fp32 AdamW with seeds 0..S-1. "Within noise" means, for each seed, the 8-bit run's final
held-out loss differs from the fp32 run's on the same seed by no more than the spread (max - min)
of fp32's final held-out loss across seeds, and its training curve (10-step moving average) stays
as close to fp32's same-seed curve as fp32's curves for different seeds stay to each other.

State bytes: the tensors each optimizer holds after the run (torch: exp_avg, exp_avg_sq, step).
Writes <work>/results.json, <work>/results.md (BENCHMARKS.md rows) and --svg (loss curves).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from lowbit.eval.report import env_info  # noqa: E402
from lowbit.models.load import load_model  # noqa: E402
from lowbit.train.loop import TrainConfig, heldout_loss, text_windows, train  # noqa: E402
from lowbit.train.optim8bit import AdamW8bit  # noqa: E402


def _trainable(model, layers: int) -> list[torch.nn.Parameter]:
    n = model.config.num_hidden_layers
    last = tuple(f"model.layers.{i}." for i in range(n - layers, n))
    ps = []
    for name, p in model.named_parameters():
        on = name.endswith("norm.weight") or (name.startswith(last) and name.endswith("proj.weight"))
        p.requires_grad_(on)
        if on:
            ps.append(p)
    return ps


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def _run(opt_name: str, seed: int, a, windows_all: torch.Tensor) -> dict:
    lm = load_model()
    model = lm.model
    params = _trainable(model, a.layers)
    held = windows_all[-a.heldout:]
    pool = windows_all[:-a.heldout]
    pool = pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))]
    if opt_name == "fp32":
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    else:
        opt = AdamW8bit(params, lr=a.lr, weight_decay=0.01, state_format=opt_name.split("-")[1])
    cfg = TrainConfig(steps=a.steps, lr=a.lr, batch_size=a.batch, seq_len=a.seq, seed=seed, weight_decay=0.01)
    before = heldout_loss(model, held)
    res = train(model, pool, cfg, optimizer=opt, log=lambda m: print(f"  {opt_name} s{seed} {m}", flush=True))
    after = heldout_loss(model, held)
    return {"optimizer": opt_name, "seed": seed, "losses": res.losses, "heldout_before": before,
            "heldout_after": after, "state_bytes": _state_bytes(opt), "params": sum(p.numel() for p in params),
            "seconds": res.seconds, "peak_rss_mib": (res.peak_rss_bytes or 0) / 2 ** 20}


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def _curve_gap(a: list[float], b: list[float]) -> float:
    sa, sb = _smooth(a), _smooth(b)
    return max(abs(x - y) for x, y in zip(sa, sb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--layers", type=int, default=4, help="train the linears of the last N decoder layers")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--optimizers", default="fp32,8bit-dynamic")
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "optim8bit"))
    ap.add_argument("--svg", default=str(HERE / "figures" / "optim8bit_loss.svg"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.steps, a.seq, a.batch, a.seeds, a.heldout = 3, 32, 2, 1, 2
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    env = env_info()
    tok = load_model().tokenizer
    windows_all = text_windows(tok, "wiki-calibration", a.seq, seed=None)
    tag = f"s{a.steps}|b{a.batch}x{a.seq}|lr{a.lr:g}|L{a.layers}|h{a.heldout}"
    for opt_name in a.optimizers.split(","):
        for seed in range(a.seeds):
            key = f"{opt_name}|seed{seed}|{tag}"
            if key in results:
                continue
            results[key] = {**_run(opt_name, seed, a, windows_all), "env": env}
            res_path.write_text(json.dumps(results, indent=1))
            r = results[key]
            print(f"{key}: held-out {r['heldout_before']:.4f} -> {r['heldout_after']:.4f}, "
                  f"state {r['state_bytes'] / 2 ** 20:.2f} MiB, {r['seconds']:.0f} s", flush=True)
    _write(results, a, tag, work, env)


def _write(results: dict, a, tag: str, work: Path, env: dict) -> None:
    from lowbit.eval.svg import scatter
    runs = {(r["optimizer"], r["seed"]): r for k, r in results.items() if k.endswith(tag)}
    opts = [o for o in a.optimizers.split(",") if any(k[0] == o for k in runs)]
    seeds = sorted({s for _, s in runs})
    fp = [runs[("fp32", s)] for s in seeds if ("fp32", s) in runs]
    spread = (max(r["heldout_after"] for r in fp) - min(r["heldout_after"] for r in fp)) if len(fp) > 1 else None
    curve_noise = max((_curve_gap(x["losses"], y["losses"]) for i, x in enumerate(fp) for y in fp[i + 1:]),
                      default=None)
    cmd = "nice -n 10 .venv/bin/python bench/bench_optim8bit.py " + " ".join(sys.argv[1:])
    lines = [f"Command: `{cmd}`; machine: {env['machine']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
             f"{env['threads']} threads, load average {env['load_average']}; date {env['date']}.", "",
             "| optimizer | seed | trained params | state bytes | vs fp32 AdamW | held-out loss before | after | "
             "Δ after vs fp32 same seed | max gap of smoothed train curve vs fp32 same seed | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for o in opts:
        for s in seeds:
            r = runs.get((o, s))
            if r is None:
                continue
            ref = runs.get(("fp32", s))
            ratio = r["state_bytes"] / ref["state_bytes"] if ref else float("nan")
            d = r["heldout_after"] - ref["heldout_after"] if ref else float("nan")
            gap = _curve_gap(r["losses"], ref["losses"]) if ref else float("nan")
            lines.append(f"| {o} | {s} | {r['params']:,} | {r['state_bytes']:,} | {ratio:.3f}x | "
                         f"{r['heldout_before']:.4f} | {r['heldout_after']:.4f} | {d:+.4f} | {gap:.4f} | {r['seconds']:.0f} |")
    if spread is not None:
        lines += ["", f"Noise (fp32 AdamW across {len(fp)} seeds): final held-out loss spread {spread:.4f}; "
                      f"max gap between smoothed training curves {curve_noise:.4f}."]
    (work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    series = [{"name": f"{o} seed {s}", "points": [(i + 1, v, f"step {i + 1}") for i, v in
                                                   enumerate(_smooth(runs[(o, s)]["losses"]))],
               "line": True, "markers": False} for o in opts for s in seeds if (o, s) in runs]
    if series:
        svg = Path(a.svg)
        svg.parent.mkdir(parents=True, exist_ok=True)
        tmp = svg.with_suffix(".svg.tmp")
        tmp.write_text(scatter(series, "step", "training loss, 10-step moving average (nats/token)",
                               "fp32 AdamW vs 8-bit AdamW, bundled SmolLM2-135M"))
        os.replace(tmp, svg)


if __name__ == "__main__":
    main()
