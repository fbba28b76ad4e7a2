"""Run an ONNX causal LM with onnxruntime on CPU, and check onnxruntime's MatMulNBits conventions.

Runs in bench/.venv-ort (onnxruntime + onnx + numpy):

    P=bench/.venv-ort/bin/python
    $P bench/peers/ort_run.py run MODEL.onnx --ids ids.npy --out-logits logits.npy \
        [--json run.json] [--threads 2] [--runs 3]
    $P bench/peers/ort_run.py selfcheck [--json matmulnbits.json]
    $P bench/peers/ort_run.py tiny-lm tiny.onnx [--vocab 256 --hidden 128]   # a 2-op LM to try `run` on

run: feeds `ids` ((seq,) or (batch, seq) integers) to the graph input named input_ids (cast to
the input's declared integer type); an `attention_mask` input gets ones and a `position_ids` input
gets 0..seq-1; any other required input is an error naming it (past key/values are not fed: export
without cache). The output named `logits` (else the first output) is saved as float32. One
warm-up, then the median of --runs timed runs; the JSON has versions, inputs/outputs, the
MatMulNBits nodes found (count, their K/N/bits/block_size/accuracy_level) and the timings.

selfcheck: builds one-node graphs com.microsoft.MatMulNBits on the fly with onnx.helper and
compares onnxruntime's output with a numpy dequantize-then-matmul reference written from the
operator's schema text (printed in the JSON), so the exact input conventions are pinned to this
onnxruntime version:
    B            uint8 (N, k_blocks, blob_size), k_blocks = ceil(K / block_size),
                 blob_size = block_size * bits / 8; within a byte element 2j is the low nibble,
                 2j+1 the high nibble (4 bits); K is zero-padded up to k_blocks * block_size
    scales       (N, k_blocks) or flat (N * k_blocks,), same dtype as A
    zero_points  packed uint8 (N, ceil(k_blocks * bits / 8)), same nibble order as B; or
                 unpacked, same dtype as A, (N, k_blocks); absent -> 2^(bits-1)
    W[n, k] = (q[n, k] - zp[n, k // block_size]) * scale[n, k // block_size];  Y = A @ W^T
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


# ---------------------------------------------------------------- packing (numpy reference)
def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (..., L) into uint8 (..., L*bits/8), element 0 in the lowest bits.

    byte j (4 bits):  [ hi nibble = code 2j+1 | lo nibble = code 2j ]
    """
    per = 8 // bits
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint8)


def quantize_blocks(w: np.ndarray, bits: int, block: int, sym: bool, rng=None):
    """RTN of w (N, K) per (row, block of K): codes (N, k_blocks*block), scales, zero points (N, k_blocks)."""
    n, k = w.shape
    kb = -(-k // block)
    wp = np.zeros((n, kb * block), np.float32)
    wp[:, :k] = w
    g = wp.reshape(n, kb, block)
    qmax = (1 << bits) - 1
    if sym:
        amax = np.abs(g).max(-1)
        scale = np.where(amax > 0, amax / (1 << (bits - 1)), 1.0).astype(np.float32)
        zp = np.full((n, kb), 1 << (bits - 1), np.int64)
    else:
        lo, hi = g.min(-1), g.max(-1)
        scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
        zp = np.clip(np.round(-lo / scale), 0, qmax).astype(np.int64)
    q = np.clip(np.round(g / scale[..., None]) + zp[..., None], 0, qmax).astype(np.int64)
    return q.reshape(n, kb * block), scale, zp


def dequant_ref(q, scale, zp, k, block):
    n = q.shape[0]
    kb = scale.shape[1]
    w = (q.reshape(n, kb, block) - zp[..., None]) * scale[..., None].astype(np.float64)
    return w.reshape(n, kb * block)[:, :k]


# ---------------------------------------------------------------- selfcheck
def _one_node_model(k, n, bits, block, inits, zp_kind, a_type, accuracy_level=0):
    from onnx import TensorProto, helper, numpy_helper
    inputs = ["A", "B", "scales"]
    if zp_kind != "none":
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    elem = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[a_type]
    graph = helper.make_graph([node], "mnb", [helper.make_tensor_value_info("A", elem, ["M", k])],
                              [helper.make_tensor_value_info("Y", elem, ["M", n])],
                              initializer=[numpy_helper.from_array(v, name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def selfcheck(args) -> dict:
    import onnx
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as C
    rng = np.random.default_rng(0)
    schema = next(s for s in C.get_all_operator_schema() if s.name == "MatMulNBits" and s.domain == "com.microsoft")
    out = {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
           "schema": {"since_version": schema.since_version,
                      "inputs": [{"name": i.name, "type": i.typeStr, "optional": "Optional" in str(i.option),
                                  "description": i.description} for i in schema.inputs],
                      "attributes": {k: {"required": a.required, "description": a.description}
                                     for k, a in schema.attributes.items()},
                      "type_constraints": {t.type_param_str: list(t.allowed_type_strs) for t in schema.type_constraints}},
           "cases": []}
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    cases = [  # (name, K, N, block, sym, zp_kind, scales_shape, a_type, accuracy_level[, bits])
        ("K576 N96 b32 sym, no zero_points (default 8), scales (N,kb)", 576, 96, 32, True, "none", "2d", np.float32, 0),
        ("K576 N96 b32 sym, scales flat (N*kb,)", 576, 96, 32, True, "none", "flat", np.float32, 0),
        ("K576 N96 b32 asym, packed uint8 zero_points (N, ceil(kb*4/8))", 576, 96, 32, False, "packed", "2d", np.float32, 0),
        ("K576 N96 b32 asym, packed zp, scales flat", 576, 96, 32, False, "packed", "flat", np.float32, 0),
        ("K576 N96 b32 asym, unpacked float zero_points (N,kb)", 576, 96, 32, False, "float", "2d", np.float32, 0),
        ("K1536 N64 b64 asym packed zp (ffn_down's K, kb=24)", 1536, 64, 64, False, "packed", "2d", np.float32, 0),
        ("K576 N96 b64 asym packed zp, kb=9 odd -> zp row ceil(9/2)=5 bytes", 576, 96, 64, False, "packed", "2d", np.float32, 0),
        ("K80 N16 b32: K not a multiple of block (B padded to 96; pad codes random, must be ignored)", 80, 16, 32, False, "packed", "2d", np.float32, 0),
        ("K576 N96 b32 asym packed zp, A/scales float16", 576, 96, 32, False, "packed", "2d", np.float16, 0),
        ("K576 N96 b32 asym packed zp, accuracy_level 4 (int8 A)", 576, 96, 32, False, "packed", "2d", np.float32, 4),
        ("bits=8 K576 N96 b32 asym packed zp (N, kb)", 576, 96, 32, False, "packed", "2d", np.float32, 0, 8),
        ("bits=2 K576 N96 b32 asym packed zp (N, ceil(kb/4))", 576, 96, 32, False, "packed", "2d", np.float32, 0, 2),
    ]
    for name, k, n, block, sym, zp_kind, sshape, a_type, acc, *more in cases:
        bits = more[0] if more else 4
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        q, scale, zp = quantize_blocks(w, bits, block, sym)
        kb = scale.shape[1]
        q[:, k:] = rng.integers(0, 1 << bits, size=q[:, k:].shape)  # padding past K: must not matter
        b = pack_low_first(q.reshape(n, kb, block), bits)           # (N, kb, blob)
        inits = {"B": b, "scales": (scale if sshape == "2d" else scale.reshape(-1)).astype(a_type)}
        if zp_kind == "packed":
            per = 8 // bits
            zpad = np.zeros((n, -(-kb // per) * per), np.int64)
            zpad[:, :kb] = zp
            inits["zero_points"] = pack_low_first(zpad, bits)      # (N, ceil(kb*bits/8))
        elif zp_kind == "float":
            inits["zero_points"] = zp.astype(a_type)
        a = rng.standard_normal((5, k)).astype(a_type)
        case = {"case": name, "K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": acc,
                "A": str(np.dtype(a_type)), "shapes": {kk: list(v.shape) for kk, v in inits.items()},
                "dtypes": {kk: str(v.dtype) for kk, v in inits.items()}}
        try:
            sess = ort.InferenceSession(_one_node_model(k, n, bits, block, inits, zp_kind, a_type, acc),
                                        so, providers=["CPUExecutionProvider"])
            y = sess.run(None, {"A": a})[0].astype(np.float64)
            ref = a.astype(np.float64) @ dequant_ref(q, scale.astype(a_type).astype(np.float64), zp, k, block).T
            err = np.abs(y - ref).max()
            rel = err / np.abs(ref).max()
            tol = {np.float32: 1e-4, np.float16: 2e-2}[a_type] if acc == 0 else 3e-2
            case.update(ok=bool(rel < tol), max_abs_err=float(err), max_rel_err=float(rel), tol_rel=tol)
        except Exception as e:  # a layout this onnxruntime refuses: the finding
            case.update(ok=False, error=f"{type(e).__name__}: {e}"[:600])
        out["cases"].append(case)
    # the high/low nibble order matters: swapping nibbles of B must break the match
    k, n, block, bits = 576, 96, 32, 4
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, scale, zp = quantize_blocks(w, bits, block, True)
    b = pack_low_first(q.reshape(n, k // block, block), bits)
    swapped = ((b >> 4) | (b << 4)).astype(np.uint8)
    sess = ort.InferenceSession(_one_node_model(k, n, bits, block, {"B": swapped, "scales": scale}, "none", np.float32),
                                so, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((3, k)).astype(np.float32)
    ref = a @ dequant_ref(q, scale, zp, k, block).T
    rel = float(np.abs(sess.run(None, {"A": a})[0] - ref).max() / np.abs(ref).max())
    out["nibble_order_negative_control"] = {"what": "B with nibbles swapped (high-first) must not match",
                                            "max_rel_err": rel, "ok": rel > 0.05}
    out["ok"] = all(c["ok"] for c in out["cases"]) and out["nibble_order_negative_control"]["ok"]
    return out


# ---------------------------------------------------------------- tiny LM (to exercise `run`)
def tiny_lm(args) -> dict:
    """input_ids -> Gather(embedding) -> MatMulNBits(hidden -> vocab, 4-bit, block 32) -> logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    v, h, block, bits = args.vocab, args.hidden, 32, 4
    emb = rng.standard_normal((v, h)).astype(np.float32)
    q, scale, zp = quantize_blocks(rng.standard_normal((v, h)).astype(np.float32) * 0.1, bits, block, False)
    kb = scale.shape[1]
    zpad = np.zeros((v, -(-kb // 2) * 2), np.int64)
    zpad[:, :kb] = zp
    inits = [numpy_helper.from_array(emb, "embed"), numpy_helper.from_array(pack_low_first(q.reshape(v, kb, block), bits), "B"),
             numpy_helper.from_array(scale, "scales"), numpy_helper.from_array(pack_low_first(zpad, bits), "zero_points")]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["hidden"], axis=0),
             helper.make_node("MatMulNBits", ["hidden", "B", "scales", "zero_points"], ["logits"], domain="com.microsoft",
                              K=h, N=v, bits=bits, block_size=block)]
    graph = helper.make_graph(nodes, "tiny_lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", v])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    tmp = args.out + f".tmp{os.getpid()}"
    onnx.save(model, tmp)
    os.replace(tmp, args.out)
    w = dequant_ref(q, scale.astype(np.float64), zp, h, block)
    ids = rng.integers(0, v, size=(1, 16))
    np.save(args.out + ".ids.npy", ids)
    np.save(args.out + ".expected_logits.npy", (emb[ids].astype(np.float64) @ w.T).astype(np.float32))
    return {"model": os.path.abspath(args.out), "vocab": v, "hidden": h, "ids": args.out + ".ids.npy",
            "expected_logits": args.out + ".expected_logits.npy (numpy reference)"}


# ---------------------------------------------------------------- run
def run(args) -> dict:
    import onnx
    import onnxruntime as ort
    ids = np.load(args.ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise SystemExit(f"{args.ids}: expected integer token ids (seq,) or (batch, seq), got {ids.dtype} {ids.shape}")
    proto = onnx.load(args.model, load_external_data=False)
    nodes = [nd for nd in proto.graph.node if nd.op_type == "MatMulNBits"]
    attrs = sorted({tuple((a.name, a.i) for a in nd.attribute if a.name in ("K", "N", "bits", "block_size",
                                                                             "accuracy_level")) for nd in nodes})
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    np_int = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
    feed = {}
    for inp in sess.get_inputs():
        if inp.name in ("input_ids", "attention_mask", "position_ids"):
            dt = np_int.get(inp.type)
            if dt is None:
                raise SystemExit(f"{args.model}: input {inp.name!r} has type {inp.type}, expected int64/int32")
            if inp.name == "input_ids":
                feed[inp.name] = ids.astype(dt)
            elif inp.name == "attention_mask":
                feed[inp.name] = np.ones_like(ids, dtype=dt)
            else:
                feed[inp.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=dt), ids.shape).copy()
        else:
            raise SystemExit(f"{args.model}: required input {inp.name!r} ({inp.type}, {inp.shape}) is not one this "
                             "script feeds (input_ids, attention_mask, position_ids); export without KV cache")
    if "input_ids" not in feed:
        raise SystemExit(f"{args.model}: no graph input named 'input_ids' (inputs: {[i.name for i in sess.get_inputs()]})")
    outs = [o.name for o in sess.get_outputs()]
    name = "logits" if "logits" in outs else outs[0]
    sess.run([name], feed)  # warm-up
    times, logits = [], None
    for _ in range(max(1, args.runs)):
        t0 = time.perf_counter()
        logits = sess.run([name], feed)[0]
        times.append(time.perf_counter() - t0)
    logits = np.asarray(logits, dtype=np.float32)
    if not np.isfinite(logits).all():
        raise SystemExit(f"{args.model}: logits hold {int((~np.isfinite(logits)).sum())} NaN/inf values")
    tmp = args.out_logits + f".tmp{os.getpid()}.npy"
    np.save(tmp, logits)
    os.replace(tmp, args.out_logits)
    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
            "model": os.path.abspath(args.model), "ids": os.path.abspath(args.ids), "threads": args.threads,
            "inputs": {i.name: [i.type, i.shape] for i in sess.get_inputs()}, "output": name,
            "logits": {"file": os.path.abspath(args.out_logits), "shape": list(logits.shape)},
            "matmulnbits": {"count": len(nodes), "attribute_sets": [dict(a) for a in attrs]},
            "load_s": round(load_s, 3), "run_s_median": round(statistics.median(times), 4),
            "run_s": [round(t, 4) for t in times], "tokens": int(ids.size),
            "tokens_per_s": round(ids.size / statistics.median(times), 1),
            "loadavg_1m": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("--ids", required=True)
    r.add_argument("--out-logits", required=True)
    r.add_argument("--json")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--runs", type=int, default=3)
    s = sub.add_parser("selfcheck")
    s.add_argument("--json")
    s.add_argument("--threads", type=int, default=2)
    t = sub.add_parser("tiny-lm")
    t.add_argument("out")
    t.add_argument("--vocab", type=int, default=256)
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--json")
    args = ap.parse_args()
    res = {"run": run, "selfcheck": selfcheck, "tiny-lm": tiny_lm}[args.cmd](args)
    text = json.dumps(res, indent=1)
    if args.json:
        tmp = args.json + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.json)
    if args.cmd == "selfcheck":
        print(json.dumps({"ok": res["ok"], "onnxruntime": res["onnxruntime"],
                          "cases": [(c["case"], c["ok"], c.get("max_rel_err", c.get("error"))) for c in res["cases"]],
                          "nibble_order_negative_control": res["nibble_order_negative_control"]}, indent=1))
        return 0 if res["ok"] else 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
