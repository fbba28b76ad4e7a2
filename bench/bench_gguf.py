"""GGUF presets vs llama.cpp: size, bits/weight and perplexity of every preset, with and without an
importance matrix; llama.cpp's own quantizer and llama.cpp's own perplexity as the references.

    .venv/bin/python bench/bench_gguf.py [--model smollm2-135m] [--windows 12] [--imatrix-chunks 64]
        [--llamacpp-python bench/.venv-llamacpp/bin/python] [--quick]

Steps (files under bench/_work/gguf/, results in bench/_work/gguf/results.json, markdown on stdout):
  1. the float model (the bundled GGUF dequantized) and its perplexity on the first --windows
     non-overlapping 512-token windows of wiki-evaluation (lowbit's tokenizer);
  2. an imatrix collected by lowbit on --imatrix-chunks windows of wiki-calibration;
  3. for every preset x {no imatrix, imatrix}: lowbit's GGUF -> size, bits/weight, perplexity
     (file read back with lowbit.export.gguf.reader, fp32 torch forward; "ours");
  4. llama.cpp's own quantizer (llama_model_quantize) on an F32 GGUF written by lowbit, same preset,
     same imatrix -> compared tensor by tensor with ours (bytes), evaluated the same way;
  5. llama.cpp's perplexity (bench/peers/llamacpp_ids_ppl.py) of our files on the same token windows
     -> agreement with our evaluation of the same file, and with our evaluation with ggml's CPU
     activation rounding simulated (VEC_DOT): what remains is accumulation order.
Perplexity: exp(mean NLL) of every token after the first in each window, no BOS; NLL from the
float64 log-softmax of the logits (the same convention in both evaluators).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work" / "gguf"


def window_nll(model, windows: torch.Tensor) -> list[float]:
    """Mean NLL (nats) per window of tokens 1..L-1."""
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0, :-1].double()
            nll = torch.logsumexp(logits, -1) - logits.gather(1, w[1:, None])[:, 0]
            if not torch.isfinite(nll).all():
                raise SystemExit("bench_gguf: non-finite NLL")
            out.append(float(nll.mean()))
    return out


def ppl_of_file(path: Path, windows: torch.Tensor) -> tuple[float, list[float]]:
    from lowbit.export.gguf.reader import load_gguf
    model, _, _ = load_gguf(path)
    nll = window_nll(model, windows)
    del model
    return float(np.exp(np.mean(nll))), nll


# ggml's CPU matmul quantizes the activations to the weight type's vec_dot partner before the dot
# product (ggml-cpu type traits: Q4_0/Q5_0/Q8_0 -> Q8_0, Q4_1/Q5_1 -> Q8_1, k-quants and TQ -> Q8_K);
# F32 weights see F32 activations. Simulating that rounding in our torch forward tells whether a
# gap between llama.cpp's perplexity and ours is that rounding (and nothing in the file).
VEC_DOT = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
           "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
           "TQ1_0": "Q8_K", "TQ2_0": "Q8_K"}


def ggml_round_activations(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x rounded as ggml's quantize_row_q8_0 / q8_1 (blocks of 32, d = amax/127 stored fp16) or
    quantize_row_q8_K (blocks of 256, d = max/-127 kept fp32, codes clamped to 127) round it."""
    block = 256 if kind == "Q8_K" else 32
    xs = x.float().reshape(*x.shape[:-1], -1, block)
    if kind == "Q8_K":
        mx = xs.gather(-1, xs.abs().argmax(-1, keepdim=True))
        iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
        q = torch.round(iscale * xs).clamp(max=127)
        d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    else:
        amax = xs.abs().amax(-1, keepdim=True)        # x86 quantize_row_q8_0: id = 127 / amax
        q = torch.round(xs * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
        d = (amax / 127.0).half().float()
    return (q * d).reshape(x.shape).to(x.dtype)


def ppl_ggml_numerics(path: Path, windows: torch.Tensor) -> float:
    """Our perplexity of a GGUF with every quantized matmul's input rounded as ggml's CPU backend
    rounds it (see VEC_DOT)."""
    from lowbit.arch.gguf_names import NameMap, arch_spec
    from lowbit.export.gguf.reader import load_gguf, tensor_types
    model, _, _ = load_gguf(path)
    types = tensor_types(path)
    names = NameMap(arch_spec(model.config.model_type).gguf_arch, int(model.config.num_hidden_layers))
    hooks = []
    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        gname = "token_embd.weight" if mname == "lm_head" and "output.weight" not in types else \
            names.to_gguf(f"{mname}.weight")
        kind = VEC_DOT.get(types[gname])
        if kind:
            hooks.append(mod.register_forward_pre_hook(lambda _m, a, k=kind: (ggml_round_activations(a[0], k),)))
    nll = window_nll(model, windows)
    for h in hooks:
        h.remove()
    return float(np.exp(np.mean(nll)))


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors whose type and bytes are identical, total)."""
    import gguf
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    tb = {t.name: t for t in rb.tensors}
    same = sum(1 for t in ra.tensors if t.name in tb and t.tensor_type == tb[t.name].tensor_type
               and np.array_equal(np.asarray(t.data), np.asarray(tb[t.name].data)))
    return same, len(ra.tensors)


def peer(py: str, script: str, *args: str) -> dict:
    r = subprocess.run([py, str(ROOT / "bench" / "peers" / script), *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench_gguf: {script} failed:\n{r.stderr[-2000:]}")
    out = r.stdout.strip()
    return json.loads(out[out.rfind("\n{") + 1:] if not out.startswith("{") else out)


def agree_llamacpp(a, res: dict, name: str, path: Path, ppl: float, nll: list[float]) -> None:
    """llama.cpp's perplexity of one of our files on the same windows, next to ours."""
    r = peer(a.llamacpp_python, "llamacpp_ids_ppl.py", str(path), str(WORK / "windows.npy"),
             "--threads", str(a.threads))
    sim = ppl_ggml_numerics(path, torch.from_numpy(np.load(WORK / "windows.npy")))
    agree = {"file": name, "ours_ppl": ppl, "llamacpp_ppl": r["ppl"], "rel_diff": r["ppl"] / ppl - 1.0,
             "max_window_nll_diff": float(np.max(np.abs(np.array(r["window_mean_nll"]) - np.array(nll)))),
             "ours_ggml_rounding_ppl": sim, "rel_diff_ggml_rounding": r["ppl"] / sim - 1.0}
    res["llamacpp_ppl"].append(agree)
    print(json.dumps(agree), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--imatrix-chunks", type=int, default=64)
    ap.add_argument("--presets", default="q8_0,q6_k,q5_k_m,q4_k_m,q4_k_s,q3_k_m,q2_k")
    ap.add_argument("--llamacpp-python", default=str(ROOT / "bench" / ".venv-llamacpp" / "bin" / "python"))
    ap.add_argument("--llamacpp-ppl", default="f32,q8_0,q4_k_m,q4_k_m+imatrix+refine,q2_k+imatrix+refine",
                    help="our files to evaluate with llama.cpp too (preset or preset+imatrix)")
    ap.add_argument("--refine", default="q8_0,q6_k,q5_k_m,q4_k_m,q4_k_s,q3_k_m,q2_k",
                    help="presets also written with lowbit's refinement (imatrix + refine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 windows, 8 imatrix chunks, q8_0 and q4_k_m only")
    a = ap.parse_args(argv)
    if a.quick:
        a.windows, a.imatrix_chunks, a.presets, a.llamacpp_ppl = 2, 8, "q8_0,q4_k_m", "f32,q4_k_m+imatrix"
        a.refine = "q4_k_m"
    torch.set_num_threads(a.threads)
    from lowbit.data.text import load_text, tokenize_text, token_windows
    from lowbit.calibration.imatrix import compute_imatrix
    from lowbit.export.gguf.writer import write_gguf
    from lowbit.models import load_model
    from lowbit.models.load import resolve_source

    WORK.mkdir(parents=True, exist_ok=True)
    tag = f"{a.model}"
    loaded = load_model(a.model)
    kind, src = resolve_source(a.model)
    source_gguf = src if kind == "gguf" else None
    windows = token_windows(tokenize_text(loaded.tokenizer, load_text("wiki-evaluation")), 512, a.windows)
    np.save(WORK / "windows.npy", windows.numpy())
    res: dict = {"model": a.model, "windows": a.windows, "seq_len": 512, "tokens_scored": a.windows * 511,
                 "date": time.strftime("%Y-%m-%d"), "rows": [], "llamacpp_ppl": []}
    t0 = time.perf_counter()
    base_nll = window_nll(loaded.model, windows)
    res["float_ppl"] = float(np.exp(np.mean(base_nll)))
    print(f"float model: ppl {res['float_ppl']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    im_path = WORK / f"{tag}.imatrix.gguf"
    im = compute_imatrix(loaded, "wiki-calibration", a.imatrix_chunks, 512, seed=0, progress=False)
    im.save(im_path)
    res["imatrix"] = {"chunks": a.imatrix_chunks, "tokens": max(im.counts.values()), "file": str(im_path)}
    f32_path = WORK / f"{tag}-f32.gguf"
    write_gguf(loaded.model, f32_path, "f32", hf_dir=loaded.path, source_gguf=source_gguf, progress=False)
    have_llamacpp = Path(a.llamacpp_python).is_file()
    if have_llamacpp and "f32" in a.llamacpp_ppl.split(","):
        agree_llamacpp(a, res, "f32", f32_path, res["float_ppl"], base_nll)

    for preset in a.presets.split(","):
        for use_im, refine in ((False, False), (True, False), (True, True)):
            if refine and preset not in a.refine.split(","):
                continue
            name = f"{preset}{'+imatrix' if use_im else ''}{'+refine' if refine else ''}"
            ours = WORK / f"{tag}-{name.replace('+', '-')}.gguf"
            t1 = time.perf_counter()
            rep = write_gguf(loaded.model, ours, preset, hf_dir=loaded.path, source_gguf=source_gguf,
                             imatrix=im if use_im else None, imatrix_file=str(im_path), refine=refine,
                             progress=False)
            t_write = time.perf_counter() - t1
            ppl, nll = ppl_of_file(ours, windows)
            row = {"preset": name, "bytes": rep.file_bytes, "bpw": rep.bits_per_weight, "ppl": ppl,
                   "dppl": ppl - res["float_ppl"], "fallbacks": len(rep.fallbacks), "write_s": round(t_write, 1),
                   "types": rep.type_counts()}
            if have_llamacpp and not refine:
                theirs = WORK / f"{tag}-{name.replace('+', '-')}-llamacpp.gguf"
                q = ["quantize", str(f32_path), str(theirs), "--ftype", preset.upper(), "--threads", str(a.threads)]
                if use_im:
                    q += ["--imatrix", str(im_path)]
                peer(a.llamacpp_python, "llamacpp_ref.py", *q)
                same, total = same_tensors(ours, theirs)
                row["llamacpp_same_tensors"] = f"{same}/{total}"
                row["llamacpp_bytes"] = theirs.stat().st_size
                row["llamacpp_ppl"] = ppl if same == total else ppl_of_file(theirs, windows)[0]
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            if have_llamacpp and name in a.llamacpp_ppl.split(","):
                agree_llamacpp(a, res, name, ours, ppl, nll)
            (WORK / "results.json").write_text(json.dumps(res, indent=1))
    for p in WORK.glob(f"{tag}-*.gguf"):
        if not os.environ.get("BENCH_GGUF_KEEP"):
            p.unlink()
    print_markdown(res)


def print_markdown(res: dict) -> None:
    print(f"\nfloat model ppl {res['float_ppl']:.3f} ({res['windows']} x 512 tokens of wiki-evaluation)\n")
    print("| preset | size MiB | bits/weight | ppl | dPPL | llama.cpp own: same tensors | llama.cpp own ppl |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        theirs = f"{r['llamacpp_ppl']:.3f}" if "llamacpp_ppl" in r else "-"
        print(f"| {r['preset']} | {r['bytes'] / 2**20:.1f} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['dppl']:+.3f} | "
              f"{r.get('llamacpp_same_tensors', '-')} | {theirs} |")
    if res["llamacpp_ppl"]:
        print("\n| our file | our eval ppl | llama.cpp ppl | rel. diff | max per-window NLL diff | "
              "ours with ggml's activation rounding | rel. diff to that |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in res["llamacpp_ppl"]:
            print(f"| {r['file']} | {r['ours_ppl']:.4f} | {r['llamacpp_ppl']:.4f} | {r['rel_diff']:+.4%} | "
                  f"{r['max_window_nll_diff']:.4f} | {r['ours_ggml_rounding_ppl']:.4f} | "
                  f"{r['rel_diff_ggml_rounding']:+.4%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
