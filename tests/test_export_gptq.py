"""GPTQ checkpoints (lowbit.export.gptq): golden packing, bit-exact round trips on the real bundled
model (RTN and GPTQ act-order, v1 and v2 zeros, mixed bits via `dynamic`), refusals of what GPTQ
cannot hold, mutated / truncated / ambiguous files, and the peers (transformers + GPTQModel in
bench/.venv-gptq loading our file; an AutoRound GPTQ checkpoint loading in lowbit)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.export import QuantizedModel, get_format
from lowbit.export import gptq as G
from lowbit.methods import get_method
from lowbit.models import LoadedModel, load_model
from lowbit.nn.qlinear import QuantLinear, set_submodule
from lowbit.numerics import int_scheme
from lowbit.numerics.qweight import QuantizedWeight
from lowbit.numerics.scheme import Scheme
from lowbit.recipe import Recipe, Rule

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 1001]])
# block 0: GPTQ act-order 4-bit g128 asym (g_idx; 576 = 4 x 128 + 64 ragged); block 1: RTN 3-bit
# g64 symmetric; block 2's MLP: RTN 8-bit per channel symmetric. 4 is the file default, the
# others go in quantization_config.dynamic.
MIXED = Recipe("mixed", [Rule(r"model\.layers\.0\.", int_scheme(4, 128), "gptq", {"act_order": True}),
                         Rule(r"model\.layers\.1\.", int_scheme(3, 64, symmetric=True), "rtn"),
                         Rule(r"model\.layers\.2\.mlp\.", int_scheme(8, None, True), "rtn")],
               calibration={"n_samples": 4, "seq_len": 64, "batch_size": 4})


def quantized(smollm2, recipe):
    model = copy.deepcopy(smollm2.model)
    rep = api.quantize(model, recipe, tokenizer=smollm2.tokenizer, progress=False)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    return lm, rep


def qw_of(codes, bits=4, group=32, sym=False, zero=None):
    """A QuantizedWeight with the given codes (out, in), unit scales, and zero points."""
    scheme = int_scheme(bits, group, sym)
    from lowbit.numerics.affine import qparam_shape
    qs = qparam_shape(tuple(codes.shape), scheme)
    z = torch.full(qs, float(zero if zero is not None else scheme.sym_zero))
    return QuantizedWeight(codes.to(torch.uint8), torch.ones(qs), z, scheme)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_same_layers(a, b, n_expect):
    n = 0
    for name, mod in a.named_modules():
        if isinstance(mod, QuantLinear):
            other = b.get_submodule(name)
            assert isinstance(other, QuantLinear), name
            for t in ("qdata", "scale", "zero_point", "g_idx"):
                x, y = getattr(mod, t), getattr(other, t)
                assert (x is None and y is None) or torch.equal(x, y), (name, t)
            n += 1
    assert n == n_expect


# ---- golden packing ----------------------------------------------------------------------------
def test_golden_4bit_word_and_v1_v2_zeros():
    # input column k of every output row holds code k % 16: word 0 of each column packs codes
    # 0..7 little end first = 0x76543210, word 1 codes 8..15 = 0xFEDCBA98 (negative as int32)
    codes = (torch.arange(32) % 16).repeat(32, 1)
    t = G.pack_layer("L", qw_of(codes, sym=True), G.V1)
    assert t["L.qweight"].shape == (4, 32) and t["L.qweight"].dtype == torch.int32
    assert t["L.qweight"][0, 0].item() == 0x76543210 == 1985229328
    assert t["L.qweight"][1, 5].item() == 0xFEDCBA98 - 2**32 == -19088744
    # symmetric zero 8: v1 stores 7 in every nibble, v2 stores 8
    assert t["L.qzeros"].shape == (1, 4) and bool((t["L.qzeros"] == 0x77777777).all())
    v2 = G.pack_layer("L", qw_of(codes, sym=True), G.V2)
    assert bool((v2["L.qzeros"] == 0x88888888 - 2**32).all())
    assert t["L.scales"].dtype == torch.float16 and t["L.scales"].shape == (1, 32)
    assert torch.equal(t["L.g_idx"], torch.zeros(32, dtype=torch.int32))


def test_golden_3bit_layout():
    # 32 3-bit codes in 3 words; value 10 straddles words 0|1, value 21 words 1|2 (AutoGPTQ pack())
    col = torch.zeros(32, dtype=torch.uint8)
    col[0], col[10], col[11], col[21], col[22] = 1, 7, 3, 5, 4
    codes = col.repeat(32, 1)                      # every output row the same input column codes
    t = G.pack_layer("L", qw_of(codes, bits=3, sym=True), G.V1)
    w = t["L.qweight"][:, 0].tolist()
    # word0: c0 = 1 at bits 0-2, c10's low 2 bits (0b11) at bits 30-31
    assert w[0] == (1 | 3 << 30) - 2**32
    # word1: c10's high bit at bit 0, c11 = 3 at bits 1-3, c21's low bit (1) at bit 31
    assert w[1] == (1 | 3 << 1 | 1 << 31) - 2**32
    # word2: c21's two high bits (0b10) at bits 0-1, c22 = 4 at bits 2-4
    assert w[2] == (2 | 4 << 2)
    back = G.unpack_layer(load_dict(t), "L", (32, 32), {"bits": 3, "group_size": 32, "sym": True,
                                                         "format": G.V1}, "mem")[0]
    assert torch.equal(back.qdata, codes)


class load_dict:
    """TensorFiles' get() over an in-memory dict (the reader's only access path)."""
    def __init__(self, d):
        self.d = d

    def get(self, key, required=True):
        if key not in self.d and not required:
            return None
        return self.d[key]


def test_real_layer_matches_an_independent_packing(smollm2):
    """q_proj of block 0 at 4 and 3 bits: our qweight against a direct bit-stream construction."""
    w = smollm2.model.model.layers[0].self_attn.q_proj.weight.detach()
    for bits in (4, 3):
        spec = get_method("rtn")
        qw = spec.fn(w, int_scheme(bits, 64, False), spec.make_config({}), None)    # fp16 scales
        t = G.pack_layer("q", qw, G.V2)
        c = qw.qdata.t().numpy().astype(np.uint64)                     # (K, N)
        K, N = c.shape
        per = 32 // bits if bits != 3 else None
        if bits == 4:
            words = (c.reshape(K // 8, 8, N) << (np.arange(8, dtype=np.uint64) * 4)[None, :, None]).sum(1)
        else:   # 3 bits: 32 values -> a 96-bit stream -> 3 words
            runs = c.reshape(K // 32, 32, N)
            stream = [sum(int(v) << (3 * i) for i, v in enumerate(runs[r, :, n])) for r in range(K // 32)
                      for n in range(0, N, 97)]                            # every 97th column
            words = np.array([[(s >> (32 * j)) & 0xFFFFFFFF for j in range(3)] for s in stream])
            got = t["q.qweight"].numpy().astype(np.int64) & 0xFFFFFFFF
            got = got.reshape(K // 32, 3, N)[:, :, ::97].transpose(0, 2, 1).reshape(-1, 3)
            assert np.array_equal(got, words)
            continue
        assert per == 8
        assert np.array_equal(t["q.qweight"].numpy().astype(np.int64) & 0xFFFFFFFF, words.astype(np.int64))
        z = qw.zero_point.t().numpy().astype(np.uint64)                # (G, N) true zeros (v2)
        zw = (z.reshape(-1, N // 8, 8) << (np.arange(8, dtype=np.uint64) * 4)).sum(-1)
        assert np.array_equal(t["q.qzeros"].numpy().astype(np.int64) & 0xFFFFFFFF, zw.astype(np.int64))
        assert torch.equal(t["q.scales"].float(), qw.scale.t())


# ---- round trips on the bundled model -------------------------------------------------------------
@pytest.fixture(scope="module")
def rtn(smollm2, tmp_path_factory):
    lm, rep = quantized(smollm2, "w4g128-rtn")
    out = api.export(lm, rep, tmp_path_factory.mktemp("gptq") / "rtn", "gptq")
    return lm, rep, out


def test_rtn_round_trip_is_bit_exact(rtn):
    lm, rep, out = rtn
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 128
    assert cfg["checkpoint_format"] == "gptq" and cfg["sym"] is False and cfg["desc_act"] is False
    assert "dynamic" not in cfg
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    back = load_model(out)
    assert back.meta["format"] == "gptq" and back.meta["checkpoint_format"] == {"gptq": 210}
    assert_same_layers(lm.model, back.model, 210)
    assert torch.equal(logits(lm.model), logits(back.model))
    assert back.model.lm_head.weight is back.model.model.embed_tokens.weight
    # the ragged last group (576 = 4 x 128 + 64): 5 groups, g_idx = c // 128
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.scales"].shape == (5, 576)
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (72, 576)
    assert t["model.layers.0.self_attn.q_proj.qzeros"].shape == (5, 72)
    assert int(t["model.layers.0.self_attn.q_proj.g_idx"][-1]) == 4


def test_same_inputs_same_bytes(rtn, tmp_path):
    lm, rep, out = rtn
    again = api.export(lm, rep, tmp_path / "again", "gptq")
    for f in sorted(p.name for p in out.iterdir()):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f


def test_mixed_act_order_round_trip_v1_and_v2(smollm2, tmp_path):
    lm, rep = quantized(smollm2, MIXED)
    assert lm.model.model.layers[0].self_attn.q_proj.g_idx is not None
    for fmt in ("gptq", "gptq_v2"):
        out = api.export(lm, rep, tmp_path / fmt, fmt)
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert cfg["checkpoint_format"] == fmt and cfg["desc_act"] is True and cfg["bits"] == 4
        dyn = cfg["dynamic"]
        assert dyn[r"+:^model\.layers\.1\.mlp\.up_proj$"] == {"bits": 3, "group_size": 64, "sym": True}
        assert dyn[r"+:^model\.layers\.2\.mlp\.down_proj$"] == {"bits": 8, "group_size": -1, "sym": True}
        assert dyn[r"-:^model\.layers\.2\.self_attn\.q_proj$"] == {}
        back = load_model(out)
        assert_same_layers(lm.model, back.model, 7 + 7 + 3)
        assert back.model.model.layers[0].self_attn.q_proj.g_idx is not None
        assert torch.equal(logits(lm.model), logits(back.model))


def test_v1_refuses_a_zero_of_zero_and_v2_holds_it(smollm2, tmp_path):
    lm, rep = quantized(smollm2, Recipe("one", [Rule(r"layers\.0\.mlp\.up_proj", int_scheme(4, 64), "rtn")]))
    qm = QuantizedModel.from_report(lm, rep)
    name = "model.layers.0.mlp.up_proj"
    qw = qm.qweights[name]
    # a group whose weights are all >= 0 has zero 0: make row 3's group 2 so
    qw.zero_point[3, 2] = 0.0
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.mlp\.up_proj\.qzeros.*zero point of 0.*gptq_v2"):
        get_format("gptq").write(qm, tmp_path / "v1")
    assert not (tmp_path / "v1").exists()
    set_submodule(lm.model, name, QuantLinear(qw))
    out = get_format("gptq_v2").write(qm, tmp_path / "v2")
    back = load_model(out)
    assert float(back.model.get_submodule(name).zero_point[3, 2]) == 0.0
    assert torch.equal(logits(lm.model), logits(back.model))


def test_embedding_quantized_by_the_recipe_is_written_dequantized(smollm2, tmp_path):
    recipe = Recipe("emb", [Rule(r"embed_tokens", int_scheme(4, 64), "rtn"),
                            Rule(r"layers\.0\.self_attn\.q_proj", int_scheme(4, 64), "rtn")], ignore=[])
    lm, rep = quantized(smollm2, recipe)
    out = api.export(lm, rep, tmp_path / "emb", "gptq")
    man = json.loads((out / "lowbit_manifest.json").read_text())
    assert any("embed_tokens" in n and "dequantized" in n for n in man["notes"])
    back = load_model(out)
    assert torch.equal(back.model.model.embed_tokens.weight, lm.model.model.embed_tokens.weight)
    assert torch.equal(logits(lm.model), logits(back.model))


# ---- what GPTQ cannot hold ------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,match", [
    (Scheme(bits=4, format="nf4", granularity="group", group_size=64), "nf4g64.*integer codes only"),
    (Scheme(bits=4, granularity="tensor"), "tensor granularity"),
    (Scheme(bits=5, granularity="group", group_size=64), "5-bit codes"),
])
def test_writer_refuses_naming_the_tensor(smollm2, tmp_path, scheme, match):
    lm, rep = quantized(smollm2, Recipe("one", [Rule(r"layers\.3\.mlp\.down_proj", scheme, "rtn")]))
    with pytest.raises(LowbitError, match=r"model\.layers\.3\.mlp\.down_proj.*" + match):
        api.export(lm, rep, tmp_path / "x", "gptq")
    assert not (tmp_path / "x").exists()


def test_writer_refuses_scales_that_are_not_fp16(smollm2, tmp_path):
    recipe = Recipe("f32", [Rule(r"layers\.0\.mlp\.up_proj", int_scheme(4, 64), "rtn", {"scale_dtype": "float32"})])
    lm, rep = quantized(smollm2, recipe)
    with pytest.raises(LowbitError, match=r"up_proj\.scales.*not float16 numbers"):
        api.export(lm, rep, tmp_path / "x", "gptq")


# ---- mutated, truncated, ambiguous files ---------------------------------------------------------
def peer_copy(out: Path, dst: Path) -> Path:
    """Our file as a peer would ship it: no lowbit manifest (so no sha256 check stops the reader)."""
    shutil.copytree(out, dst)
    (dst / "lowbit_manifest.json").unlink()
    return dst


def rewrite(d: Path, fn) -> None:
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def set_qcfg(d: Path, **kv) -> None:
    """Edit quantization_config in config.json and quantize_config.json alike (None removes a key)."""
    for fname, sub in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        cfg = json.loads((d / fname).read_text())
        q = cfg[sub] if sub else cfg
        for k, v in kv.items():
            if v is None:
                q.pop(k, None)
            else:
                q[k] = v
        (d / fname).write_text(json.dumps(cfg))


Q = "model.layers.4.mlp.gate_proj"


def test_mutated_file_fails_the_manifest(rtn, tmp_path):
    _, _, out = rtn
    d = tmp_path / "m"
    shutil.copytree(out, d)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LowbitError, match=r"model\.safetensors: sha256 does not match"):
        load_model(d)


def test_truncated_safetensors(rtn, tmp_path):
    _, _, out = rtn
    d = peer_copy(out, tmp_path / "t")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(LowbitError, match=r"model\.safetensors"):
        load_model(d)


def test_bad_qweight_shape(rtn, tmp_path):
    _, _, out = rtn
    d = peer_copy(out, tmp_path / "s")
    rewrite(d, lambda t: t.__setitem__(f"{Q}.qweight", t[f"{Q}.qweight"][:-8].contiguous()))
    with pytest.raises(LowbitError, match=rf"{d}: tensor {Q}\.qweight: expected int32 \(72, 1536\).*\(64, 1536\)"):
        load_model(d)


def test_wrong_bits_in_config(rtn, tmp_path):
    _, _, out = rtn
    d = peer_copy(out, tmp_path / "b")
    set_qcfg(d, bits=3)
    with pytest.raises(LowbitError, match=r"tensor model\.layers\.\S+\.qweight: expected int32 .* for 3-bit .*"
                       r"4-bit codes: the config's bits 3 is wrong"):
        load_model(d)
    set_qcfg(d, bits=5)
    with pytest.raises(LowbitError, match=r"config.json: quantization_config bits 5"):
        load_model(d)


@pytest.mark.slow
def test_ambiguous_zero_convention(smollm2, rtn, tmp_path):
    _, _, out = rtn
    # asymmetric zeros under a config that claims sym=True and gives no checkpoint_format
    d = peer_copy(out, tmp_path / "a")
    set_qcfg(d, sym=True, checkpoint_format=None, format=None)
    with pytest.raises(LowbitError, match=r"qzeros: sym=True but the stored zeros.*ambiguous"):
        load_model(d)
    # a symmetric v2 file labelled v1
    lm, rep = quantized(smollm2, "w4g64-sym-rtn")
    sym = api.export(lm, rep, tmp_path / "sym", "gptq_v2")
    d2 = peer_copy(sym, tmp_path / "a2")
    set_qcfg(d2, checkpoint_format="gptq", format="gptq")
    with pytest.raises(LowbitError, match=r"checkpoint_format 'gptq' expects 7"):
        load_model(d2)
    # ... unlabelled it is v2 by its zeros (all 8 under sym): read, with a note
    set_qcfg(d2, checkpoint_format=None, format=None)
    back = load_model(d2)
    assert back.meta["checkpoint_format"] == {"gptq_v2": 210} and back.meta["notes"]
    assert torch.equal(logits(lm.model), logits(back.model))
    # an asymmetric v1 file whose stored zero is 15 (a wrapped zero of 0): refused
    d3 = peer_copy(out, tmp_path / "a3")
    rewrite(d3, lambda t: t[f"{Q}.qzeros"].__setitem__((0, 0), t[f"{Q}.qzeros"][0, 0] | 0xF))
    with pytest.raises(LowbitError, match=rf"tensor {Q}\.qzeros: a stored zero of 15.*ambiguous"):
        load_model(d3)


def test_label_only_in_quantize_config_json(rtn, tmp_path):
    # AutoGPTQ-era files: config.json's quantization_config without checkpoint_format, the label
    # in quantize_config.json
    lm, _, out = rtn
    d = peer_copy(out, tmp_path / "l")
    cfg = json.loads((d / "config.json").read_text())
    for k in ("checkpoint_format", "format"):
        cfg["quantization_config"].pop(k)
    (d / "config.json").write_text(json.dumps(cfg))
    back = load_model(d)
    assert back.meta["checkpoint_format"] == {"gptq": 210} and not back.meta["notes"]
    assert torch.equal(logits(lm.model), logits(back.model))


# ---- CLI end to end -------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_quantize_gptq_actorder_then_eval(tmp_path, capsys):
    from lowbit.cli import main as cli_main
    out = tmp_path / "q"
    rc = cli_main(["quantize", "smollm2-135m", "--recipe", "w4g128-gptq-actorder", "--format", "gptq",
                   "--out", str(out), "--samples", "4", "--seq-len", "64"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] is True and cfg["checkpoint_format"] == "gptq"
    assert cli_main(["eval", str(out), "--metrics", "ppl", "--max-tokens", "512"]) == 0
    assert "ppl" in capsys.readouterr().out


# ---- peers -----------------------------------------------------------------------------------------
GPTQ_PY = Path(os.environ.get("LOWBIT_GPTQ_PY", ROOT / "bench/.venv-gptq/bin/python"))
PEERS = Path(os.environ.get("LOWBIT_PEERS_DIR", ROOT / "bench/peers"))
PEER_OUT = Path(os.environ.get("LOWBIT_PEER_OUT", ROOT / "bench/out/peers"))


def fp16_weight_logits(lm, ids):
    """lowbit's model with every quantized weight dequantized and rounded to float16: what a loader
    that dequantizes in the scales' dtype (GPTQModel's torch kernel) computes."""
    model = copy.deepcopy(lm.model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dequantize_weight(torch.float32).half().float()
            if mod.bias is not None:
                lin.bias.data = mod.bias.float()
            set_submodule(model, name, lin)
    with torch.no_grad():
        return model(ids).logits.numpy()


@pytest.mark.slow
@pytest.mark.skipif(not (GPTQ_PY.is_file() and (PEERS / "load_check.py").is_file()),
                    reason="peer venv bench/.venv-gptq or bench/peers/load_check.py absent (bench/setup_peers.sh)")
def test_transformers_gptqmodel_loads_our_gptq(smollm2, tmp_path):
    # g64 divides 576: GPTQModel's CPU kernels all take it (its int4pack kernel refuses K % g != 0)
    lm, rep = quantized(smollm2, "w4g64-sym-rtn")
    out = api.export(lm, rep, tmp_path / "ours", "gptq")
    ids = tmp_path / "ids.npy"
    np.save(ids, IDS.numpy())
    r = subprocess.run([str(GPTQ_PY), str(PEERS / "load_check.py"), "--dir", str(out), "--format", "gptq",
                        "--ids", str(ids), "--out", str(tmp_path / "chk")], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    peer = np.load(tmp_path / "chk" / "logits.npy")
    # the peer dequantizes (q - z) * s in float16 (the scales' dtype) and then runs the float32
    # model: lowbit's weights rounded to float16 give its logits up to float32 summation order
    # (bound: a few ulp of the logits' magnitude ~ 40 * 2^-23 * sqrt(K) per layer: 1e-3 is loose)
    ref16 = fp16_weight_logits(lm, IDS)
    assert np.abs(peer - ref16).max() <= 1e-3
    # and the peer's dequantized weights are lowbit's, rounded to float16 (half an fp16 ulp)
    deq = load_file(str(tmp_path / "chk" / "dequant.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        ours = lm.model.get_submodule(name).dequantize_weight(torch.float32)
        assert torch.equal(deq[f"{name}.weight"], ours.half().float()), name
    ours = logits(lm.model).numpy()
    assert (peer.argmax(-1) == ours.argmax(-1)).mean() >= 0.85


@pytest.mark.slow
def test_autoround_gptq_checkpoint_loads_in_lowbit():
    ckpt = PEER_OUT / "autoround-gptq-w4g64-sym-rtn"
    peer_logits = ckpt / "peer_check" / "logits.npy"
    ids_file = PEER_OUT / "inputs" / "eval_ids.npy"
    if not (ckpt.is_dir() and peer_logits.is_file() and ids_file.is_file()):
        pytest.skip(f"{ckpt} with peer_check/logits.npy absent (bench/peers/autoround_export.py + load_check.py)")
    lm = load_model(ckpt)
    assert get_format("gptq").detect(ckpt) and lm.meta["format"] == "gptq"
    assert sum(isinstance(m, QuantLinear) for m in lm.model.modules()) == 210
    ids = torch.as_tensor(np.load(ids_file)).reshape(1, -1)
    with torch.no_grad():
        ours = lm.model(ids).logits.numpy()
    peer = np.load(peer_logits)
    # the peer's logits are those of its weights rounded to float16 (see above); the AutoRound
    # file's weights are exactly float16 numbers after dequantization only when (q - z) * s is,
    # so compare with lowbit's fp16-rounded weights: summation order only
    assert np.abs(fp16_weight_logits(lm, ids) - peer).max() <= 1e-3
    assert (ours.argmax(-1) == peer.argmax(-1)).mean() >= 0.95
