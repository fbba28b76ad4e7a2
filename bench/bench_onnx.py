"""onnxruntime on our ONNX export vs lowbit's own packed kernels, same quantized model, same machine.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_onnx.py --recipe w4g64-rtn --threads 2 \
        --pp 128 --tg 64 --repeats 3 [--json out.json] [--markdown]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_onnx.py --kernels   # one MatMulNBits node per scheme

One process: the bundled model is quantized once (--recipe), exported with lowbit.export.onnx
(MatMulNBits), then served two ways:
    lowbit     lowbit.nn.prepare.prepare_for_inference (PackedLinear, the fastest kernel here)
               + lowbit.nn.decode.generate (HF forward, DynamicCache, greedy), torch threads = --threads
    onnxruntime  lowbit.export.onnx.OnnxRunner: CPU execution provider, intra_op_num_threads =
               --threads, inter_op 1, sequential, ORT_ENABLE_ALL; spinning off when
               OMP_WAIT_POLICY=PASSIVE (as torch's libgomp then)
prefill tok/s = --pp prompt tokens in one forward into an empty cache; decode tok/s = --tg greedy
tokens after a 16-token prompt (EOS ignored), each a cached single-token step. The ONNX graph
returns logits for every position (as onnxruntime-genai's models do), while generate() asks HF for
the last position only (logits_to_keep=1); so lowbit's prefill is also timed with all positions'
logits ("lowbit prefill, all logits"), the like-for-like figure. Variants alternate within each
repeat (one warm-up each first); figures are medians over --repeats; ratios from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def cpu_model() -> str:
    from lowbit.eval.report import _cpu_name
    return _cpu_name() or "unknown"


def kernel_calls(threads: int, calls: int = 300) -> int:
    """Microseconds per onnxruntime call of one MatMulNBits node, 1536 x 576 (SmolLM2's gate_proj),
    one activation row, for the schemes our export writes; median of 5 rounds of `calls`."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.export.onnx import pack_matmul_nbits
    from lowbit.numerics import int_scheme
    from lowbit.numerics.qweight import quantize_weight
    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    rows = []
    for sch in (int_scheme(4, 64), int_scheme(4, 128), int_scheme(4, 32, symmetric=True), int_scheme(2, 64),
                int_scheme(8, 128, symmetric=True), int_scheme(8, None, symmetric=True)):
        p = pack_matmul_nbits(quantize_weight(w, sch))
        inits = [numpy_helper.from_array(p["B"], "B"), numpy_helper.from_array(p["scales"], "s")]
        ins = ["A", "B", "s"]
        if p["zero_points"] is not None:
            inits.append(numpy_helper.from_array(p["zero_points"], "z"))
            ins.append("z")
        node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=576, N=1536,
                                bits=p["bits"], block_size=p["block_size"])
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 576])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 1536])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning",
                                    "0" if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else "1")
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        a = {"A": np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)}
        for _ in range(30):
            sess.run(None, a)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(calls):
                sess.run(None, a)
            times.append((time.perf_counter() - t) / calls * 1e6)
        rows.append((sch.short_name(), p["bits"], p["block_size"], statistics.median(times)))
    print("| scheme | bits | block_size | us / call |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} |")
    print(f"threads {threads}, load avg {os.getloadavg()[0]:.1f}, {cpu_model()}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="w4g64-rtn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=128, help="prompt tokens for the prefill figure")
    ap.add_argument("--tg", type=int, default=64, help="generated tokens for the decode figure")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true", help="print a BENCHMARKS.md table")
    ap.add_argument("--kernels", action="store_true",
                    help="only time single MatMulNBits nodes (gate_proj's 1536 x 576, batch 1) per scheme")
    args = ap.parse_args(argv)
    if args.kernels:
        return kernel_calls(args.threads)

    import torch
    from transformers import DynamicCache

    from lowbit import api
    from lowbit.export import QuantizedModel, get_format
    from lowbit.export.onnx import OnnxRunner
    from lowbit.models import load_model
    from lowbit.nn.decode import generate
    from lowbit.nn.prepare import prepare_for_inference

    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    rep = api.quantize(lm.model, args.recipe, progress=False)
    qm = QuantizedModel.from_report(lm, rep)
    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    t0 = time.perf_counter()
    out = get_format("onnx").write(qm, tmp / "m")
    export_s = time.perf_counter() - t0
    runner = OnnxRunner(out, threads=args.threads)
    backends = prepare_for_inference(lm.model)["backends"]
    model = lm.model

    text = (ROOT / "src/lowbit/data/text/enwiki_evaluation.txt").read_text()
    ids = lm.tokenizer(text[:20000], return_tensors="pt").input_ids
    pp_ids, tg_ids = ids[:, :args.pp], ids[:, :16]

    @torch.inference_mode()
    def lowbit_prefill_all() -> float:
        t = time.perf_counter()
        model(input_ids=pp_ids, past_key_values=DynamicCache(), use_cache=True)
        return args.pp / (time.perf_counter() - t)

    def lowbit_prefill() -> float:
        return generate(model, pp_ids, 1).prompt_tokens_per_s

    def lowbit_decode() -> tuple[float, list]:
        r = generate(model, tg_ids, args.tg, min_new_tokens=args.tg)
        return r.decode_tokens_per_s, r.tokens

    def ort_prefill() -> float:
        return runner.generate(pp_ids, 1).prompt_tokens_per_s

    def ort_decode() -> tuple[float, list]:
        r = runner.generate(tg_ids, args.tg)
        return r.decode_tokens_per_s, r.tokens

    runs = {"lowbit_prefill": lowbit_prefill, "lowbit_prefill_all_logits": lowbit_prefill_all,
            "ort_prefill": ort_prefill}
    res: dict[str, list[float]] = {k: [] for k in list(runs) + ["lowbit_decode", "ort_decode"]}
    toks = {}
    for rep_i in range(args.repeats + 1):          # repeat 0 is the warm-up, dropped
        for k, fn in runs.items():
            v = fn()
            if rep_i:
                res[k].append(v)
        for k, fn in (("lowbit_decode", lowbit_decode), ("ort_decode", ort_decode)):
            v, t = fn()
            toks[k] = t
            if rep_i:
                res[k].append(v)
    med = {k: statistics.median(v) for k, v in res.items()}
    agree = sum(a == b for a, b in zip(toks["lowbit_decode"], toks["ort_decode"])) / args.tg
    import onnxruntime
    record = {"recipe": args.recipe, "threads": args.threads, "pp": args.pp, "tg": args.tg,
              "repeats": args.repeats, "medians_tok_s": med, "runs_tok_s": res,
              "ratio_ort_over_lowbit": {"prefill_all_logits": med["ort_prefill"] / med["lowbit_prefill_all_logits"],
                                        "prefill_vs_last_logit": med["ort_prefill"] / med["lowbit_prefill"],
                                        "decode": med["ort_decode"] / med["lowbit_decode"]},
              "greedy_tokens_equal_fraction": agree, "lowbit_backends": backends,
              "export_seconds": round(export_s, 2),
              "onnx_bytes": sum(f.stat().st_size for f in Path(out).iterdir() if f.name.startswith("model.onnx")),
              "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "cpu": cpu_model(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg_1m": os.getloadavg()[0],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if args.markdown:
        r = record["ratio_ort_over_lowbit"]
        print(f"\n| what | lowbit (packed kernels) | onnxruntime (MatMulNBits) | ort / lowbit |\n|---|---|---|---|\n"
              f"| prefill {args.pp} tok, all logits, tok/s | {med['lowbit_prefill_all_logits']:.1f} | "
              f"{med['ort_prefill']:.1f} | {r['prefill_all_logits']:.2f} |\n"
              f"| prefill {args.pp} tok, last logit only (lowbit), tok/s | {med['lowbit_prefill']:.1f} | "
              f"{med['ort_prefill']:.1f} | {r['prefill_vs_last_logit']:.2f} |\n"
              f"| decode {args.tg} tok after 16, tok/s | {med['lowbit_decode']:.1f} | {med['ort_decode']:.1f} | "
              f"{r['decode']:.2f} |")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
