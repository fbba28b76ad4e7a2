"""QAT on the bundled model: how much of the PTQ loss (ΔPPL vs fp32) quantization-aware training wins back.

    nice -n 10 .venv/bin/python bench/bench_qat.py --configs w4g128-rtn,w3g128-rtn --steps 100
    nice -n 10 .venv/bin/python bench/bench_qat.py --quick         # smoke run: 2 steps, 2 eval windows

For each PTQ recipe: quantize the fp32 model (lowbit.api.quantize), score it, then QAT from it
(lowbit.train.qat.run_qat: latent weights initialised to the PTQ weights, fake quantization with
STE, LSQ scales unless --fixed-scales, knowledge distillation to the fp32 model's logits unless
--loss ce) on wiki-calibration windows, freeze back to QuantizedWeights, export the lowbit native
directory (api.export) and score the model read back from it (api.load). Scores: lowbit.eval
perplexity on the first --eval-tokens tokens of wiki-evaluation in 512-token windows, the same
text for fp32, PTQ and QAT; training never sees it.

recovered = (ΔPPL_PTQ - ΔPPL_QAT) / ΔPPL_PTQ; the issue's bar is >= 0.5. Each finished config is
kept in <work>/results.json and not redone. Writes <work>/results.md (BENCHMARKS.md rows) and the
training-loss curves as an SVG (--svg, default bench/figures/qat_loss.svg).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import lowbit.api as api  # noqa: E402
from lowbit.eval.report import env_info  # noqa: E402


def _ppl(model, tokenizer, tokens: int) -> float:
    from lowbit.eval import evaluate
    rec = evaluate(model, tokenizer, metrics="ppl", text="wiki-evaluation", max_tokens=tokens, progress=False)
    return float(rec["ppl"]["ppl"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="w4g128-rtn,w3g128-rtn", help="comma-separated PTQ recipes")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scale-lr", type=float, default=1e-4)
    ap.add_argument("--fixed-scales", action="store_true", help="train latent weights only (no LSQ)")
    ap.add_argument("--loss", default="kd", choices=("kd", "ce"))
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "qat"))
    ap.add_argument("--svg", default=str(HERE / "figures" / "qat_loss.svg"))
    ap.add_argument("--tag", default="", help="suffix for the result keys (variants of one recipe)")
    ap.add_argument("--merge", default="", help="comma-separated work dirs whose results.json to merge into "
                                                "--work and report (no model is run)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"))
    ap.add_argument("--ptq-ppl", type=float, default=None,
                    help="the PTQ model's PPL measured by an earlier run of the same recipe and --eval-tokens "
                         "(RTN is deterministic): skips re-scoring it")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.eval_tokens, a.seq, a.batch, a.configs = 2, 1024, 64, 2, "w4g128-rtn"
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    env = env_info()
    if a.merge:
        for d in a.merge.split(","):
            results.update(json.loads((Path(d) / "results.json").read_text()))
        res_path.write_text(json.dumps(results, indent=1))
        rows = [r for k, r in results.items() if "env" in r]
        _write(results, a, work, rows[-1]["env"] if rows else env)
        return
    from lowbit.train.qat import QATConfig, run_qat

    teacher = api.load("smollm2-135m")
    key_fp = f"fp32@{a.eval_tokens}"
    if key_fp not in results:
        t0 = time.perf_counter()
        results[key_fp] = {"ppl": _ppl(teacher.model, teacher.tokenizer, a.eval_tokens),
                           "seconds": time.perf_counter() - t0}
        res_path.write_text(json.dumps(results, indent=1))
    ppl_fp = results[key_fp]["ppl"]
    print(f"fp32 PPL {ppl_fp:.3f}", flush=True)

    for recipe in [c for c in a.configs.split(",") if c]:
        scales = "fixed" if a.fixed_scales else "lsq"
        key = f"{recipe}|{a.loss}|{scales}|s{a.steps}|b{a.batch}x{a.seq}|lr{a.lr:g}|slr{a.scale_lr:g}{'|' + a.optimizer if a.optimizer != 'adamw' else ''}{a.tag}@{a.eval_tokens}"
        if key in results:
            print(f"{key}: done before", flush=True)
            continue
        lm = api.load("smollm2-135m")
        t0 = time.perf_counter()
        report = api.quantize(lm.model, recipe, tokenizer=lm.tokenizer, progress=False)
        t_ptq = time.perf_counter() - t0
        ppl_ptq = a.ptq_ppl if a.ptq_ppl is not None else _ppl(lm.model, lm.tokenizer, a.eval_tokens)
        print(f"{recipe}: PTQ PPL {ppl_ptq:.3f} ({t_ptq:.0f} s)", flush=True)
        cfg = QATConfig(steps=a.steps, lr=a.lr, scale_lr=None if a.fixed_scales else a.scale_lr,
                        batch_size=a.batch, seq_len=a.seq, loss=a.loss, seed=0, optimizer=a.optimizer)
        qr = run_qat(lm.model, report, lm.tokenizer, cfg, teacher=teacher.model if a.loss == "kd" else None,
                     log=lambda m: print(f"  {recipe} {m}", flush=True))
        out = api.export(lm, report, work / f"{recipe}-qat{a.tag}", overwrite=True)
        back = api.load(out)
        ppl_qat = _ppl(back.model, back.tokenizer, a.eval_tokens)
        d_ptq, d_qat = ppl_ptq - ppl_fp, ppl_qat - ppl_fp
        results[key] = {"recipe": recipe, "loss": a.loss, "scales": scales, "steps": a.steps, "batch": a.batch,
                        "seq": a.seq, "lr": a.lr, "scale_lr": None if a.fixed_scales else a.scale_lr,
                        "ppl_fp32": ppl_fp, "ppl_ptq": ppl_ptq, "ppl_qat": ppl_qat,
                        "recovered": (d_ptq - d_qat) / d_ptq if d_ptq > 0 else None,
                        "codes_changed": qr.freeze["codes_changed"], "qat_seconds": qr.seconds,
                        "peak_rss_mib": (qr.train.peak_rss_bytes or 0) / 2 ** 20, "losses": qr.train.losses,
                        "optimizer": a.optimizer, "ptq_ppl_given": a.ptq_ppl is not None,
                        "env": env, "command": _command()}
        print(f"{recipe}: QAT PPL {ppl_qat:.3f}; recovered {results[key]['recovered']:.3f} of ΔPPL; "
              f"{qr.freeze['codes_changed'] * 100:.2f} % codes changed; {qr.seconds:.0f} s", flush=True)
        res_path.write_text(json.dumps(results, indent=1))
        del lm, back, report

    _write(results, a, work, env)


def _command() -> str:
    return "nice -n 10 .venv/bin/python bench/bench_qat.py " + " ".join(sys.argv[1:])


def _write(results: dict, a, work: Path, env: dict) -> None:
    from lowbit.eval.svg import scatter
    rows = [r for k, r in results.items() if not k.startswith("fp32") and k.endswith(f"@{a.eval_tokens}")]
    cmds = sorted({r.get("command", _command()) for r in rows}) or [_command()]
    lines = [f"Command{'s' if len(cmds) > 1 else ''}: " + "; ".join(f"`{c}`" for c in cmds) +
             f"; machine: {env['machine']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
             f"{env['threads']} threads, load average {env['load_average']}; date {env['date']}.", "",
             "| PTQ start | QAT loss | scales | steps x batch x seq | lr (w / s) | PPL fp32 | PPL PTQ | PPL QAT | "
             "ΔPPL PTQ | ΔPPL QAT | recovered | codes changed | QAT s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['recipe']}` | {r['loss']} | {r['scales']} | {r['steps']} x {r['batch']} x {r['seq']} | "
                     f"{r['lr']:g} / {r['scale_lr'] if r['scale_lr'] is not None else '-'} | {r['ppl_fp32']:.3f} | "
                     f"{r['ppl_ptq']:.3f} | {r['ppl_qat']:.3f} | {r['ppl_ptq'] - r['ppl_fp32']:+.3f} | "
                     f"{r['ppl_qat'] - r['ppl_fp32']:+.3f} | {r['recovered'] * 100:.1f} % | "
                     f"{r['codes_changed'] * 100:.2f} % | {r['qat_seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    (work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    series = [{"name": f"{r['recipe']} {r['loss']} {r['scales']}",
               "points": [(i + 1, v, f"step {i + 1}") for i, v in enumerate(r["losses"])],
               "line": True, "markers": False} for r in rows]
    if series:
        svg = Path(a.svg)
        svg.parent.mkdir(parents=True, exist_ok=True)
        tmp = svg.with_suffix(".svg.tmp")
        tmp.write_text(scatter(series, "step", "training loss (KL to fp32, nats/token)" if a.loss == "kd"
                               else "training loss (nats/token)", "QAT training loss, bundled SmolLM2-135M"))
        os.replace(tmp, svg)


if __name__ == "__main__":
    main()
