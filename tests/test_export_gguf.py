"""GGUF from any quantized model: the per-block code grid, int grids written unchanged, GPTQ with
ggml's encoders as the quantizer, and the whole path api.quantize -> GGUF -> read back."""
from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.export import QuantizedModel
from lowbit.export.gguf.reader import read_tensors
from lowbit.export.gguf.writer import ggml_from_int, write_quantized
from lowbit.models import LoadedModel
from lowbit.numerics import int_scheme
from lowbit.numerics.ggml import dequantize, quantize
from lowbit.numerics.ggml.grid import affine, code_span, with_codes
from lowbit.numerics.ggml.types import ggml_type
from lowbit.recipe import Recipe, Rule

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / "bench" / ".venv-llamacpp" / "bin" / "python"
GRID_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


# ---- the grid: tiny, exact ------------------------------------------------------------------------
def test_q4_0_block_by_hand():
    # one Q4_0 block: d = 1.0 (fp16 0x3C00, little-endian 00 3C), codes q_j = j % 16 -> x = q - 8;
    # byte j of qs holds code j (low nibble) and code j + 16 (high nibble)
    q = np.arange(32) % 16
    block = np.concatenate([[0x00, 0x3C], (q[:16] | q[16:] << 4)]).astype(np.uint8)[None]
    assert np.array_equal(dequantize(block, "Q4_0", (1, 32))[0], (q - 8).astype(np.float32))
    a, b = affine(block, "Q4_0")
    assert np.array_equal(a, np.ones((1, 32), np.float32)) and np.array_equal(b, np.full((1, 32), -8, np.float32))
    assert np.array_equal(with_codes(block, "Q4_0", q[None]), block)


@pytest.mark.parametrize("t", GRID_TYPES)
def test_grid_is_the_decoders_and_codes_round_trip(t):
    """a*q + b reproduces the decoder exactly, and codes read back from the decoded values
    re-pack into the very same bytes (every code field of every type is where grid.py says)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    T = ggml_type(t)
    blob = quantize(x, t)
    blk = blob.reshape(-1, T.type_size)
    a, b = affine(blk, t)
    xh = dequantize(blob, t, x.shape).reshape(blk.shape[0], T.block_size)
    live = a != 0
    q = np.where(live, np.clip(np.round((xh - b) / np.where(live, a, 1)), 0, code_span(t).qmax), 0)
    assert np.array_equal(np.where(live, a * q + b, b), xh)
    assert np.array_equal(with_codes(blk, t, q), blk)


# ---- int grids that are ggml types ------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_weight(smollm2):
    return smollm2.model.model.layers[3].mlp.down_proj.weight.detach().float().clone()   # (576, 1536)


@pytest.mark.parametrize("bits,sym,want", [(4, True, "Q4_0"), (5, True, "Q5_0"), (8, True, "Q8_0")])
def test_int_group32_symmetric_is_written_unchanged(real_weight, bits, sym, want):
    from lowbit.methods import get_method
    spec = get_method("rtn")
    qw = spec.fn(real_weight, int_scheme(bits, 32, symmetric=sym), spec.make_config({}), None)
    t, blocks = ggml_from_int(qw)
    assert t == want
    assert np.array_equal(dequantize(blocks, t, qw.shape), qw.dequantize().numpy())


def test_int_that_no_ggml_type_is_gives_none(real_weight):
    from lowbit.methods import get_method
    spec = get_method("rtn")
    assert ggml_from_int(spec.fn(real_weight, int_scheme(4, 128), spec.make_config({}), None)) is None
    assert ggml_from_int(spec.fn(real_weight, int_scheme(3, 32, True), spec.make_config({}), None)) is None


# ---- GPTQ with ggml encoders --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def down_proj_inputs(smollm2):
    """Real inputs of layers[3].mlp.down_proj on 4 x 128 tokens of the calibration text."""
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    toks = calibration_tokens(smollm2.tokenizer, CalibrationConfig(n_samples=4, seq_len=128))
    seen = []
    mod = smollm2.model.model.layers[3].mlp.down_proj
    h = mod.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    try:
        with torch.no_grad():
            smollm2.model(toks)
    finally:
        h.remove()
    return torch.cat(seen).float()       # (512, 1536)


@pytest.mark.parametrize("t,ratio", [("Q3_K", 0.9), ("Q2_K", 0.9), ("Q4_0", 0.9), ("Q6_K", 0.9), ("Q4_K", 1.0)])
def test_gptq_with_ggml_encoder_lowers_output_error(real_weight, down_proj_inputs, t, ratio):
    """Same type, same size, same importance: GPTQ's codes give a lower ||W X - Q X|| than
    llama.cpp's encoder alone; the blocks stay valid (decodable, same bytes per row). Q4_K
    re-encodes SmolLM2's Q4_1-grid weights almost exactly, so there GPTQ must only not be worse
    (the per-row choice keeps the encoder's rows where they are better)."""
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.methods.gptq_ggml import gptq_ggml_quantize
    from lowbit.presets.gguf_mixes import ggml_scheme
    X = down_proj_inputs
    H = 2 * X.t().double() @ X.double() / X.shape[0]
    imp = (X.double() ** 2).mean(0).float().numpy()
    W = real_weight
    gw = gptq_ggml_quantize(W, H.float(), ggml_scheme(t), GPTQConfig(), imatrix=imp)
    assert gw.type == t and tuple(gw.data.shape) == (576, ggml_type(t).row_bytes(1536))
    plain = dequantize(quantize(W.numpy(), t, imatrix=imp), t, W.shape)
    err = lambda Q: float(((W - torch.from_numpy(np.asarray(Q))) @ X.t()).square().sum())   # noqa: E731
    e_gptq, e_plain = err(gw.dequantize()), err(plain)
    assert e_gptq <= ratio * e_plain * (1 + 1e-5), (t, e_gptq, e_plain)


def test_gptqk_leaves_fallback_types_to_the_encoder(real_weight, down_proj_inputs):
    """ggml_fallback='encoder' (<mix>-gptqk): a Q2_K row of 576 values falls back to Q4_0 and keeps
    llama.cpp's bytes exactly; on 1536-value rows (a real Q2_K) GPTQ still chooses the codes."""
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.methods.gptq_ggml import gptq_ggml_quantize
    from lowbit.presets.gguf_mixes import ggml_scheme
    from lowbit.recipe import get_recipe
    X = down_proj_inputs
    H = 2 * X.t().double() @ X.double() / X.shape[0]
    imp = (X.double() ** 2).mean(0).float().numpy()
    cfg = GPTQConfig(ggml_fallback="encoder")
    W576 = real_weight.t().contiguous()                      # (1536, 576): rows of 576 values
    H576 = 2 * torch.eye(576, dtype=torch.float64)
    imp576 = np.ones(576, dtype=np.float32)
    fb = gptq_ggml_quantize(W576, H576.float(), ggml_scheme("q2_k"), cfg, imatrix=imp576)
    assert fb.type == "Q4_0" and fb.wanted == "Q2_K"
    assert np.array_equal(fb.data.numpy(), quantize(W576.numpy(), "Q4_0", imatrix=imp576))
    k = gptq_ggml_quantize(real_weight, H.float(), ggml_scheme("q2_k"), cfg, imatrix=imp)
    assert k.type == "Q2_K" and "loss_encoder_only" in k.info
    rule_args = [r.method_args for r in get_recipe("q2_k-gptqk").rules if r.method == "gptq"]
    assert rule_args and all(a.get("ggml_fallback") == "encoder" for a in rule_args)
    with pytest.raises(LowbitError, match="ggml_fallback"):
        GPTQConfig(ggml_fallback="nope")


# ---- the whole path on the bundled model -------------------------------------------------------------
@pytest.fixture(scope="module")
def q4km_gptq(smollm2, tmp_path_factory):
    """q4_k_m-gptq's rules on blocks 0-1 (GPTQ-fed ggml types); the other blocks and the
    embedding stay float (F16 in the file) to keep the test short."""
    from lowbit.presets.gguf_mixes import mix_gptq_recipe
    r = mix_gptq_recipe("q4_k_m")
    rules = [Rule(rf"^(?=model\.layers\.[01]\.).*?(?:{x.targets})", x.scheme, x.method)
             for x in r.rules if x.method == "gptq"]
    recipe = Recipe("q4_k_m-gptq", rules, [], {"n_samples": 4, "seq_len": 128, "batch_size": 4})
    model = copy.deepcopy(smollm2.model)
    rep = api.quantize(model, recipe, tokenizer=smollm2.tokenizer, progress=False)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    out = tmp_path_factory.mktemp("gguf") / "q4km-gptq.gguf"
    grep = write_quantized(QuantizedModel.from_report(lm, rep), out)
    return lm, rep, out, grep


def test_gptq_gguf_holds_exactly_the_quantized_model(q4km_gptq):
    lm, rep, out, grep = q4km_gptq
    got = read_tensors(out)
    assert {r.used for r in grep.tensors} >= {"Q5_0", "Q6_K", "Q8_0", "F32", "F16"}   # 576-column fallbacks
    assert any(r["method"] == "gptq" for r in rep.layers)
    sd = dict(lm.model.state_dict())
    for r in grep.tensors:
        mod = r.hf_name.rpartition(".")[0]
        if mod in rep.qweights:
            want = rep.qweights[mod].dequantize().numpy()
        else:
            want = sd[r.hf_name].float().numpy()
            want = want.astype(np.float16).astype(np.float32) if want.ndim == 2 else want
        if ".q_proj." in r.hf_name or ".k_proj." in r.hf_name:
            from lowbit.arch.gguf_names import unpermute_qk
            got[r.name] = unpermute_qk(got[r.name], 9 if ".q_proj." in r.hf_name else 3)
        assert np.array_equal(got[r.name], want), r.name
    side = json.loads(Path(f"{out}.lowbit.json").read_text())
    assert side["format"] == "gguf" and side["lowbit_recipe"]["name"] == "q4_k_m-gptq"
    from lowbit.export.manifest import verify
    assert verify(out)["files"] == 1


def test_cli_gptq_gguf_with_its_resume_state_writes_the_same_file(smollm2, q4km_gptq, tmp_path):
    """`lowbit quantize --recipe <ggml gptq recipe> --format gguf` keeps a resume state after every
    block (calibration/resume.py, which once refused ggml blocks, so the command failed at its
    first block): its tensors are api.quantize + write_quantized's, bit for bit, and the state is
    dropped at the end."""
    from lowbit.cli import main
    lm, rep, out, _ = q4km_gptq
    rep.recipe.save(tmp_path / "r.json")
    cli = tmp_path / "cli.gguf"
    assert main(["quantize", str(smollm2.path), "--recipe", str(tmp_path / "r.json"), "--format", "gguf",
                 "--out", str(cli)]) == 0
    got, want = read_tensors(cli), read_tensors(out)
    assert list(got) == list(want)
    for name, v in want.items():
        assert np.array_equal(got[name], v), name
    assert not (tmp_path / ".cli.gguf.resume").exists()


def test_int_model_to_gguf_exact_and_reencoded(smollm2, tmp_path):
    """A w4g32-sym RTN model goes in as Q4_0 unchanged; a g128 layer is re-encoded and reported."""
    model = copy.deepcopy(smollm2.model)
    recipe = Recipe("mixed", [Rule(r"model\.layers\.0\.mlp\.", int_scheme(4, 128), "rtn"),
                              Rule(r".*", int_scheme(4, 32, symmetric=True), "rtn")])
    rep = api.quantize(model, recipe, progress=False)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    out = tmp_path / "w4.gguf"
    g = write_quantized(QuantizedModel.from_report(lm, rep), out)
    assert len(g.exact) == 210 - 3 and {r["name"] for r in g.reencoded} == {
        f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert all(0 < r["rel_rms_error"] < 0.2 for r in g.reencoded)
    got = read_tensors(out)
    name = "blk.5.ffn_up.weight"
    assert np.array_equal(got[name], rep.qweights["model.layers.5.mlp.up_proj"].dequantize().numpy())
    with pytest.raises(LowbitError, match="already exists"):
        write_quantized(QuantizedModel.from_report(lm, rep), out)


@pytest.mark.slow
def test_llama_cpp_runs_our_gptq_fed_gguf(q4km_gptq):
    """llama.cpp's own loader reads the GPTQ-fed file and scores the evaluation text sanely."""
    if not PEER_PY.is_file():
        pytest.skip("bench/.venv-llamacpp absent (bash bench/setup_peers.sh llamacpp)")
    _, _, out, _ = q4km_gptq
    r = subprocess.run([str(PEER_PY), "bench/peers/llamacpp_ref.py", "ppl", str(out), "--n-ctx", "512",
                        "--max-windows", "4", "--threads", "2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout[r.stdout.find("{"):])
    assert 5 < res["ppl"] < 40, res
