"""bitsandbytes-style 4-bit / 8-bit loading (numerics/bnb4.py, nn/bnb4.py, export/bnb.py) on the
real bundled model; peer tests run transformers + bitsandbytes in bench/.venv-bnb (skipped without)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lowbit.api as api
from lowbit.data.text import tokenize_text
from lowbit.errors import LowbitError
from lowbit.export import detect_format
from lowbit.nn.bnb4 import BnbConfig, Linear4bit, Linear8bit, memory_footprint, quantize_model
from lowbit.numerics import bnb4 as nb

ROOT = Path(__file__).resolve().parents[1]
BNB_PY = Path(os.environ.get("LOWBIT_BNB_PY", ROOT / "bench/.venv-bnb/bin/python"))
PEER = ROOT / "bench/peers/bnb_peer.py"
needs_bnb = pytest.mark.skipif(not (BNB_PY.is_file() and PEER.is_file()),
                               reason="peer venv bench/.venv-bnb absent (bash bench/setup_peers.sh bnb)")


def _ids(lm, n: int = 64) -> torch.Tensor:
    """The first n tokens of the bundled evaluation text (real Wikipedia prose), (1, n)."""
    from lowbit.data.text import load_text
    return tokenize_text(lm.tokenizer, load_text("wiki-evaluation")[:2000])[:n].reshape(1, -1)


def _max_gap(table: torch.Tensor) -> float:
    s = table.sort().values
    return float((s[1:] - s[:-1]).max())


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 128), (33, 65), (7, 3)])
def test_4bit_roundtrip_within_half_a_step(qt, shape):
    w = torch.randn(*shape) * 0.02
    packed, absmax = nb.quantize_4bit(w, qt, 64)
    n = w.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert absmax.numel() == (n + 63) // 64
    back = nb.dequantize_4bit(packed, absmax, shape, qt, 64)
    # nearest of the table: error <= half the widest gap, times the block's absmax
    am = absmax[torch.arange(n) // 64].reshape(shape)
    assert bool(((back - w).abs() <= _max_gap(nb.code_table(qt)) / 2 * am * (1 + 1e-6)).all())
    # every block's absmax is reproduced exactly (+-1 is a table entry in both types)
    flat = w.reshape(-1)
    i = torch.arange(n).reshape(-1)[flat.abs() == am.reshape(-1)]
    assert torch.equal(back.reshape(-1)[i], flat[i])


def test_tables_are_bitsandbytes_layout():
    nf4, fp4 = nb.code_table("nf4"), nb.code_table("fp4")
    assert nf4[0] == -1 and nf4[15] == 1 and nf4[7] == 0 and bool((nf4[1:] > nf4[:-1]).all())
    # bitsandbytes' fp4: bit pattern s.e1e0.m, values 0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4 (x12: 0 .0625 8 12 4 6 2 3)
    assert torch.allclose(fp4[:8] * 12, torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]))
    assert torch.equal(fp4[8:], -fp4[:8])
    dyn = nb.dynamic_map_8bit()
    assert dyn.numel() == 256 and bool((dyn[1:] >= dyn[:-1]).all()) and dyn[-1] == 1 and (dyn == 0).any()
    # packing: first value in the high nibble
    p, _ = nb.quantize_4bit(torch.tensor([1.0, -1.0]), "nf4", 64)
    assert p.tolist() == [0xF0]


def test_double_quant_error_and_bytes():
    absmax = torch.rand(5184) * 0.1 + 0.01        # q_proj of SmolLM2: 576 * 576 / 64 blocks (ragged / 256)
    d = nb.double_quantize(absmax)
    back = nb.undo_double_quant(d["absmax"], d["nested_absmax"], d["nested_quant_map"], d["offset"])
    assert d["absmax"].dtype == torch.uint8 and d["nested_absmax"].numel() == 21
    # nearest dynamic-map entry: error <= half its widest gap (0.9 / 64 between 0.1 and 1) x block absmax
    am2 = d["nested_absmax"][torch.arange(5184) // 256]
    assert bool(((back - absmax).abs() <= _max_gap(nb.dynamic_map_8bit()) / 2 * am2 * (1 + 1e-5) + 1e-9).all())
    # QLoRA: 32 / 64 = 0.5 bits per parameter of constants -> 8 / 64 + 32 / (64 * 256) = 0.127
    n = 576 * 576
    table = 16 * 32 / n                                   # the 16 float32 code-table entries
    assert nb.bits_per_param(n, 64, False) == pytest.approx(4.5 + table)
    # 5184 absmax -> 21 nested blocks (the last one ragged), one offset, a 256-entry dynamic map
    assert nb.bits_per_param(n, 64, True) == pytest.approx(4 + 8 / 64 + (21 * 32 + 32 + 256 * 32) / n + table)


def test_refuses_bad_input():
    with pytest.raises(LowbitError, match="NaN/inf"):
        nb.quantize_4bit(torch.tensor([1.0, float("nan")]), "nf4", 64, what="model.x.weight")
    with pytest.raises(LowbitError, match="quant_type"):
        nb.code_table("int4")
    with pytest.raises(LowbitError, match="block_size"):
        BnbConfig("nf4", block_size=48).check()
    with pytest.raises(LowbitError, match="quantization"):
        api.load("smollm2-135m", quantization="nf3")
    with pytest.raises(LowbitError, match="double_quant"):
        api.load("smollm2-135m", double_quant=True)


@pytest.fixture(scope="module")
def nf4dq(smollm2):
    model = copy.deepcopy(smollm2.model)
    with torch.no_grad():
        ref = model(_ids(smollm2)).logits
    rep = quantize_model(model, BnbConfig("nf4", double_quant=True))
    return model, rep, ref


def test_load_nf4_real_model(nf4dq, smollm2):
    model, rep, ref = nf4dq
    assert rep["layers"] == 210 and rep["skipped"] == ["lm_head"]
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    # float32 model: 4.127 bits for the 210 linears, the 113 MB fp32 embedding (tied lm_head) unchanged
    n_lin = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    emb = smollm2.model.get_input_embeddings().weight.numel() * 4
    assert memory_footprint(model) == rep["bytes_after"]
    assert abs(rep["bytes_after"] - emb - n_lin * 4.127 / 8) < 0.01 * rep["bytes_after"]
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    w = smollm2.model.get_submodule("model.layers.0.self_attn.q_proj").weight
    am = q.absmax_float()[torch.arange(w.numel()) // 64].reshape(w.shape)
    step = _max_gap(nb.code_table("nf4")) / 2
    # nearest code against the double-quantized absmax: within half a step of the reconstructed scale,
    # plus the scale's own error (|a - a_hat| <= 1 dynamic-map half-gap of its 256-block absmax)
    err_am = _max_gap(nb.dynamic_map_8bit()) / 2 * float(q.nested_absmax.max())
    assert bool(((q.dequantize() - w).abs() <= step * am + err_am * 1.01).all())
    with torch.no_grad():
        out = model(_ids(smollm2)).logits
    assert bool(torch.isfinite(out).all())
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_to_never_requantizes(nf4dq):
    model, _, _ = nf4dq
    q = model.get_submodule("model.layers.1.mlp.down_proj")
    before = {k: v.clone() for k, v in q.named_buffers()}
    q.to(torch.float16)
    for k, v in q.named_buffers():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    q.to(torch.float32)


def test_gradient_reaches_input_not_base(nf4dq):
    model, _, _ = nf4dq
    q = model.get_submodule("model.layers.2.self_attn.o_proj")
    x = torch.randn(3, q.in_features, requires_grad=True)
    y = q(x)
    y.sum().backward()
    w = q.dequantize()
    assert torch.allclose(x.grad, torch.ones(3, q.out_features) @ w, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def test_bnb_export_roundtrip(nf4dq, smollm2, tmp_path):
    model, _, _ = nf4dq
    lm = copy.copy(smollm2)
    lm.model = model
    out = api.export(lm, None, tmp_path / "dq", "bnb")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert cfg["bnb_4bit_use_double_quant"] is True and cfg["load_in_4bit"] is True
    assert detect_format(out).name == "bnb"
    back = api.load(out)
    assert memory_footprint(back.model) == memory_footprint(model)
    with torch.no_grad():
        assert torch.equal(back.model(_ids(smollm2)).logits, model(_ids(smollm2)).logits)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        qs = f.get_tensor("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4")
    for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"):
        assert f"model.layers.0.self_attn.q_proj.weight{suffix}" in keys
    meta = json.loads(bytes(qs.tolist()).decode())
    assert meta["shape"] == [576, 576] and meta["blocksize"] == 64 and meta["nested_blocksize"] == 256
    # same model, same bytes
    out2 = api.export(lm, None, tmp_path / "dq2", "bnb")
    assert (out / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()


def test_export_refusals(nf4dq, smollm2, tmp_path):
    model, _, _ = nf4dq
    lm = copy.copy(smollm2)
    lm.model = model
    with pytest.raises(LowbitError, match="only --format bnb"):
        api.export(lm, None, tmp_path / "g", "gptq")
    with pytest.raises(LowbitError, match="no 4-bit"):
        api.export(smollm2, None, tmp_path / "f", "bnb")
    out = api.export(lm, None, tmp_path / "bad", "bnb")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(out / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"),
                                                                                               dtype=torch.uint8)
    save_file(sd, str(out / "model.safetensors"))
    from lowbit.export.bnb import read
    with pytest.raises(LowbitError, match="quant_state.bitsandbytes__nf4"):
        read(out, verify_files=False)


def _peer(*args, timeout=900):
    r = subprocess.run([str(BNB_PY), str(PEER), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_bnb
def test_transformers_bitsandbytes_loads_our_nf4(nf4dq, smollm2, tmp_path):
    from safetensors.torch import load_file, save_file
    model, _, _ = nf4dq
    lm = copy.copy(smollm2)
    lm.model = model
    out = api.export(lm, None, tmp_path / "ours", "bnb")
    save_file({"ids": _ids(smollm2)}, str(tmp_path / "ids.safetensors"))
    res = _peer("load", out, "--ids", tmp_path / "ids.safetensors", "--out", tmp_path / "chk")
    assert res["classes"] == {"Linear4bit": 210}
    # transformers' footprint leaves out quant_state; with it, the bytes are ours
    assert res["footprint"] + res["quant_state_bytes"] == memory_footprint(model)
    theirs = load_file(str(tmp_path / "chk" / "logits.safetensors"))["logits"]
    with torch.no_grad():
        ours = model(_ids(smollm2)).logits
    # same dequantized weights (table[code] * absmax in float32); F.linear in both: float32
    # summation order only -> a few ulp of the largest logit
    assert (theirs - ours).abs().max() <= 64 * torch.finfo(torch.float32).eps * ours.abs().max()


@pytest.mark.slow
@needs_bnb
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bitsandbytes_own_save_loads_in_lowbit(quant, smollm2, tmp_path):
    from safetensors.torch import load_file, save_file
    save_file({"ids": _ids(smollm2)}, str(tmp_path / "ids.safetensors"))
    extra = ["--double-quant"] if quant == "nf4" else []
    _peer("quantize", smollm2.path, "--quant", quant, *extra, "--save", tmp_path / "theirs", "--ids",
          tmp_path / "ids.safetensors", "--out", tmp_path / "chk")
    lm = api.load(tmp_path / "theirs")
    assert lm.meta["format"] == "bnb"
    kind = Linear4bit if quant == "nf4" else Linear8bit
    assert sum(isinstance(m, kind) for m in lm.model.modules()) == 210
    theirs = load_file(str(tmp_path / "chk" / "logits.safetensors"))["logits"]
    with torch.no_grad():
        ours = lm.model(_ids(smollm2)).logits
    if quant == "nf4":      # their codes and constants, dequantized as they do: summation order only
        assert (theirs - ours).abs().max() <= 64 * torch.finfo(torch.float32).eps * ours.abs().max()
    else:
        # LLM.int8() also rounds the activations to int8 per token (and fp16) in its forward; our
        # Linear8bit is weight-only. The weight codes must be exactly ours for the same float weights
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
            lin = smollm2.model.get_submodule(name)
            mine = Linear8bit.from_linear(lin)
            got = lm.model.get_submodule(name)
            assert torch.equal(got.weight_int8, mine.weight_int8) and torch.allclose(got.SCB, mine.SCB)
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.75
