"""compressed-tensors checkpoints: golden int32 packing, exact round trip on the real bundled
model, refusals (ragged groups, g_idx, codebooks, broken files), W8A8 / fp8 variants, the CLI,
and the peers: the compressed-tensors package decompressing our files, transformers loading them,
and lowbit reading llm-compressor's own output.

Peer tests run bench/ct_peer_check.py in llm-compressor's venv (ROOT/bench/.venv-llmc, made by
bench/setup_peers.sh; LOWBIT_PEERS_ROOT points elsewhere) and skip when it is absent.
"""
from __future__ import annotations

import copy
import hashlib
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
from lowbit.cli import main as cli_main
from lowbit.errors import LowbitError
from lowbit.export import QuantizedModel, detect_format, get_format
from lowbit.export import compressed_tensors as ct
from lowbit.export import ct_layout
from lowbit.models import LoadedModel, load_model
from lowbit.nn.qlinear import QuantLinear
from lowbit.numerics import int_scheme
from lowbit.numerics.scheme import Scheme
from lowbit.recipe import Recipe, Rule

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("LOWBIT_PEERS_ROOT", ROOT))
LLMC_PY = PEERS / "bench" / ".venv-llmc" / "bin" / "python"
CHECK = ROOT / "bench" / "ct_peer_check.py"
PEER_OUT = PEERS / "bench" / "out" / "peers"
IDS = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 1001]])

# block 0: GPTQ act-order with static groups, 4-bit g64 asymmetric (actorder "weight", packed zero
# points); block 1: RTN 3-bit g64 symmetric (3-bit dense packing); block 2's MLP: RTN 8-bit per
# channel symmetric. Three config_groups; every other linear is float and goes in "ignore".
MIXED = Recipe("ct-mixed", [
    Rule(r"model\.layers\.0\.", int_scheme(4, 64), "gptq", {"act_order": True, "static_groups": True}),
    Rule(r"model\.layers\.1\.", int_scheme(3, 64, symmetric=True), "rtn"),
    Rule(r"model\.layers\.2\.mlp\.", int_scheme(8, None, True), "rtn")],
    calibration={"n_samples": 4, "seq_len": 64, "batch_size": 4})


def quantize(smollm2, recipe):
    model = copy.deepcopy(smollm2.model)
    rep = api.quantize(model, recipe, tokenizer=smollm2.tokenizer)
    return LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256), rep


@pytest.fixture(scope="module")
def mixed(smollm2, tmp_path_factory):
    lm, rep = quantize(smollm2, MIXED)
    out = api.export(lm, rep, tmp_path_factory.mktemp("ct") / "mixed", format="compressed-tensors")
    return lm, rep, out


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ---------------------------------------------------------------------------------------------
# golden packing (hand-checkable words) and one real layer
# ---------------------------------------------------------------------------------------------
def test_golden_packing_words():
    # 4-bit, 8 values per word, value i at bits 4i..4i+3: 0..7 -> 0x76543210; eight 8s -> 0x88888888
    codes = torch.tensor([list(range(8)) + [15] * 8, [8] * 16], dtype=torch.uint8)
    w = ct_layout.pack(codes, 4, axis=1)
    assert w.dtype == torch.int32 and w.tolist() == [[0x76543210, -1], [0x88888888 - 2**32] * 2]
    # 8-bit, 4 per word: [1, 2, 3, 4] -> 0x04030201
    assert ct_layout.pack(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 8, 1).tolist() == [[0x04030201]]
    # 5-bit: 32 ones make the 160-bit stream sum(1 << 5i) cut into 5 words, low word first; value 6
    # straddles words 0|1 (bits 30-34), so word 0 = 0x42108421 and word 1 = 0x10842108
    w5 = ct_layout.pack(torch.ones(1, 32, dtype=torch.uint8), 5, 1)
    assert w5.tolist() == [[0x42108421, 0x10842108, 0x84210842 - 2**32, 0x21084210, 0x08421084]]
    # ragged length: 100 3-bit values take ceil(300/32) = 10 words (not 12 = whole 32-value runs)
    c3 = torch.randint(0, 8, (3, 100), dtype=torch.uint8)
    w3 = ct_layout.pack(c3, 3, 1)
    assert w3.shape == (3, 10) and torch.equal(ct_layout.unpack(w3, 3, 100, 1), c3)
    # zero points pack along dim 0 (output rows): column 0 holds 0..7 -> word 0x76543210
    z = torch.stack([torch.arange(8), torch.full((8,), 1)], dim=1).to(torch.uint8)      # (8 rows, 2 groups)
    assert ct_layout.pack(z, 4, axis=0).tolist() == [[0x76543210, 0x11111111]]
    for bits in range(1, 9):
        for n in (1, 31, 32, 33, 577):
            c = torch.randint(0, 2**bits, (4, n), dtype=torch.uint8)
            p = ct_layout.pack(c, bits, 1)
            assert p.shape == (4, -(-n * bits // 32)) and torch.equal(ct_layout.unpack(p, bits, n, 1), c), (bits, n)


def test_real_layer_words_are_the_shifted_sum(mixed):
    """Every word of a real packed layer equals sum_i code[8k+i] << 4i, computed independently."""
    lm, _, out = mixed
    qw = lm.model.model.layers[0].self_attn.q_proj.qweight
    words = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight_packed"]
    c = qw.qdata.to(torch.int64).reshape(qw.shape[0], -1, 8)
    expect = (c << (4 * torch.arange(8))).sum(-1)
    expect = torch.where(expect >= 2**31, expect - 2**32, expect).to(torch.int32)    # two's complement
    assert words.shape == (576, 72) and torch.equal(words, expect)


# ---------------------------------------------------------------------------------------------
# round trip, config, determinism
# ---------------------------------------------------------------------------------------------
def test_round_trip_is_exact(mixed):
    lm, rep, out = mixed
    assert detect_format(out).name == "compressed-tensors"
    back = load_model(out)
    n = 0
    for name, mod in lm.model.named_modules():
        if isinstance(mod, QuantLinear):
            other = back.model.get_submodule(name)
            assert isinstance(other, QuantLinear), name
            assert torch.equal(mod.qdata, other.qdata) and torch.equal(mod.scale, other.scale), name
            assert torch.equal(mod.zero_point, other.zero_point), name
            n += 1
    assert n == 7 + 7 + 3
    # codes and fp16-exact scales come back bit for bit, so the forward is the same arithmetic
    assert torch.equal(logits(lm.model), logits(back.model))
    assert back.model.lm_head.weight is back.model.model.embed_tokens.weight


def test_config_groups_and_tensors(mixed):
    _, _, out = mixed
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    assert q["format"] == "pack-quantized" and q["version"] == ct.CT_VERSION
    groups = list(q["config_groups"].values())
    assert [g["targets"] == ["Linear"] for g in groups] == [False, False, True]    # largest last
    w = {(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["symmetric"],
          g["weights"]["actorder"]) for g in groups}
    assert w == {(4, "group", False, "weight"), (3, "group", True, None), (8, "channel", True, None)}
    assert "lm_head" in q["ignore"] and "model.layers.3.mlp.up_proj" in q["ignore"]
    assert "model.layers.2.self_attn.q_proj" in q["ignore"]
    # each quantized module matches exactly one group under compressed-tensors' resolution
    plan, ignore = ct._plan(q, out, "refuse")
    back = load_model(out)
    for name, mod in back.model.named_modules():
        if isinstance(mod, QuantLinear):
            hits = [e for e in plan[:2] if any(ct._match(name, t) for t in e[0])]
            assert len(hits) <= 1, name
            assert ct._scheme_of(name, torch.nn.Linear(1, 1), plan, ignore)[1].bits == mod.scheme.bits
    t = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"
    assert t[f"{p}.weight_packed"].shape == (576, 1536 * 4 // 32) and t[f"{p}.weight_scale"].dtype == torch.float16
    assert t[f"{p}.weight_zero_point"].dtype == torch.int32 and t[f"{p}.weight_zero_point"].shape == (576 * 4 // 32, 24)
    assert t[f"{p}.weight_shape"].tolist() == [576, 1536]
    assert f"model.layers.1.mlp.up_proj.weight_zero_point" not in t                      # symmetric
    assert t["model.layers.1.mlp.up_proj.weight_packed"].shape == (1536, 576 * 3 // 32)
    assert t["model.layers.2.mlp.up_proj.weight_packed"].shape == (1536, 576 // 4)        # 8-bit packed
    assert "lm_head.weight" not in t and not any(k.endswith("g_idx") for k in t)


def test_same_inputs_give_the_same_bytes(smollm2, mixed, tmp_path):
    _, _, out = mixed
    lm, rep = quantize(smollm2, MIXED)
    again = api.export(lm, rep, tmp_path / "again", format="compressed-tensors")
    for f in sorted(p.name for p in out.iterdir()):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------
# refusals on write
# ---------------------------------------------------------------------------------------------
def test_write_refuses_what_the_format_cannot_hold(smollm2, tmp_path):
    fmt = get_format("compressed-tensors")
    lm, rep = quantize(smollm2, Recipe("ragged", [Rule(r"model\.layers\.0\.self_attn\.q_proj$", int_scheme(4, 128), "rtn")]))
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.self_attn\.q_proj.*group_size 128.*576.*g64"):
        fmt.write(QuantizedModel.from_report(lm, rep), tmp_path / "r")
    lm, rep = quantize(smollm2, Recipe("nf4", [Rule(r"model\.layers\.0\.mlp\.up_proj$",
                                                    Scheme(format="nf4", group_size=64), "rtn")]))
    with pytest.raises(LowbitError, match=r"up_proj.*nf4"):
        fmt.write(QuantizedModel.from_report(lm, rep), tmp_path / "n")
    assert not (tmp_path / "r").exists() and not (tmp_path / "n").exists()


def test_dynamic_act_order_g_idx_refused_or_legacy(smollm2, tmp_path):
    recipe = Recipe("ao", [Rule(r"model\.layers\.0\.mlp\.", int_scheme(4, 64), "gptq", {"act_order": True})],
                    calibration={"n_samples": 4, "seq_len": 64, "batch_size": 4})
    lm, rep = quantize(smollm2, recipe)
    with pytest.raises(LowbitError, match=r"g_idx.*actorder-static.*--format gptq"):
        api.export(lm, rep, tmp_path / "a", format="compressed-tensors")
    out = api.export(lm, rep, tmp_path / "legacy", format="compressed-tensors", legacy_g_idx=True)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    back = load_model(out)
    a, b = lm.model.model.layers[0].mlp.up_proj, back.model.model.layers[0].mlp.up_proj
    assert b.g_idx is not None and torch.equal(a.g_idx, b.g_idx) and torch.equal(a.qdata, b.qdata)
    assert torch.equal(logits(lm.model), logits(back.model))


# ---------------------------------------------------------------------------------------------
# W8A8 and fp8
# ---------------------------------------------------------------------------------------------
W8 = Recipe("w8", [Rule(r"model\.layers\.0\.", int_scheme(8, None, True), "rtn")])
FP8 = Recipe("fp8", [Rule(r"model\.layers\.0\.", Scheme(format="fp8_e4m3", granularity="channel"), "rtn")])
A8 = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}


@pytest.fixture(scope="module")
def w8a8(smollm2, tmp_path_factory):
    lm, rep = quantize(smollm2, W8)
    return lm, api.export(lm, rep, tmp_path_factory.mktemp("ct") / "w8a8", format="compressed-tensors",
                          input_activations=A8)


def test_w8a8_int_quantized(w8a8):
    lm, out = w8a8
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    g = q["config_groups"]["group_0"]
    assert q["format"] == g["format"] == "int-quantized"
    assert g["input_activations"]["strategy"] == "token" and g["input_activations"]["dynamic"] is True
    t = load_file(str(out / "model.safetensors"))
    w = t["model.layers.0.mlp.up_proj.weight"]
    qd = lm.model.model.layers[0].mlp.up_proj.qdata
    assert w.dtype == torch.int8 and torch.equal(w.to(torch.int16) + 128, qd.to(torch.int16))
    back = ct.read(out, activations="float")
    assert torch.equal(logits(lm.model), logits(back.model))   # weights exact, activations float on both
    # the default runs the checkpoint's activations as it says: int8 per token, dynamic
    run = load_model(out)
    ref = copy.deepcopy(lm.model)
    from lowbit.nn.actquant import ActQuant
    from lowbit.numerics.activation import ActScheme
    acts = {n: m.act_quant for n, m in run.model.named_modules() if getattr(m, "act_quant", None) is not None}
    assert sorted(acts) == sorted(n for n, m in ref.named_modules() if isinstance(m, QuantLinear))
    assert {a.scheme.short_name() for a in acts.values()} == {"a8-dyn-token"}
    for n in acts:
        ref.get_submodule(n).act_quant = ActQuant(ActScheme("int8", True, "token"))
    assert torch.equal(logits(ref), logits(run.model)) and not torch.equal(logits(ref), logits(lm.model))
    with pytest.raises(LowbitError, match=r"activations expected 'run' or 'float'"):
        ct.read(out, activations="refuse")
    with pytest.raises(LowbitError, match="input_activations.strategy"):
        ct_layout.activation_args({"strategy": "channel"})


def test_fp8_weight_only_is_naive_quantized(smollm2, tmp_path):
    lm, rep = quantize(smollm2, FP8)
    out = api.export(lm, rep, tmp_path / "fp8", format="compressed-tensors")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "naive-quantized" and q["config_groups"]["group_0"]["weights"]["type"] == "float"
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    back = load_model(out)
    assert torch.equal(logits(lm.model), logits(back.model))


# ---------------------------------------------------------------------------------------------
# broken files
# ---------------------------------------------------------------------------------------------
def _peer_like(out: Path, dst: Path) -> Path:
    """A copy without our manifest: what a peer's checkpoint looks like to the reader."""
    shutil.copytree(out, dst)
    (dst / "lowbit_manifest.json").unlink()
    return dst


def test_mutated_and_truncated_files(mixed, tmp_path):
    _, _, out = mixed
    bad = tmp_path / "flip"
    shutil.copytree(out, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LowbitError, match=r"model\.safetensors: sha256 does not match"):
        load_model(bad)
    trunc = _peer_like(out, tmp_path / "trunc")
    raw = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LowbitError, match=r"model\.safetensors"):
        load_model(trunc)
    key = "model.layers.1.self_attn.o_proj.weight_packed"
    for name, change, what in (
            ("cols", lambda t: t[key][:, :-1].contiguous(), r"weight_packed: expected int32 \(576, 54\)"),
            ("dtype", lambda t: t[key].to(torch.int64), r"weight_packed: expected int32"),
            ("shape", lambda t: torch.tensor([576, 577]), r"weight_shape is \[576, 577\]")):
        d = _peer_like(out, tmp_path / name)
        t = load_file(str(d / "model.safetensors"))
        t[key if name != "shape" else key.replace("packed", "shape")] = change(t)
        save_file(t, str(d / "model.safetensors"))
        with pytest.raises(LowbitError, match=r"model\.layers\.1\.self_attn\.o_proj\." + what):
            load_model(d)
    # older compressed-tensors files keep an all-zero zero point for symmetric layers: accepted;
    # a non-zero one contradicts the scheme and is refused
    zkey = "model.layers.1.mlp.up_proj.weight_zero_point"
    for name, value in (("symz0", 0), ("symz1", 1)):
        d = _peer_like(out, tmp_path / name)
        t = load_file(str(d / "model.safetensors"))
        t[zkey] = torch.full((1536, 9), value, dtype=torch.int8)
        save_file(t, str(d / "model.safetensors"))
        if value == 0:
            assert isinstance(load_model(d).model.model.layers[1].mlp.up_proj, QuantLinear)
        else:
            with pytest.raises(LowbitError, match=zkey.replace(".", r"\.") + ": a symmetric"):
                load_model(d)
    d = _peer_like(out, tmp_path / "noscale")
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.0.mlp.gate_proj.weight_scale"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight_scale"):
        load_model(d)
    for field, value, what in (("format", "nvfp4-pack-quantized", "nvfp4-pack-quantized"),
                               ("sparsity_config", {"format": "sparse-24-bitmask"}, "sparsity"),
                               ("quantization_status", "frozen", "quantization_status 'frozen'")):
        d = _peer_like(out, tmp_path / field)
        cfg = json.loads((d / "config.json").read_text())
        if field == "format":
            for g in cfg["quantization_config"]["config_groups"].values():
                g["format"] = value
        else:
            cfg["quantization_config"][field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(LowbitError, match=r"config\.json.*" + what):
            load_model(d)


# ---------------------------------------------------------------------------------------------
# CLI end to end
# ---------------------------------------------------------------------------------------------
def test_cli_quantize_compressed_tensors_then_eval(smollm2, tmp_path, capsys):
    from lowbit.eval import perplexity
    out = tmp_path / "ct"
    rc = cli_main(["quantize", "smollm2-135m", "--recipe", "w4g64-rtn", "--format", "compressed-tensors",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert detect_format(out).name == "compressed-tensors"
    rc = cli_main(["eval", str(out), "--metrics", "ppl", "--seq-len", "128", "--max-tokens", "256",
                   "--backend", "reference", "--no-progress", "--json", str(tmp_path / "e.json")])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "e.json").read_text())
    # the read-back model's perplexity is the in-memory quantized model's, to the bit
    lm, _ = quantize(smollm2, "w4g64-rtn")
    assert rec["ppl"]["ppl"] == perplexity(lm.model, lm.tokenizer, seq_len=128, max_tokens=256, progress=False).ppl


# ---------------------------------------------------------------------------------------------
# peers (slow): the compressed-tensors package and transformers on our files; llm-compressor's files in lowbit
# ---------------------------------------------------------------------------------------------
needs_llmc = pytest.mark.skipif(not LLMC_PY.is_file(), reason=f"no llm-compressor venv at {LLMC_PY} "
                                "(bash bench/setup_peers.sh llmc)")


def peer(*args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([str(LLMC_PY), str(CHECK), *map(str, args)], capture_output=True, text=True,
                       timeout=900, env=env)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"], res
    return res


def logit_tol(ref: torch.Tensor) -> float:
    """Same fp32 weights on both sides: only the summation order of two torch builds' fp32 kernels
    differs. A dot product of K terms in fp32 is off by at most ~K * 2^-24 * sum|terms|; over 30
    blocks that stays far below 1e-4 of the logits' scale, which is the bound asserted."""
    return 1e-4 * float(ref.abs().max())


@pytest.mark.slow
@needs_llmc
def test_compressed_tensors_package_reads_our_checkpoint(mixed, tmp_path):
    lm, _, out = mixed
    cfg = peer("config", out)
    assert cfg["format"] == "pack-quantized" and len(cfg["groups"]) == 3
    peer("dequant", out, tmp_path / "deq.safetensors")
    deq = load_file(str(tmp_path / "deq.safetensors"))
    assert len(deq) == 17
    for name, mod in lm.model.named_modules():
        if isinstance(mod, QuantLinear):
            # compressed-tensors decompresses in the scale dtype (fp16): (q - z) * s is exact in fp32
            # (an 11-bit scale times an integer under 2^8), so its fp16 result is ours rounded to fp16
            assert torch.equal(deq[f"{name}.weight"], mod.dequantize_weight().half().float()), name
    np.save(tmp_path / "ids.npy", IDS.numpy())
    peer("logits", out, tmp_path / "ids.npy", tmp_path / "lg.npy")
    theirs, ours = torch.from_numpy(np.load(tmp_path / "lg.npy")), logits(lm.model)
    assert (theirs - ours).abs().max() <= logit_tol(ours)


@pytest.mark.slow
@needs_llmc
def test_packing_equals_pack_to_int32_and_ragged_is_refused_by_the_package(mixed, tmp_path):
    lm, _, _ = mixed
    codes = lm.model.model.layers[0].self_attn.q_proj.qdata
    inp = {}
    for bits in range(1, 9):
        c = (codes >> max(0, 4 - bits)) if bits < 4 else (codes.to(torch.int16) << (bits - 4)).to(torch.uint8)
        inp[f"q.b{bits}.d1"] = (c.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        inp[f"z.b{bits}.d0"] = inp[f"q.b{bits}.d1"][:, :9].contiguous()
    save_file(inp, str(tmp_path / "in.safetensors"))
    peer("pack", tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    theirs = load_file(str(tmp_path / "out.safetensors"))
    for k, v in inp.items():
        bits, axis = int(k.split(".b")[1].split(".d")[0]), int(k[-1])
        unsigned = (v.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        assert torch.equal(ct_layout.pack(unsigned, bits, axis), theirs[k]), k
    res = peer("ragged")
    assert res["refused"] and "divisble" in res["error"]     # the package's own spelling


@pytest.mark.slow
@needs_llmc
@pytest.mark.parametrize("name", ["llmc-w4a16-g64-asym", "llmc-w4a16-g64-sym"])
def test_llm_compressor_checkpoint_reads_in_lowbit(name, tmp_path):
    d = PEER_OUT / name
    if not (d / "config.json").is_file():
        pytest.skip(f"no peer checkpoint {d} (bench/peers/llmc_export.py makes it)")
    back = load_model(d)
    assert sum(isinstance(m, QuantLinear) for m in back.model.modules()) == 210
    peer("dequant", d, tmp_path / "deq.safetensors")
    deq = load_file(str(tmp_path / "deq.safetensors"))
    for n, m in back.model.named_modules():
        if isinstance(m, QuantLinear):   # fp32 scales in llm-compressor's file: identical arithmetic
            assert torch.equal(deq[f"{n}.weight"], m.dequantize_weight()), n
    np.save(tmp_path / "ids.npy", IDS.numpy())
    peer("logits", d, tmp_path / "ids.npy", tmp_path / "lg.npy")
    theirs, ours = torch.from_numpy(np.load(tmp_path / "lg.npy")), logits(back.model)
    assert (theirs - ours).abs().max() <= logit_tol(ours)


@pytest.mark.slow
@needs_llmc
def test_llm_compressor_w8a8_weights_exact(tmp_path):
    d = PEER_OUT / "llmc-w8a8"
    if not (d / "config.json").is_file():
        pytest.skip(f"no peer checkpoint {d}")
    run = load_model(d)                       # default: its int8 activations run as the file says
    assert all(m.act_quant is not None for m in run.model.modules() if isinstance(m, QuantLinear))
    back = ct.read(d, activations="float")
    peer("dequant", d, tmp_path / "deq.safetensors")
    deq = load_file(str(tmp_path / "deq.safetensors"))
    for n, m in back.model.named_modules():
        if isinstance(m, QuantLinear):
            assert m.scheme.short_name() == "w8cs" and torch.equal(deq[f"{n}.weight"], m.dequantize_weight()), n


@pytest.mark.slow
@needs_llmc
def test_compressed_tensors_package_reads_our_w8a8_and_fp8(w8a8, smollm2, tmp_path):
    lm, out = w8a8
    assert peer("config", out)["format"] == "int-quantized"
    peer("dequant", out, tmp_path / "deq.safetensors")
    deq = load_file(str(tmp_path / "deq.safetensors"))
    for n, m in lm.model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(deq[f"{n}.weight"], m.dequantize_weight().half().float()), n
    flm, rep = quantize(smollm2, FP8)
    fout = api.export(flm, rep, tmp_path / "fp8", format="compressed-tensors")
    assert peer("config", fout)["format"] == "naive-quantized"
    peer("dequant", fout, tmp_path / "fdeq.safetensors")
    fdeq = load_file(str(tmp_path / "fdeq.safetensors"))
    for n, m in flm.model.named_modules():
        if isinstance(m, QuantLinear):
            # fp8 (4 significant bits) times an fp16 scale is exact in fp32; the package rounds to the scale dtype
            s = load_file(str(fout / "model.safetensors"))[f"{n}.weight_scale"]
            want = m.dequantize_weight().to(s.dtype).float()
            assert torch.equal(fdeq[f"{n}.weight"], want), n
