"""Issue 20: RTN / GPTQ / rotated GPTQ / SignRound / rotated SignRound at symmetric 4/3/2-bit g64,
beside AutoRound on the same calibration tokens, scored by one evaluator (lowbit.eval).

    # 1. the calibration windows AutoRound and lowbit share (calib.npy == calib.pt, checked)
    PYTHONPATH=src .venv/bin/python bench/peers/peer_inputs.py --out bench/_work/low20/inputs --samples 16 --seq-len 512
    # 2. AutoRound (its own venv), e.g. W3 g64 sym, 20 iterations
    bench/.venv-llmc/bin/python bench/peers/autoround_export.py --model-dir $(cat bench/_work/low20/inputs/model_dir.txt) \
        --calib bench/_work/low20/inputs/calib.npy --format auto_gptq --bits 3 --group-size 64 --iters 20 \
        --nsamples 16 --threads 2 --out bench/_work/low20/autoround-w3g64-sym-i20
    # 3. lowbit configs (bench_gptq.py CONFIGS: rtn-w3g64-sym, gptq-w3g64-sym-ao-mse, rotgptq-..., sr-..., rotsr-...)
    LOWBIT_SR_ITERS=10 .venv/bin/python bench/bench_gptq.py --run-config sr-w3g64-sym --work bench/_work/low20/gptq
    # 4. this script: evaluation of everything present, the table, and the online-rotation cost
    .venv/bin/python bench/bench_low20.py --eval-windows 8 --kl-windows 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = HERE / "_work" / "low20"


def online_cost(threads: int, tokens: int = 512, reps: int = 3) -> dict:
    """Forward time of the float model on `tokens` tokens: folded rotation vs + online down_proj."""
    import torch
    torch.set_num_threads(threads)
    from lowbit.models import load_model
    from lowbit.transforms.rotate import RotateConfig, rotate_model
    ids = torch.randint(0, 49152, (1, tokens), generator=torch.Generator().manual_seed(0))
    out = {}
    for online in (False, True):
        lm = load_model("smollm2-135m")
        rotate_model(lm.model, RotateConfig(online_down=online))
        with torch.no_grad():
            lm.model(ids)
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                lm.model(ids)
                best = min(best, time.perf_counter() - t0)
        out["online" if online else "folded"] = best
        del lm
    out["ratio"] = out["online"] / out["folded"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--kl-windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--online-cost", action="store_true")
    ap.add_argument("--work", default=str(WORK), help="holds gptq/ (bench_gptq.py --work WORK/gptq) and "
                    "the autoround-* outputs")
    args = ap.parse_args()
    work_root = Path(args.work)
    import bench_gptq as B
    import torch
    work = work_root / "gptq"
    names = sorted(p.name for p in (work / "models").iterdir() if (p / "lowbit.json").is_file())
    evals = B.evaluate_all(work, names, [], args.eval_windows, args.kl_windows, args.threads)
    from lowbit.eval import evaluate, evaluate_reference
    from lowbit.models import load_model
    settings = {"max_tokens": args.eval_windows * 512, "kl_max_tokens": args.kl_windows * 512, "seq_len": 512,
                "progress": False}
    peers = sorted(p for p in work_root.glob("autoround-*") if (p / "peer.json").is_file())
    if peers:
        fp = load_model("smollm2-135m")
        _, ref = evaluate_reference(fp.model, fp.tokenizer, metrics=["ppl", "kl"], **settings)
        del fp
        for p in peers:
            q = load_model(p)
            evals[p.name] = B._record(evaluate(q.model, q.tokenizer, metrics=["ppl", "kl"], reference=ref, **settings))
            info = json.loads((p / "peer.json").read_text())
            evals[p.name].update(wall_s=info["quantize_wall_s"], peak_rss_mb=info["peak_rss_mb"])
            del q
    fp = evals["fp32"]["ppl"]
    rows = ["| config | PPL | dPPL | KL | top-1 | quantize wall s | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, e in evals.items():
        run_f = work / "runs" / f"{name}.json"
        run = json.loads(run_f.read_text()) if run_f.is_file() else {}
        wall = e.get("wall_s", run.get("wall_s"))
        rss = e.get("peak_rss_mb", run.get("rss_peak_mb"))
        rows.append(f"| {name} | {e['ppl']:.3f} | {e['ppl'] - fp:+.3f} | {e['kl']:.4f} | {100 * e['top1']:.1f}% | "
                    f"{'-' if wall is None else f'{wall:.0f}'} | {'-' if rss is None else f'{rss:.0f}'} |")
    md = "\n".join(rows)
    res = {"eval": evals, "settings": vars(args), "load_avg": os.getloadavg()}
    if args.online_cost:
        res["online_cost"] = online_cost(args.threads)
        md += f"\n\nonline down_proj rotation: {res['online_cost']}"
    (work_root / "results.md").write_text(md + "\n")
    (work_root / "results.json").write_text(json.dumps(res, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
