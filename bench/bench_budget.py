"""Budget-chosen mixes vs uniform presets (issue 22; the bundled model, or --model), and the sensitivity
pass's wall time against one GPTQ run.

    .venv/bin/python bench/bench_budget.py sens            # sensitivity + one GPTQ run, timed back to back
    .venv/bin/python bench/bench_budget.py measure --pairs 24   # measured single-module KL vs the proxies
    .venv/bin/python bench/bench_budget.py run NAME...     # quantize + write + evaluate configs:
                                                           #   a preset name, budget:<B> (e.g. budget:3.5bpw), or budget:@<candidate>
                                                           #   (the mix at that uniform candidate's size)
    .venv/bin/python bench/bench_budget.py table           # the markdown table of every finished run
    .venv/bin/python bench/bench_budget.py gguf [--model M] [q3_k_m q4_k_m]
                                            # the GGUF budget mix vs llama.cpp's mixes at their sizes
                                            #   (llama.cpp perplexity; needs bench/.venv-llamacpp)

Every step shares the calibration windows (--calib windows of 512 tokens of wiki-calibration,
seed 0) and keeps its results under --work (default bench/_work/budget): sens.json (the
sensitivity table, also in the lowbit cache), timing.json, measure.json, and per config a lowbit
native directory <work>/<name>/ with eval.json beside it (perplexity on the first --eval-windows
512-token windows of wiki-evaluation, KL / top-1 against the fp32 model on the first --kl-windows).
Those directories are what `lowbit report` reads.
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


def _tokens(lm, n: int):
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    return calibration_tokens(lm.tokenizer, CalibrationConfig(n_samples=n, seq_len=512))


def _load(a):
    from lowbit.models import load_model
    return load_model(a.model)


def _write(path: Path, obj) -> None:
    from lowbit.eval.report import write_json
    write_json(obj, path)


def step_sens(a) -> None:
    from lowbit import api
    from lowbit.budget import load_or_compute
    lm = _load(a)
    toks = _tokens(lm, a.calib)
    t0 = time.perf_counter()
    sens = load_or_compute(lm.model, toks, cache=False, fisher_samples=a.fisher, batch_size=8,
                           source_dir=lm.path, log=print)
    t_sens = time.perf_counter() - t0
    sens.save(a.work / "sens.json")
    t0 = time.perf_counter()
    api.quantize(lm.model, a.gptq, tokens=toks, progress=False)
    t_gptq = time.perf_counter() - t0
    rec = {"sensitivity_s": t_sens, "gptq_s": t_gptq, "ratio": t_sens / t_gptq, "gptq_recipe": a.gptq,
           "calib_windows": a.calib, "fisher_windows": a.fisher, "phases": sens.meta.get("timing"),
           "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    _write(a.work / "timing.json", rec)
    print(json.dumps(rec, indent=2))


def step_measure(a) -> None:
    from lowbit.budget import Sensitivity
    from lowbit.budget.measure import measure_pairs, rank_correlation, sample_pairs
    sens = Sensitivity.load(a.work / "sens.json")
    lm = _load(a)
    toks = _tokens(lm, a.calib)
    pairs = sample_pairs(sens, a.pairs, seed=0)
    t0 = time.perf_counter()
    rows = measure_pairs(lm.model, toks, pairs, kl_windows=a.kl_calib, sens=sens, log=print)
    out = {"rows": rows, "seconds": time.perf_counter() - t0,
           "spearman_predicted_kl": rank_correlation(rows, "predicted_kl"),
           "spearman_output_error": rank_correlation(rows, "output_error"),
           "kl_windows": a.kl_calib, "pairs": len(rows)}
    _write(a.work / "measure.json", out)
    print({k: v for k, v in out.items() if k != "rows"})


def _recipe_for(name: str, a, lm, toks):
    from lowbit.budget import Sensitivity, parse_budget, solve
    from lowbit.recipe import get_recipe
    if not name.startswith("budget:"):
        return get_recipe(name), None
    sens = Sensitivity.load(a.work / "sens.json")
    spec = name.split(":", 1)[1]
    if spec.startswith("@"):         # budget:@PRESET: the mix at that uniform candidate's own size
        if spec[1:] not in sens.candidates:
            raise SystemExit(f"{name}: {spec[1:]} is not a candidate of the sensitivity table ({sens.candidates})")
        c = sens.candidates.index(spec[1:])
        spec = f"{8 * sum(row[c] for row in sens.nbytes) / sens.weights():.12f}bpw"
    plan = solve(sens, parse_budget(spec))
    return plan.recipe(), plan


def step_run(a) -> None:
    from lowbit import api
    from lowbit.budget.sizing import file_payload_bytes
    from lowbit.eval import evaluate
    for name in a.names:
        out = a.work / name.replace(":", "-").replace("@", "at-")
        if (out / "eval.json").is_file() and not a.redo:
            print(f"{name}: done already")
            continue
        lm = _load(a)
        if name == "fp32":
            from lowbit.eval import evaluate as ev
            rec = ev(lm.model, lm.tokenizer, metrics=["ppl", "size"], max_tokens=512 * a.eval_windows,
                     label=name, progress=False)
            _write(a.work / "fp32.json", rec)
            print(name, rec["ppl"]["ppl"])
            continue
        toks = _tokens(lm, a.calib)
        recipe, plan = _recipe_for(name, a, lm, toks)
        t0 = time.perf_counter()
        rep = api.quantize(lm.model, recipe, tokens=toks, progress=False)
        t_q = time.perf_counter() - t0
        metrics = {"budget_plan": plan.to_dict()} if plan is not None else None
        api.export(lm, rep, out, "native", metrics=metrics, overwrite=True)
        ref_lm = _load(a)
        rec = evaluate(lm.model, lm.tokenizer, reference=ref_lm.model, metrics=["ppl", "kl", "size"],
                       max_tokens=512 * a.eval_windows, kl_max_tokens=512 * a.kl_windows, path=out,
                       label=name, progress=False)
        rec["quantize_s"] = t_q
        rec["file"] = file_payload_bytes(out)
        if plan is not None:
            rec["plan"] = {k: v for k, v in plan.to_dict().items() if k != "choice"}
        _write(a.work / (out.name + ".eval.json"), rec)
        _write(out.parent / (out.name + ".json"), rec)
        (out / "eval.json").parent.mkdir(exist_ok=True)
        _write(out / "eval.json", rec)
        print(name, rec["ppl"]["ppl"], rec["kl"]["mean"], rec["file"])
        del lm, ref_lm


RTN_CANDIDATES = ["w2g32-rtn", "w2g64-rtn", "w3-rtn", "w3g128-rtn", "w3g64-rtn", "w3g32-rtn", "w4-rtn",
                  "w4g128-rtn", "w4g64-rtn", "w4g32-rtn", "w8-rtn"]
RTN_PRESETS = ["w3-rtn", "w3g128-rtn", "w3g64-rtn", "w3g32-rtn", "w4-rtn", "w4g128-rtn", "w4g64-rtn", "w4g32-rtn"]


def step_rtn(a) -> None:
    """Data-free candidates only (quantizing takes seconds): the budget mix vs every uniform RTN
    preset, at 3.0/3.5/4.0/4.5 bpw and at each preset's own size, in one process."""
    import copy

    import torch

    from lowbit import api
    from lowbit.budget import load_or_compute, parse_budget, solve
    from lowbit.budget.sizing import file_payload_bytes
    from lowbit.eval import evaluate, evaluate_reference
    from lowbit.eval.kl import KLAccumulator
    from lowbit.eval.report_html import kl_histogram
    from lowbit.models.base import LoadedModel
    from lowbit.recipe import get_recipe
    lm = _load(a)
    toks = _tokens(lm, a.calib)
    t0 = time.perf_counter()
    sens = load_or_compute(lm.model, toks, candidates=RTN_CANDIDATES, fisher_samples=a.fisher,
                           source_dir=lm.path, log=print)
    t_sens = time.perf_counter() - t0
    sens.save(a.work / "sens-rtn.json")
    ev = dict(max_tokens=512 * a.eval_windows, kl_max_tokens=512 * a.kl_windows)
    res_path = a.work / "rtn-results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    base, ref = evaluate_reference(lm.model, lm.tokenizer, metrics=["ppl", "size"], progress=False, **ev)
    results["fp32"] = {"ppl": base["ppl"]["ppl"], "sens_s": t_sens}
    _write(a.work / "fp32.json", base)
    configs = list(a.names) or ([f"budget:{b}bpw" for b in ("3.0", "3.5", "4.0", "4.5")] + RTN_PRESETS)
    for name in configs:
        if name in results and not a.redo:
            continue
        if name.startswith("budget:@"):        # the mix at a preset's own size
            spec = results[name[8:]]["bpw"]
            plan = solve(sens, parse_budget(f"{spec:.6f}bpw"))
        elif name.startswith("budget:"):
            plan = solve(sens, parse_budget(name[7:]))
        else:
            plan = None
        recipe = plan.recipe() if plan else get_recipe(name)
        m = LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.path, lm.source, lm.source_sha256)
        rep = api.quantize(m.model, recipe, progress=False)
        out = a.work / "rtn" / name.replace(":", "-").replace("@", "at-")
        api.export(m, rep, out, "native", overwrite=True,
                   metrics={"budget_plan": plan.to_dict()} if plan else None)
        f = file_payload_bytes(out)
        acc = KLAccumulator(ref)
        rec = evaluate(m.model, m.tokenizer, reference=ref, metrics=["ppl", "kl", "size"], label=out.name,
                       path=out, progress=False, consumers=[acc], **ev)
        rec["kl_histogram"] = kl_histogram(torch.cat(acc.kl))
        rec["file"] = f
        _write(out.parent / f"{out.name}.json", rec)
        lin = sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in rep.layers)
        n = sum(r["shape"][0] * r["shape"][1] for r in rep.layers)
        row = {"ppl": rec["ppl"]["ppl"], "kl": rec["kl"]["mean"], "top1": rec["kl"]["top1_agreement"],
               "file_bytes": f["total_bytes"], "payload_bytes": f["payload_bytes"], "storage_bpw": lin / n}
        # bits per weight as the budget counts them: the quantized linears' bytes in the file * 8 / weights
        row["bpw"] = (f["payload_bytes"] - sens.fixed["tensor_bytes"]) * 8 / sens.weights()
        if plan:
            row.update(predicted_kl=plan.predicted_kl, predicted_payload=plan.linear_bytes + sens.fixed["tensor_bytes"],
                       predicted_total=plan.total_bytes, plan_bpw=plan.bits_per_weight, used=plan.candidates_used)
        results[name] = row
        _write(res_path, results)
        print(name, json.dumps(row))
        del m, rep


GGUF_MIXES = ("q3_k_m", "q4_k_m")


def _blk_linear_bytes(path: Path) -> int:
    """Bytes of a GGUF's decoder-block linears (blk.N.{attn_q,k,v,output,ffn_gate,up,down}.weight)."""
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors
               if t.name.startswith("blk.") and len(t.shape) == 2)


def step_gguf(a) -> None:
    """The budget's GGUF mix against llama.cpp's own Q3_K_M / Q4_K_M at their sizes, both scored by
    llama.cpp's perplexity. Both sides: llama.cpp's block encoders and one imatrix collected by
    lowbit on the same --calib windows; llama.cpp's file from llama_model_quantize on lowbit's F32
    GGUF; ours from the plan (candidates GGUF_CANDIDATES, sensitivity on the same windows) under a
    budget of exactly llama.cpp's block-linear bytes, the token embedding and output in llama.cpp's
    types for that mix (read from its file), so the two files are the same size."""
    import copy

    from lowbit import api
    from lowbit.budget import Budget, load_or_compute, solve
    from lowbit.budget.sizing import file_payload_bytes
    from dataclasses import replace

    from lowbit.calibration.imatrix import Imatrix, collect_imatrix, imatrix_targets
    from lowbit.presets.gguf_mixes import EMBED, HEAD, ggml_scheme
    from lowbit.recipe import Rule
    from lowbit.export.gguf.reader import tensor_types
    from lowbit.export.gguf.writer import write_gguf
    from lowbit.models import LoadedModel, load_model, resolve_source
    sys.path.insert(0, str(HERE))
    from bench_gguf_gptq import peer
    work = a.work / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model(a.model)
    kind, src = resolve_source(a.model)
    source_gguf = src if kind == "gguf" else None
    toks = _tokens(lm, a.calib)
    f32 = work / f"{a.model}-f32.gguf"
    if not f32.is_file():
        write_gguf(lm.model, f32, "f32", hf_dir=lm.path, source_gguf=source_gguf, progress=False)
    im_path = work / f"{a.model}.imatrix.gguf"
    if a.reuse and im_path.is_file():
        im = Imatrix.load(im_path)
    else:
        im = collect_imatrix(lm.model, toks, imatrix_targets(lm.model), dataset="wiki-calibration", progress=False)
        im.save(im_path)
    t0 = time.perf_counter()
    cands = a.candidates.split(",") if a.candidates else None
    sens = load_or_compute(lm.model, toks, fmt="gguf", candidates=cands, fisher_samples=a.fisher,
                           source_dir=lm.path, log=print)
    t_sens = time.perf_counter() - t0
    sens.save(work / f"{a.model}-sens.json")
    res_path = work / f"{a.model}{a.tag}.json"
    memo_path = work / f"{a.model}.ppl-memo.json"      # --reuse: llama.cpp's ppl of a file not changed since
    memo = json.loads(memo_path.read_text()) if a.reuse and memo_path.is_file() else {}

    def ppl(p: Path) -> dict:
        key = f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns} {a.eval_windows}"
        if key not in memo:
            memo[key] = peer("ppl", str(p), "--n-ctx", "512", "--max-windows", str(a.eval_windows),
                             "--threads", str(a.threads))
            _write(memo_path, memo)
        return memo[key]
    res = {"model": a.model, "candidates": sens.candidates, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "calib_windows": a.calib,
           "fisher_windows": a.fisher, "eval_windows": a.eval_windows, "sens_s": round(t_sens, 1),
           "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()), "rows": []}
    base = ppl(f32)
    res["f32_ppl"] = base["ppl"]
    res["llama_cpp_python"] = base.get("llama_cpp_python")
    print(f"F32 (llama.cpp): ppl {base['ppl']:.4f}", flush=True)
    for mix in (a.names or GGUF_MIXES):
        theirs = work / f"{a.model}-{mix}-llamacpp.gguf"
        if not (a.reuse and theirs.is_file()):
            peer("quantize", str(f32), str(theirs), "--ftype", mix.upper(), "--imatrix", str(im_path),
                 "--threads", str(a.threads))
        lin = _blk_linear_bytes(theirs)
        plan = solve(sens, Budget("bpw", 8 * lin / sens.weights(), f"{mix}-size"))
        # the tensors outside the plan (token embedding, output) in llama.cpp's types for this mix,
        # so that the two files match in size and differ only in the blocks' per-tensor choice
        their_types = tensor_types(theirs)
        recipe = plan.recipe(f"budget-{mix}-size")
        outside = {EMBED: their_types["token_embd.weight"].lower()}
        if "output.weight" in their_types:
            outside[HEAD] = their_types["output.weight"].lower()
        recipe = replace(recipe, rules=[r for r in recipe.rules if r.targets not in outside]
                         + [Rule(t, ggml_scheme(ty), "ggml") for t, ty in outside.items()])
        model = copy.deepcopy(lm.model)
        rep = api.quantize(model, recipe, imatrix=im, progress=False)
        rep.imatrix["file"] = str(im_path)
        ours = work / f"{a.model}-budget{a.tag}-at-{mix}.gguf"
        api.export(LoadedModel(model, lm.tokenizer, lm.path, lm.source, lm.source_sha256), rep, ours, "gguf",
                   overwrite=True, source_gguf=source_gguf)
        del model
        pt, po = ppl(theirs), ppl(ours)
        types: dict[str, int] = {}
        for k, v in tensor_types(ours).items():
            if k.startswith("blk.") and "norm" not in k and k.endswith(".weight"):
                types[v] = types.get(v, 0) + 1
        row = {"mix": mix, "llamacpp_bytes": theirs.stat().st_size, "lowbit_bytes": ours.stat().st_size,
               "llamacpp_linear_bytes": lin, "lowbit_linear_bytes": _blk_linear_bytes(ours),
               "plan_linear_bytes": plan.linear_bytes, "bpw": plan.bits_per_weight,
               "llamacpp_ppl": pt["ppl"], "lowbit_ppl": po["ppl"], "predicted_kl": plan.predicted_kl,
               "outside_types": {"token_embd": outside[EMBED], "output": outside.get(HEAD)},
               "lowbit_types": types, "file": file_payload_bytes(ours)}
        row["llamacpp_dppl"], row["lowbit_dppl"] = pt["ppl"] - base["ppl"], po["ppl"] - base["ppl"]
        row["loss_ratio"] = row["lowbit_dppl"] / row["llamacpp_dppl"] if row["llamacpp_dppl"] > 0 else None
        res["rows"].append(row)
        _write(res_path, res)
        print(json.dumps(row), flush=True)
    print(f"\n{a.model}: llama.cpp perplexity, {a.eval_windows} x 512 tokens of wiki-evaluation; F32 {base['ppl']:.4f}\n")
    print("| llama.cpp mix | MiB (theirs / ours) | block-linear bytes (theirs / ours) | llama.cpp ppl | dPPL | "
          "budget mix ppl | dPPL | loss ratio | our types |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in res["rows"]:
        ratio = f"{r['loss_ratio']:.2f}" if r["loss_ratio"] is not None else "-"
        ty = ", ".join(f"{k} x{v}" for k, v in sorted(r["lowbit_types"].items()))
        print(f"| {r['mix']} | {r['llamacpp_bytes'] / 2**20:.2f} / {r['lowbit_bytes'] / 2**20:.2f} | "
              f"{r['llamacpp_linear_bytes']:,} / {r['lowbit_linear_bytes']:,} | {r['llamacpp_ppl']:.4f} | "
              f"{r['llamacpp_dppl']:+.4f} | {r['lowbit_ppl']:.4f} | {r['lowbit_dppl']:+.4f} | {ratio} | {ty} |")


def step_rtntable(a) -> None:
    """Markdown rows of rtn-results.json: each budget mix next to the uniform presets at or below
    its size (and the nearest above)."""
    res = json.loads((a.work / "rtn-results.json").read_text())
    base = res["fp32"]["ppl"]
    rows = sorted(((k, v) for k, v in res.items() if k != "fp32"), key=lambda kv: kv[1]["bpw"])
    print("| config | bits/weight (file) | file bytes | ppl | dPPL | KL | top-1 | predicted KL | payload = predicted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, v in rows:
        pk = f"{v['predicted_kl']:.4f}" if "predicted_kl" in v else "-"
        eq = ("yes" if v["payload_bytes"] == v["predicted_payload"] else "NO") if "predicted_payload" in v else "-"
        print(f"| {'**' + k + '**' if k.startswith('budget') else k} | {v['bpw']:.3f} | {v['file_bytes']:,} | "
              f"{v['ppl']:.2f} | {v['ppl'] - base:+.2f} | {v['kl']:.4f} | {100 * v['top1']:.1f}% | {pk} | {eq} |")


def step_table(a) -> None:
    rows = []
    base = None
    for f in sorted(a.work.glob("*/eval.json")):
        r = json.loads(f.read_text())
        rows.append(r)
    ref = json.loads((a.work / "fp32.json").read_text())["ppl"]["ppl"] if (a.work / "fp32.json").is_file() else None
    print("| config | linear bpw (file) | file MB | ppl | dPPL | KL | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["size"]["linear_bits_per_weight"]):
        plan = r.get("plan") or {}
        bpw = plan.get("bits_per_weight") or r["size"]["linear_bits_per_weight"]
        d = f"{r['ppl']['ppl'] - ref:+.3f}" if ref else "-"
        print(f"| {r['label']} | {bpw:.3f} | {r['file']['total_bytes'] / 1e6:.2f} | {r['ppl']['ppl']:.3f} | {d} | "
              f"{r['kl']['mean']:.4f} | {100 * r['kl']['top1_agreement']:.1f}% |")
    del base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("sens", "measure", "run", "rtn", "rtntable", "table", "gguf"))
    ap.add_argument("names", nargs="*")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "budget")
    ap.add_argument("--calib", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--fisher", type=int, default=8, help="windows for the output-gradient pass")
    ap.add_argument("--gptq", default="w4g128-gptq-actorder-mse", help="the GPTQ run the pass is timed against")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--kl-calib", type=int, default=2, help="calibration windows for measured single-module KL")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--kl-windows", type=int, default=8)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--model", default="smollm2-135m",
                    help="the model of every step (smollm2-135m, qwen2.5-coder-1.5b: give it a --work of its own)")
    ap.add_argument("--threads", type=int, default=2, help="gguf step: llama.cpp's threads")
    ap.add_argument("--candidates", help="gguf step: comma-separated gguf-<type> candidates (default GGUF_CANDIDATES)")
    ap.add_argument("--tag", default="", help="gguf step: suffix of the results file (one per candidate set)")
    ap.add_argument("--reuse", action="store_true",
                    help="gguf step: reuse the imatrix, llama.cpp's files and the ppl of files unchanged since")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    {"sens": step_sens, "measure": step_measure, "run": step_run, "rtn": step_rtn, "rtntable": step_rtntable, "table": step_table,
     "gguf": step_gguf}[a.step](a)


if __name__ == "__main__":
    main()
