"""AWQ GEMM checkpoints (lowbit.export.awq): AutoAWQ's interleaved packing (golden words and a real
layer), bit-exact round trips on the real bundled model, refusals (ragged groups, act-order
g_idx, other bit widths, mixed group sizes), mutated / truncated files, and transformers +
GPTQModel (bench/.venv-gptq) loading our file."""
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
from lowbit.export import awq as A
from lowbit.methods import get_method
from lowbit.models import LoadedModel, load_model
from lowbit.nn.qlinear import QuantLinear, set_submodule
from lowbit.numerics import int_scheme
from lowbit.numerics.qweight import QuantizedWeight
from lowbit.recipe import Recipe, Rule

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 1001]])


def quantized(smollm2, recipe):
    model = copy.deepcopy(smollm2.model)
    rep = api.quantize(model, recipe, tokenizer=smollm2.tokenizer, progress=False)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    return lm, rep


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_golden_interleave():
    # 8 outputs whose codes are 0..7 for every input: nibble i of the word holds output ORDER[i],
    # ORDER = [0, 2, 4, 6, 1, 3, 5, 7] -> nibbles (low first) 0 2 4 6 1 3 5 7 = 0x75316420
    codes = torch.arange(8, dtype=torch.uint8)[:, None].expand(8, 32).contiguous()     # (out 8, in 32)
    scheme = int_scheme(4, 32)
    zero = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [8.0]])    # zero of output n: n + 1
    qw = QuantizedWeight(codes, torch.ones(8, 1), zero, scheme)
    t = A.pack_layer("L", qw)
    assert t["L.qweight"].shape == (32, 1) and t["L.qweight"].dtype == torch.int32
    assert bool((t["L.qweight"] == 0x75316420).all())
    # zeros interleave the same way and are the true zeros: outputs 1 3 5 7 2 4 6 8 -> 0x86427531
    assert t["L.qzeros"].shape == (1, 1) and t["L.qzeros"].item() == 0x86427531 - 2**32
    back, _ = A.unpack_layer(Dict(t), "L", (8, 32), 32, "mem")
    assert torch.equal(back.qdata, codes) and torch.equal(back.zero_point, zero)


class Dict:
    def __init__(self, d):
        self.d = d

    def get(self, key, required=True):
        return self.d.get(key) if not required else self.d[key]


def test_real_layer_matches_autoawq_packing_order(smollm2):
    """k_proj of block 0: our qweight against a direct construction of AutoAWQ's from_linear words."""
    w = smollm2.model.model.layers[0].self_attn.k_proj.weight.detach()
    spec = get_method("rtn")
    qw = spec.fn(w, int_scheme(4, 64), spec.make_config({}), None)
    t = A.pack_layer("k", qw)
    c = qw.qdata.t().numpy().astype(np.int64)               # (K, N): intweight in AutoAWQ's terms
    K, N = c.shape
    want = np.zeros((K, N // 8), dtype=np.int64)
    for i, o in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):       # qweight[:, col] |= intweight[:, 8col + o] << 4i
        want |= c[:, o::8] << (4 * i)
    assert np.array_equal(t["k.qweight"].numpy().astype(np.int64) & 0xFFFFFFFF, want)
    assert torch.equal(t["k.scales"].float(), qw.scale.t())


@pytest.fixture(scope="module")
def g64(smollm2, tmp_path_factory):
    lm, rep = quantized(smollm2, "w4g64-rtn")
    out = api.export(lm, rep, tmp_path_factory.mktemp("awq") / "g64", "awq")
    return lm, rep, out


def test_round_trip_is_bit_exact(g64):
    lm, rep, out = g64
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
                   "modules_to_not_convert": ["lm_head"]}
    back = load_model(out)
    assert back.meta["format"] == "awq"
    n = 0
    for name, mod in lm.model.named_modules():
        if isinstance(mod, QuantLinear):
            other = back.model.get_submodule(name)
            for t_ in ("qdata", "scale", "zero_point"):
                assert torch.equal(getattr(mod, t_), getattr(other, t_)), (name, t_)
            assert other.g_idx is None
            n += 1
    assert n == 210
    assert torch.equal(logits(lm.model), logits(back.model))
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.mlp.down_proj.qweight"].shape == (1536, 72)
    assert t["model.layers.0.mlp.down_proj.qzeros"].shape == (24, 72)
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (24, 576)


def test_symmetric_and_static_act_order_are_written(smollm2, tmp_path):
    recipe = Recipe("m", [Rule(r"layers\.0\.", int_scheme(4, 64, True), "rtn"),
                          Rule(r"layers\.1\.mlp", int_scheme(4, 64), "gptq", {"act_order": True, "static_groups": True})],
                    calibration={"n_samples": 4, "seq_len": 64, "batch_size": 4})
    lm, rep = quantized(smollm2, recipe)
    out = api.export(lm, rep, tmp_path / "m", "awq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.2.mlp.up_proj" in cfg["modules_to_not_convert"]
    back = load_model(out)
    assert torch.equal(logits(lm.model), logits(back.model))


@pytest.mark.parametrize("recipe,match", [
    ("w4g128-rtn", r"model\.layers\.0\.\S+: group_size 128 does not divide in_features 576.*g64"),
    ("w3g64-rtn", r"model\.layers\.0\.\S+ has scheme w3g64a; AWQ GEMM holds 4-bit"),
])
def test_refusals_name_the_tensor(smollm2, tmp_path, recipe, match):
    lm, rep = quantized(smollm2, Recipe(recipe, [Rule(r"layers\.0\.", get_recipe_scheme(recipe), "rtn")]))
    with pytest.raises(LowbitError, match=match):
        api.export(lm, rep, tmp_path / "x", "awq")
    assert not (tmp_path / "x").exists()


def get_recipe_scheme(name):
    from lowbit.recipe import get_recipe
    return get_recipe(name).rules[0].scheme


def test_act_order_g_idx_and_mixed_groups_are_refused(smollm2, tmp_path):
    recipe = Recipe("ao", [Rule(r"layers\.0\.mlp\.up_proj", int_scheme(4, 64), "gptq", {"act_order": True})],
                    calibration={"n_samples": 4, "seq_len": 64, "batch_size": 4})
    lm, rep = quantized(smollm2, recipe)
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.mlp\.up_proj has act-order groups \(g_idx\).*-static"):
        api.export(lm, rep, tmp_path / "x", "awq")
    recipe = Recipe("mg", [Rule(r"layers\.0\.", int_scheme(4, 64), "rtn"), Rule(r"layers\.1\.", int_scheme(4, 32), "rtn")])
    lm, rep = quantized(smollm2, recipe)
    with pytest.raises(LowbitError, match=r"group 64\) and model\.layers\.1\.\S+ \(group 32\) differ"):
        api.export(lm, rep, tmp_path / "x", "awq")


def test_bad_files(g64, tmp_path):
    _, _, out = g64
    d = tmp_path / "d"
    shutil.copytree(out, d)
    (d / "lowbit_manifest.json").unlink()          # a peer's file: no sha256 check first
    name = "model.layers.7.self_attn.o_proj"
    t = load_file(str(d / "model.safetensors"))
    t[f"{name}.qzeros"] = t[f"{name}.qzeros"][:-1].contiguous()
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match=rf"{d}: tensor {name}\.qzeros: expected int32 \(9, 72\), got int32 \(8, 72\)"):
        load_model(d)
    data = (out / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(LowbitError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(d)
    (d / "model.safetensors").write_bytes(data)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match=r"config.json: AWQ version 'gemv'"):
        load_model(d)
    cfg["quantization_config"].update(version="gemm", group_size=128)
    (d / "config.json").write_text(json.dumps(cfg))
    # a wrong group size: the first layer read (in 1536) has the wrong number of groups
    with pytest.raises(LowbitError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.qzeros: expected int32 "
                                          r"\(12, 72\), got int32 \(24, 72\)"):
        load_model(d)


GPTQ_PY = Path(os.environ.get("LOWBIT_GPTQ_PY", ROOT / "bench/.venv-gptq/bin/python"))
PEERS = Path(os.environ.get("LOWBIT_PEERS_DIR", ROOT / "bench/peers"))


@pytest.mark.slow
@pytest.mark.skipif(not (GPTQ_PY.is_file() and (PEERS / "load_check.py").is_file()),
                    reason="peer venv bench/.venv-gptq or bench/peers/load_check.py absent (bench/setup_peers.sh)")
def test_transformers_loads_our_awq(g64, tmp_path):
    lm, _, out = g64
    ids = tmp_path / "ids.npy"
    np.save(ids, IDS.numpy())
    r = subprocess.run([str(GPTQ_PY), str(PEERS / "load_check.py"), "--dir", str(out), "--format", "awq",
                        "--ids", str(ids), "--out", str(tmp_path / "chk")], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    peer = np.load(tmp_path / "chk" / "logits.npy")
    # GPTQModel's AwqTorchLinear dequantizes in float16 (the scales' dtype), casts the float32
    # activations to float16 and multiplies in float16: lowbit's weights rounded to float16, run
    # the same way, give its logits up to summation order (measured: identical)
    model = copy.deepcopy(lm.model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            set_submodule(model, name, Fp16Linear(mod.dequantize_weight(torch.float32).half()))
    assert np.abs(peer - logits(model).numpy()).max() <= 1e-3
    assert (peer.argmax(-1) == logits(lm.model).numpy().argmax(-1)).mean() >= 0.85


class Fp16Linear(torch.nn.Module):
    def __init__(self, w16):
        super().__init__()
        self.w16 = w16

    def forward(self, x):
        return torch.nn.functional.linear(x.half(), self.w16).float()
