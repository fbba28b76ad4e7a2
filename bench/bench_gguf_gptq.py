"""GPTQ-fed GGUF vs llama-quantize, scored by llama.cpp itself.

    .venv/bin/python bench/bench_gguf_gptq.py [--model smollm2-135m] [--presets q4_k_m,q3_k_m,q2_k]
        [--calib 64] [--windows 40] [--threads 2] [--quick]

For each preset, two files of the same types and size:
  llama.cpp   llama_model_quantize (= llama-quantize) on lowbit's F32 GGUF of the model, with an
              imatrix collected by lowbit on --calib windows of 512 tokens of wiki-calibration
              (lowbit's imatrix files give llama.cpp's exact bytes, BENCHMARKS.md "GGUF");
  lowbit      `<preset>-gptq`: the same per-tensor types, codes chosen by GPTQ with llama.cpp's block
              encoders as the quantizer (methods/gptq_ggml.py), the same imatrix as the encoders'
              weighting, calibrated on the same --calib windows.
Both are scored by llama.cpp's perplexity (bench/peers/llamacpp_ref.py ppl: non-overlapping
512-token windows of wiki-evaluation, no BOS, every token after the first), as is the F32 file.
Results: bench/_work/gguf_gptq/<model>.json and a markdown table on stdout.
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
WORK = ROOT / "bench" / "_work" / "gguf_gptq"
PEER = os.environ.get("LOWBIT_LLAMACPP_PY", str(ROOT / "bench" / ".venv-llamacpp" / "bin" / "python"))


def peer(*args: str) -> dict:
    r = subprocess.run([PEER, str(ROOT / "bench" / "peers" / "llamacpp_ref.py"), *args],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"llamacpp_ref {args[0]} failed:\n{r.stderr[-3000:]}")
    out = r.stdout.strip()
    return json.loads(out[out.rfind("\n{") + 1:] if not out.startswith("{") else out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--presets", default="q4_k_m,q3_k_m,q2_k")
    ap.add_argument("--calib", type=int, default=64, help="512-token windows of wiki-calibration (imatrix and GPTQ)")
    ap.add_argument("--windows", type=int, default=40, help="512-token windows of wiki-evaluation scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", default="gptq", choices=("gptq", "gptqk"),
                    help="lowbit's recipe: <preset>-gptq (GPTQ on every decoder linear) or <preset>-gptqk "
                         "(GPTQ on the k-quant tensors; llama.cpp's encoder on legacy fallback types)")
    ap.add_argument("--quick", action="store_true", help="q4_k_m only, 8 calibration windows, 4 scored")
    ap.add_argument("--kl-only", action="store_true", help="only add lowbit's KL / top-1 (vs the float model, "
                    "8 x 512 tokens of wiki-evaluation) to an earlier run's results, from its kept files")
    a = ap.parse_args(argv)
    if a.quick:
        a.presets, a.calib, a.windows = "q4_k_m", 8, 4
    if not Path(PEER).is_file():
        raise SystemExit(f"{PEER} missing: bash bench/setup_peers.sh llamacpp")
    import torch

    from lowbit import api
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    from lowbit.calibration.imatrix import compute_imatrix
    from lowbit.export.gguf.writer import write_gguf
    from lowbit.models import load_model, resolve_source
    torch.set_num_threads(a.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    if a.kl_only:
        return add_kl(a)
    lm = load_model(a.model)
    kind, src = resolve_source(a.model)
    source_gguf = src if kind == "gguf" else None
    tag = a.model
    f32 = WORK / f"{tag}-f32.gguf"
    write_gguf(lm.model, f32, "f32", hf_dir=lm.path, source_gguf=source_gguf, progress=False)
    im_path = WORK / f"{tag}.imatrix.gguf"
    im = compute_imatrix(lm, "wiki-calibration", a.calib, 512, seed=0, progress=False)
    im.save(im_path)
    ppl = lambda p: peer("ppl", str(p), "--n-ctx", "512", "--max-windows", str(a.windows),  # noqa: E731
                         "--threads", str(a.threads))
    base = ppl(f32)
    res = {"model": a.model, "date": time.strftime("%Y-%m-%d"), "calib_windows": a.calib, "eval_windows": a.windows,
           "f32_ppl": base["ppl"], "llama_cpp_python": base["llama_cpp_python"], "rows": []}
    print(f"F32 (llama.cpp): ppl {base['ppl']:.4f}", flush=True)
    tokens = calibration_tokens(lm.tokenizer, CalibrationConfig(n_samples=a.calib, seq_len=512, seed=0))
    for preset in a.presets.split(","):
        theirs = WORK / f"{tag}-{preset}-llamacpp.gguf"
        t0 = time.perf_counter()
        peer("quantize", str(f32), str(theirs), "--ftype", preset.upper(), "--imatrix", str(im_path),
             "--threads", str(a.threads))
        t_theirs = time.perf_counter() - t0
        ours = WORK / f"{tag}-{preset}-{a.variant}.gguf"
        model = copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        rep = api.quantize(model, f"{preset}-{a.variant}", tokens=tokens, imatrix=im, progress=False)
        rep.imatrix["file"] = str(im_path)
        from lowbit.models import LoadedModel
        qlm = LoadedModel(model, lm.tokenizer, lm.path, lm.source, lm.source_sha256)
        api.export(qlm, rep, ours, "gguf", overwrite=True, source_gguf=source_gguf)
        t_ours = time.perf_counter() - t0
        del model, qlm
        pt, po = ppl(theirs), ppl(ours)
        row = {"preset": preset, "variant": a.variant, "llamacpp_bytes": theirs.stat().st_size, "lowbit_bytes": ours.stat().st_size,
               "llamacpp_ppl": pt["ppl"], "lowbit_ppl": po["ppl"],
               "llamacpp_dppl": pt["ppl"] - base["ppl"], "lowbit_dppl": po["ppl"] - base["ppl"],
               "llamacpp_s": round(t_theirs, 1), "lowbit_s": round(t_ours, 1),
               "rows_from_encoder": sum(int(r.get("rows_from_encoder", 0)) for r in rep.layers)}
        row["loss_ratio"] = row["lowbit_dppl"] / row["llamacpp_dppl"] if row["llamacpp_dppl"] > 0 else None
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        (WORK / f"{tag}{'' if a.variant == 'gptq' else '-' + a.variant}.json").write_text(json.dumps(res, indent=1))
    print(f"\n{a.model}: llama.cpp perplexity, {a.windows} x 512 tokens of wiki-evaluation; F32 {base['ppl']:.4f}; "
          f"imatrix and GPTQ on {a.calib} x 512 tokens of wiki-calibration\n")
    print(f"| preset | llama-quantize + imatrix: MiB | ppl | dPPL | lowbit -{a.variant} + imatrix: MiB | ppl | dPPL | "
          "loss ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        ratio = f"{r['loss_ratio']:.2f}" if r["loss_ratio"] is not None else "-"
        print(f"| {r['preset']} | {r['llamacpp_bytes'] / 2**20:.2f} | {r['llamacpp_ppl']:.4f} | {r['llamacpp_dppl']:+.4f} "
              f"| {r['lowbit_bytes'] / 2**20:.2f} | {r['lowbit_ppl']:.4f} | {r['lowbit_dppl']:+.4f} | {ratio} |")


def add_kl(a) -> None:
    """KL(P_float || Q) and top-1 of both files of every row, read back by lowbit's GGUF reader."""
    from lowbit.eval import evaluate, reference_for
    from lowbit.export.gguf.reader import load_gguf
    from lowbit.models import load_model
    tag = a.model + ("" if a.variant == "gptq" else "-" + a.variant)
    res = json.loads((WORK / f"{tag}.json").read_text())
    lm = load_model(a.model)
    opts = dict(text="wiki-evaluation", seq_len=512, max_tokens=4096, kl_max_tokens=4096, progress=False)
    ref = reference_for(lm.model, lm.tokenizer, **opts)
    for row in res["rows"]:
        for who, f in (("llamacpp", f"{a.model}-{row['preset']}-llamacpp.gguf"), ("lowbit", f"{a.model}-{row['preset']}-{a.variant}.gguf")):
            model, _, _ = load_gguf(WORK / f)
            rec = evaluate(model, lm.tokenizer, metrics="ppl,kl", reference=ref, **opts)
            row[f"{who}_kl"], row[f"{who}_top1"] = rec["kl"]["mean"], rec["kl"]["top1_agreement"]
            del model
        print(json.dumps({k: row[k] for k in row if "kl" in k or "top1" in k or k == "preset"}), flush=True)
    (WORK / f"{tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
