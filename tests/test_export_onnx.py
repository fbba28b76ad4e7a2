"""ONNX export (lowbit.export.onnx): MatMulNBits packing checked by hand and by onnxruntime, the
real bundled model exported and run by onnxruntime against lowbit's own quantized model, the KV
cache, refusals, determinism, and a truncated file."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx format needs the onnx package (pip install 'lowbit[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="running an ONNX export needs onnxruntime")

from lowbit import api  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.export import QuantizedModel, detect_format, get_format  # noqa: E402
from lowbit.export.onnx import (OnnxRunner, dequantize_matmul_nbits, detect,  # noqa: E402
                                pack_matmul_nbits)
from lowbit.models import LoadedModel  # noqa: E402
from lowbit.numerics import int_scheme  # noqa: E402
from lowbit.numerics.qweight import QuantizedWeight, quantize_weight  # noqa: E402
from lowbit.numerics.scheme import Scheme  # noqa: E402

U32 = 2.0 ** -24          # fp32 unit roundoff


def _run_node(p: dict, a: np.ndarray) -> np.ndarray:
    """One MatMulNBits node in onnxruntime: a (M, K) -> (M, N)."""
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(p["B"], "B"), numpy_helper.from_array(p["scales"], "s")]
    ins = ["A", "B", "s"]
    if p["zero_points"] is not None:
        inits.append(numpy_helper.from_array(p["zero_points"], "z"))
        ins.append("z")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=p["K"], N=p["N"],
                            bits=p["bits"], block_size=p["block_size"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(a.shape))],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [a.shape[0], p["N"]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"A": a})[0]


def _check_against_numpy(qw: QuantizedWeight, m: int = 3) -> None:
    """onnxruntime's product vs float64 a @ w_hat^T, w_hat = our dequantized weight, within the
    worst-case fp32 bound for any summation order (Higham, Accuracy and Stability, 3.1):
    |err| <= gamma_{K+2} * (|a| @ |w_hat|^T), gamma_n = n u / (1 - n u) (+2: the dequantizing
    product and subtraction, however the kernel orders them)."""
    p = pack_matmul_nbits(qw, "t")
    w = qw.dequantize().double().numpy()
    # the packed layout decodes back to exactly our weight
    assert np.array_equal(dequantize_matmul_nbits(p), w.astype(np.float32))
    a = torch.randn(m, qw.shape[1], generator=torch.Generator().manual_seed(1)).numpy()
    y = _run_node(p, a)
    ref = a.astype(np.float64) @ w.T
    n = qw.shape[1] + 2
    bound = n * U32 / (1 - n * U32) * (np.abs(a).astype(np.float64) @ np.abs(w).T)
    assert (np.abs(y - ref) <= bound).all(), float((np.abs(y - ref) / bound).max())


def test_golden_packing_by_hand():
    # 2 rows x 20 columns, 4-bit g16: row length 20 = 16 + a ragged last group of 4
    codes = torch.tensor([[1, 2] + [3] * 14 + [15, 0, 7, 9],
                          [0] * 16 + [4, 5, 6, 8]], dtype=torch.uint8)
    scale = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    zero = torch.tensor([[3.0, 9.0], [10.0, 1.0]])
    qw = QuantizedWeight(codes, scale, zero, int_scheme(4, 16))
    p = pack_matmul_nbits(qw, "t")
    assert (p["K"], p["N"], p["bits"], p["block_size"]) == (20, 2, 4, 16)
    assert p["B"].shape == (2, 2, 8) and p["B"].dtype == np.uint8
    # byte j = c[2j] | c[2j+1] << 4, low nibble first
    assert p["B"][0, 0, 0] == 0x21 and p["B"][0, 0, 1] == 0x33
    assert list(p["B"][0, 1, :2]) == [0x0F, 0x97]
    # past K = 20 the block is padded with its zero point (9 for row 0, 1 for row 1): adds 0
    assert list(p["B"][0, 1, 2:]) == [0x99] * 6 and list(p["B"][1, 1, 2:]) == [0x11] * 6
    assert list(p["B"][1, 1, :2]) == [0x54, 0x86]
    # scales row-major (row, block); zero points packed two per byte per row: row 0 -> 3 | 9 << 4
    assert p["scales"].tolist() == [0.5, 0.25, 1.0, 2.0]
    assert p["zero_points"].tolist() == [0x93, 0x1A]
    a = np.zeros((1, 20), np.float32)
    a[0, 0], a[0, 17] = 1.0, 2.0          # row 0: (1-3)*0.5 + 2*(0-9)*0.25 = -5.5; row 1: -10 + 2*(5-1)*2 = 6
    assert _run_node(p, a).tolist() == [[-5.5, 6.0]]
    _check_against_numpy(qw)


@pytest.mark.parametrize("scheme", [int_scheme(4, 128), int_scheme(4, 32, symmetric=True), int_scheme(2, 64),
                                    int_scheme(8, 16), int_scheme(8, None, symmetric=True), int_scheme(4, None)],
                         ids=lambda s: s.short_name())
def test_packing_matches_numpy_matmul(scheme):
    # 40 x 576: SmolLM2's hidden size, ragged at g128 (4 x 128 + 64); per channel: 9 blocks of 64
    w = torch.randn(40, 576, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, scheme)
    p = pack_matmul_nbits(qw, "t")
    assert (p["zero_points"] is None) == scheme.symmetric
    _check_against_numpy(qw)


@pytest.mark.parametrize("scheme,what", [(int_scheme(3, 64), "3-bit"), (int_scheme(4, 96), "group size 96"),
                                         (Scheme(bits=4, format="nf4", group_size=64), "format nf4"),
                                         (Scheme(bits=8, granularity="block"), "granularity block")])
def test_refuses_what_matmul_nbits_cannot_hold(scheme, what):
    qw = quantize_weight(torch.randn(8, 192, generator=torch.Generator().manual_seed(0)), scheme)
    with pytest.raises(LowbitError, match=rf"model\.layers\.3\.mlp\.up_proj.*{what}"):
        pack_matmul_nbits(qw, "model.layers.3.mlp.up_proj")


def test_refuses_permuting_g_idx():
    qw = quantize_weight(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), int_scheme(4, 32))
    qw.g_idx = torch.arange(64, dtype=torch.int32).flip(0) // 32
    with pytest.raises(LowbitError, match="model.layers.0.self_attn.q_proj.*g_idx"):
        pack_matmul_nbits(qw, "model.layers.0.self_attn.q_proj")
    qw.g_idx = torch.arange(64, dtype=torch.int32) // 32      # the identity grouping is fine
    _check_against_numpy(qw)


# ---- the real bundled model ------------------------------------------------------------------
RECIPE = "w4g64-rtn"


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    model = copy.deepcopy(smollm2.model)
    rep = api.quantize(model, RECIPE, progress=False)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    out = api.export(lm, rep, tmp_path_factory.mktemp("onnx") / "m", "onnx")
    return lm, rep, out


@pytest.fixture(scope="module")
def tokens(smollm2):
    from lowbit.data.text import load_text
    return smollm2.tokenizer(load_text("wiki-evaluation")[:4000], return_tensors="pt").input_ids[:, :64]


@pytest.mark.model
def test_onnxruntime_matches_our_quantized_model(exported, tokens):
    """Logits of onnxruntime on the export vs lowbit's QuantLinear model, 64 real tokens.

    Both are fp32 evaluations of one exact function (the same codes, scales, norms, rotary
    tables); they differ by rounding in different orders only. Its size: our own fp32 forward's
    distance from a float64 forward of the same quantized model, e32. onnxruntime's distance from
    float64 is a rounding error of the same kind (other summation orders, MLAS's blocked
    kernels); we allow it 6 * e32. Measured here (onnxruntime 1.32, AVX-512 box): e32 = 7.7e-5,
    onnxruntime 1.5 e32 from float64 and 1.4e-4 from ours, over logits up to ~33 in size
    (w4g128-rtn: 2.8 e32, w8-rtn: 0.9 e32)."""
    lm, _, out = exported
    with torch.no_grad():
        ours = lm.model(tokens).logits
        exact = copy.deepcopy(lm.model).double()(tokens).logits
    got = OnnxRunner(out, threads=2).logits(tokens)
    assert got.shape == ours.shape == (1, 64, 49152) and got.dtype == torch.float32
    e32 = float((ours.double() - exact).abs().max())
    tol = 6 * e32
    assert 0 < e32 < 1e-3                                   # the yardstick itself is fp32-sized
    assert float((got.double() - exact).abs().max()) <= tol
    assert float((got - ours).abs().max()) <= tol + e32
    # greedy choice: must agree wherever the exact top-2 margin exceeds 2 * tol (then neither fp32
    # evaluation can swap them); measured: 64 of 64 positions clear, all 64 agree
    top2 = exact[0].topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (tol + e32)
    agree = got[0].argmax(-1) == ours[0].argmax(-1)
    assert bool(agree[clear].all())
    assert int(clear.sum()) >= 56                           # 7/8 of positions have a clear margin


@pytest.mark.model
def test_kv_cache_matches_full_forward(exported, tokens):
    _, _, out = exported
    r = OnnxRunner(out, threads=2)
    full, present = r.forward(tokens)
    lg1, past = r.forward(tokens[:, :40])
    lg2, past = r.forward(tokens[:, 40:41], past)
    lg3, past = r.forward(tokens[:, 41:], past)
    cached = np.concatenate([lg1, lg2, lg3], 1)
    assert past[0].shape == (1, 3, 64, 64) and len(past) == 60    # BNSH, 30 layers x (key, value)
    # the cached steps run attention over fewer query rows in a different order: same fp32 scale
    assert np.abs(cached - full).max() < 1e-3
    assert all(np.abs(a - b).max() < 1e-4 for a, b in zip(past, present))
    res = r.generate(tokens[:, :16], 8)
    assert len(res.tokens) == 8 and res.prompt_tokens == 16 and res.decode_tokens_per_s > 0


@pytest.mark.model
def test_directory_manifest_and_determinism(exported, tmp_path):
    lm, rep, out = exported
    names = {f.name for f in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json", "lowbit_manifest.json"} <= names
    assert detect(out) and not detect(tmp_path)
    assert get_format("onnx").read is None and detect_format(out) is None   # no torch reader
    m = json.loads((out / "lowbit_manifest.json").read_text())
    assert m["format"] == "onnx" and m["lowbit_recipe"]["name"] == RECIPE
    row = m["layers"]["model.layers.0.mlp.down_proj"]
    assert (row["op"], row["bits"], row["block_size"], row["shape"]) == ("MatMulNBits", 4, 64, [576, 1536])
    assert m["layers"]["model.layers.0.self_attn.k_proj"]["node"] == "model.layers.0.self_attn.qkv_proj"
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("MatMulNBits") == 4 * 30 and ops.count("GroupQueryAttention") == 30   # qkv, o, gate_up, down
    assert len([r for r in m["layers"].values() if r["op"] == "MatMulNBits"]) == 7 * 30
    from lowbit.export.manifest import verify
    assert verify(out)["format"] == "onnx"
    again = api.export(lm, rep, tmp_path / "again", "onnx")
    assert json.loads((again / "lowbit_manifest.json").read_text())["files"] == m["files"]   # same bytes


@pytest.mark.model
def test_truncated_or_changed_files_are_named(exported, tmp_path):
    import shutil
    _, _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match=r"model\.onnx.*sha256"):
        OnnxRunner(bad)                                     # the manifest catches it
    with pytest.raises(LowbitError, match=r"bad/model\.onnx: onnxruntime cannot load it"):
        OnnxRunner(bad, verify=False)                       # and onnxruntime's own parse
    shutil.copyfile(out / "model.onnx", bad / "model.onnx")
    blob = (bad / "model.onnx.data").read_bytes()
    (bad / "model.onnx.data").write_bytes(blob[:-4096])
    with pytest.raises(LowbitError, match=r"model\.onnx\.data.*sha256"):
        OnnxRunner(bad)
    with pytest.raises(LowbitError, match=r"bad/model\.onnx: onnxruntime cannot load it"):
        OnnxRunner(bad, verify=False)


@pytest.mark.model
@pytest.mark.slow
def test_cli_quantize_format_onnx(tmp_path, exported, tokens):
    """`lowbit quantize smollm2-135m --recipe w4g64-rtn --format onnx --out DIR`: the same files
    as the api export (RTN is deterministic), and it runs."""
    from lowbit.cli import main as cli_main
    out = tmp_path / "cli"
    assert cli_main(["quantize", "smollm2-135m", "--recipe", RECIPE, "--format", "onnx", "--out", str(out)]) == 0
    files = json.loads((out / "lowbit_manifest.json").read_text())["files"]
    ref = json.loads((exported[2] / "lowbit_manifest.json").read_text())["files"]
    assert files["model.onnx"] == ref["model.onnx"] and files["model.onnx.data"] == ref["model.onnx.data"]
    assert OnnxRunner(out).logits(tokens[:, :8]).shape == (1, 8, 49152)


@pytest.mark.model
@pytest.mark.slow
def test_unfused_graph_gives_the_same_logits(exported, tokens, tmp_path):
    """fuse=False (one MatMulNBits per linear, separate q/k/v into GroupQueryAttention) computes
    the same dot products: equal to the fused graph up to fp32 reordering."""
    lm, rep, out = exported
    plain = api.export(lm, rep, tmp_path / "plain", "onnx", fuse=False)
    ops = [n.op_type for n in onnx.load(str(plain / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 7 * 30
    a, b = OnnxRunner(out).logits(tokens), OnnxRunner(plain).logits(tokens)
    assert float((a - b).abs().max()) < 1e-3


@pytest.mark.parametrize("tied,head", [(False, "float"), (True, "quantized")])
def test_qwen2_biases_and_lm_head(tmp_path, tied, head):
    """A small Qwen2 built by transformers from a config (random weights, seeded): q/k/v biases
    (added after the fused MatMulNBits), rope_theta 1e6, an untied float lm_head (MatMul on W^T)
    or a tied one quantized (its own MatMulNBits): onnxruntime vs the transformers forward of the
    same quantized model, within the fp32 yardstick of the test above (6 x our fp32-vs-fp64)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lowbit.recipe import Recipe, Rule
    cfg = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=1e6, tie_word_embeddings=tied, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():                        # transformers initialises biases to 0: make them count
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_(0, 0.5)
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    recipe = Recipe("w4g32+head", [Rule(r".*", int_scheme(4, 32))], ignore=[] if head == "quantized" else ["lm_head"])
    rep = api.quantize(model, recipe, progress=False)
    assert ("lm_head" in rep.qweights) == (head == "quantized")
    lm = LoadedModel(model, None, src, "tiny-qwen2", None)
    out = api.export(lm, rep, tmp_path / "m", "onnx")
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids).logits
        exact = copy.deepcopy(model).double()(ids).logits
    got = OnnxRunner(out).logits(ids)
    e32 = float((ours.double() - exact).abs().max())
    assert 0 < e32 < 1e-4
    assert float((got.double() - exact).abs().max()) <= 6 * e32
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("Add") == 2                 # one fused q|k|v bias per layer
    assert ops.count("MatMulNBits") == 4 * 2 + (head == "quantized")
