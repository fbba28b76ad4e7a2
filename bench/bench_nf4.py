"""4-bit / 8-bit loading (ours vs bitsandbytes' own) and QLoRA on the bundled model -> BENCHMARKS.md rows.

    nice -n 10 .venv/bin/python bench/bench_nf4.py [--quick] [--max-tokens N] [--out bench/out/nf4]

Loading rows: for each of nf4 / fp4 (+- double quant) and int8, ours = api.load(quantization=...),
bitsandbytes' = transformers' from_pretrained(..., BitsAndBytesConfig(...)) in bench/.venv-bnb
(bench/peers/bnb_peer.py quantize --save). Columns: bits per parameter of the quantized linears
(codes + constants, from the stored tensors), memory footprint (ours: memory_footprint(); theirs:
transformers' get_memory_footprint() and, after "+", the quant_state bytes it leaves out), disk size
of the saved directory's safetensors, and ΔPPL on wiki-evaluation by lowbit's harness (their 4-bit
save is read by lowbit's bnb reader, whose logits equal theirs bit for bit: tests/test_bnb4.py; their
int8 is scored the same way, i.e. weight-only: LLM.int8()'s activation rounding is not in it).

QLoRA rows: r=8, alpha=16, dropout 0.05 on every block linear of the NF4 + double-quant base (read
from our bnb file, so no float copy of the linears is ever in memory) vs full fine-tuning of the fp32
model, same steps, batch, seq_len, schedule (cosine, 10% warmup), gradient checkpointing on,
AdamW (lr 2e-4 for the adapters, 2e-5 for full fine-tuning: the usual choices for each); each in its own
process so peak RSS (ru_maxrss) is that run's. Task: the Python standard library's docstrings
(lowbit/data/pydocs.py, PSF licence), train and held-out parts split by module. Loss curves ->
bench/figures/qlora_loss.svg.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

BNB_PY = Path(os.environ.get("LOWBIT_BNB_PY", ROOT / "bench/.venv-bnb/bin/python"))
VARIANTS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False)]


def disk_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def linear_bits(model) -> float:
    from lowbit.nn.bnb4 import bnb_modules
    mods = bnb_modules(model)
    n = sum(m.in_features * m.out_features for m in mods.values())
    b = sum(t.numel() * t.element_size() for m in mods.values() for t in m.buffers())
    return b * 8 / n


def same_weights(a, b) -> bool:
    """Every bitsandbytes-style layer of a and b holds the same tensors (codes and constants)."""
    from lowbit.nn.bnb4 import bnb_modules
    ma, mb = bnb_modules(a), bnb_modules(b)
    if set(ma) != set(mb):
        return False
    for n in ma:
        ba, bb = dict(ma[n].named_buffers()), dict(mb[n].named_buffers())
        if set(ba) != set(bb) or not all(torch.equal(ba[k], bb[k]) for k in ba):
            return False
    return True


def ppl(model, tok, max_tokens: int) -> float:
    from lowbit.eval.perplexity import perplexity
    return float(perplexity(model, tok, text="wiki-evaluation", seq_len=512, max_tokens=max_tokens,
                            progress=False).ppl)


def loading(args, out: Path) -> list[dict]:
    import lowbit.api as api
    from lowbit.models import load_model
    rows = []
    base = load_model("smollm2-135m")
    t0 = time.perf_counter()
    base_ppl = ppl(base.model, base.tokenizer, args.max_tokens)
    rows.append({"who": "float", "quant": "fp32", "dq": False, "bits": 32.0,
                 "footprint": api.memory_footprint(base), "disk": disk_bytes(base.path), "ppl": base_ppl,
                 "seconds": round(time.perf_counter() - t0, 1)})
    print(rows[-1], flush=True)
    src = base.path
    del base
    for q, dq in [v for v in VARIANTS if f"{v[0]}{'-dq' if v[1] else ''}" in args.variants.split(",")]:
        tag = f"{q}{'-dq' if dq else ''}"
        t0 = time.perf_counter()
        lm = api.load("smollm2-135m", quantization=q, double_quant=dq)
        d = api.export(lm, None, out / f"ours-{tag}", "bnb", overwrite=True)
        rows.append({"who": "lowbit", "quant": q, "dq": dq, "bits": linear_bits(lm.model),
                     "footprint": api.memory_footprint(lm), "disk": disk_bytes(d),
                     "dq_saved": lm.meta["bnb"]["double_quant_bytes_saved"],
                     "ppl": ppl(lm.model, lm.tokenizer, args.max_tokens), "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
        del lm
        if not BNB_PY.is_file():
            continue
        t0 = time.perf_counter()
        theirs = out / f"bnb-{tag}"
        cmd = [str(BNB_PY), str(ROOT / "bench/peers/bnb_peer.py"), "quantize", str(src), "--quant", q,
               "--save", str(theirs), "--out", str(out / f"bnb-{tag}-chk")] + (["--double-quant"] if dq else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-3000:], file=sys.stderr)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        lm = api.load(theirs)
        mine = api.load(out / f"ours-{tag}")
        same = same_weights(lm.model, mine.model)
        del mine
        rows.append({"who": "bitsandbytes", "quant": q, "dq": dq, "bits": linear_bits(lm.model),
                     "footprint": res["footprint"], "quant_state": res["quant_state_bytes"],
                     "disk": disk_bytes(theirs), "same_weights_as_ours": same,
                     # identical tensors give identical logits (tests/test_bnb4.py): no second pass
                     "ppl": rows[-1]["ppl"] if same else ppl(lm.model, lm.tokenizer, args.max_tokens),
                     "versions": {k: res[k] for k in ("bitsandbytes", "transformers", "torch")},
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
        del lm
    for r in rows:
        r["dppl"] = r["ppl"] - base_ppl
    return rows


def finetune(mode: str, base_dir: str, steps: int, batch: int, seq: int, lr: float) -> dict:
    """One run in this process (called via --finetune so peak RSS is this run's)."""
    import lowbit.api as api
    from lowbit.data.pydocs import task_text, text_sha256
    from lowbit.data.text import token_windows, tokenize_text
    from lowbit.train.lora import LoraConfig, add_lora, save_adapter, trainable_parameters
    from lowbit.train.loop import TrainConfig, _peak_rss, heldout_loss, train
    lm = api.load(base_dir if mode == "qlora" else "smollm2-135m")
    rss_loaded = _peak_rss()
    tok = lm.tokenizer
    tr = token_windows(tokenize_text(tok, task_text("train")), seq)
    tr = tr[torch.randperm(tr.shape[0], generator=torch.Generator().manual_seed(0))]
    ho = token_windows(tokenize_text(tok, task_text("heldout")), seq)[:16]
    if mode == "qlora":
        add_lora(lm.model, LoraConfig(r=8, alpha=16, dropout=0.05))
    else:
        lm.model.requires_grad_(True)
    before = heldout_loss(lm.model, ho)
    cfg = TrainConfig(steps=steps, batch_size=batch, seq_len=seq, lr=lr, warmup_steps=max(1, steps // 10),
                      grad_checkpointing=True, seed=0)
    res = train(lm.model, tr, cfg)
    after = heldout_loss(lm.model, ho)
    out = {"mode": mode, "base": Path(base_dir).name if mode == "qlora" else "fp32", "trainable": trainable_parameters(lm.model), "heldout_before": before,
           "heldout_after": after, "losses": res.losses, "seconds": res.seconds, "peak_rss": res.peak_rss_bytes,
           "rss_after_load": rss_loaded, "train_tokens": int(tr.numel()), "heldout_tokens": int(ho.numel()),
           "task_sha256": {"train": text_sha256("train"), "heldout": text_sha256("heldout")},
           "config": {"steps": steps, "batch": batch, "seq": seq, "lr": lr}}
    if mode == "qlora":
        save_adapter(lm.model, Path(base_dir).parent / "qlora-adapter", base=str(base_dir), overwrite=True)
    return out


def peft_check(out: Path, seq: int) -> dict:
    """The trained adapter (OUT/qlora-adapter) on our NF4 file, loaded by peft + bitsandbytes in
    bench/.venv-bnb: its held-out logits against lowbit's (base + load_adapter), and the held-out
    loss each gives."""
    import lowbit.api as api
    from safetensors.torch import load_file, save_file
    from lowbit.data.pydocs import task_text
    from lowbit.data.text import token_windows, tokenize_text
    from lowbit.train.lora import load_adapter
    base = out / "ours-nf4-dq"
    lm = api.load(base)
    ho = token_windows(tokenize_text(lm.tokenizer, task_text("heldout")), seq)[:16]
    load_adapter(lm.model, out / "qlora-adapter")        # adds the LoRA layers its config names
    lm.model.eval()
    save_file({"ids": ho.contiguous()}, str(out / "heldout-ids.safetensors"))
    cmd = [str(BNB_PY), str(ROOT / "bench/peers/bnb_peer.py"), "peft", str(base), str(out / "qlora-adapter"),
           "--ids", str(out / "heldout-ids.safetensors"), "--out", str(out / "peft-chk")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-3000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    theirs = load_file(str(out / "peft-chk" / "logits.safetensors"))["logits"].float()

    def nll(lg):
        return float(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ho[:, 1:].reshape(-1)))
    with torch.no_grad():
        ours = torch.cat([lm.model(input_ids=ho[i:i + 4]).logits.float() for i in range(0, ho.shape[0], 4)])
    return {"lora_modules": res["lora_modules"], "peft": res.get("peft"), "max_abs_logit_diff": float((theirs - ours).abs().max()),
            "max_abs_logit": float(ours.abs().max()), "heldout_ours": nll(ours), "heldout_peft": nll(theirs),
            "versions": {k: res[k] for k in ("bitsandbytes", "transformers", "torch")}}


def plot(runs: list[dict], path: Path) -> None:
    from lowbit.eval.svg import scatter
    series = [{"name": f"{r['mode']} (train loss)", "points": [(i + 1, v, "") for i, v in enumerate(r["losses"])],
               "line": True, "markers": False} for r in runs]
    svg = scatter(series, "step", "training loss (nats/token)",
                  "QLoRA (NF4+DQ base, r=8) vs full fine-tuning, SmolLM2-135M, stdlib docstrings")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg + "\n")


def mib(b) -> str:
    return f"{b / 2**20:.1f}"


def table(rows: list[dict], runs: list[dict]) -> str:
    lines = ["| loader | quantization | bits / param (linears) | memory footprint MiB | disk MiB | PPL | ΔPPL |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        fp = mib(r["footprint"]) + (f" + {mib(r['quant_state'])} quant_state" if r.get("quant_state") else "")
        q = r["quant"] + (" + double quant" if r["dq"] else "")
        eq = " (= ours: same tensors)" if r.get("same_weights_as_ours") else ""
        lines.append(f"| {r['who']} | {q} | {r['bits']:.3f} | {fp} | {mib(r['disk'])} | {r['ppl']:.3f}{eq} | "
                     f"{r['dppl']:+.3f} |")
    if runs:
        lines += ["", "| run | trainable params | held-out loss before | after | peak RSS MiB | RSS after load MiB | s |",
                  "|---|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['mode']} | {r['trainable']:,} | {r['heldout_before']:.4f} | {r['heldout_after']:.4f} | "
                         f"{mib(r['peak_rss'])} | {mib(r['rss_after_load'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4096 eval tokens, 20 training steps")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4, help="QLoRA learning rate")
    ap.add_argument("--full-lr", type=float, default=2e-5, help="full fine-tuning learning rate")
    ap.add_argument("--out", default=str(ROOT / "bench/out/nf4"))
    ap.add_argument("--skip-loading", action="store_true", help="reuse OUT/loading.json")
    ap.add_argument("--reuse", action="store_true", help="reuse OUT/finetune-*.json from an earlier run")
    ap.add_argument("--variants", default="nf4-dq,nf4,fp4-dq,fp4,int8", help="comma list of nf4[-dq], fp4[-dq], int8")
    ap.add_argument("--finetune", choices=["qlora", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--peft-check", action="store_true", help="only: load OUT/qlora-adapter with peft (bench/.venv-bnb) "
                                                            "and compare its held-out logits and loss with ours")
    ap.add_argument("--qlora-base", default="ours-nf4-dq", help="the bnb directory under OUT the QLoRA run loads")
    a = ap.parse_args()
    if a.quick:
        a.max_tokens, a.steps = 4096, 20
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.peft_check:
        res = peft_check(out, a.seq)
        (out / "peft-check.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res))
        return 0
    if a.finetune:
        res = finetune(a.finetune, str(out / a.qlora_base), a.steps, a.batch, a.seq, a.lr)
        (out / f"finetune-{a.finetune}.json").write_text(json.dumps(res, indent=1) + "\n")
        return 0
    from lowbit.eval.report import env_info
    rows = json.loads((out / "loading.json").read_text()) if a.skip_loading else loading(a, out)
    (out / "loading.json").write_text(json.dumps(rows, indent=1) + "\n")
    runs = []
    for mode in ("qlora", "full"):
        done = out / f"finetune-{mode}.json"
        if a.reuse and done.is_file():
            runs.append(json.loads(done.read_text()))
            continue
        cmd = [sys.executable, __file__, "--finetune", mode, "--out", str(out), "--steps", str(a.steps),
               "--batch", str(a.batch), "--seq", str(a.seq), "--lr", str(a.lr if mode == "qlora" else a.full_lr)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            continue
        runs.append(json.loads((out / f"finetune-{mode}.json").read_text()))
    if runs:
        plot(runs, ROOT / "bench" / "figures" / "qlora_loss.svg")
    print(f"command: {' '.join(sys.argv)}\nmachine: {os.cpu_count()} cpus, {env_info()}\n"
          f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(table(rows, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
