"""lowbit native directory: bit-exact save/load round trip, determinism, manifest, refusals, and
`lowbit quantize` end to end on the real bundled model."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit import api
from lowbit.cli import main as cli_main
from lowbit.errors import LowbitError
from lowbit.export import native
from lowbit.models import LoadedModel, load_model
from lowbit.nn.qlinear import QuantLinear
from lowbit.numerics import int_scheme
from lowbit.recipe import Recipe, Rule

pytestmark = pytest.mark.model

# block 0: GPTQ act-order 4-bit g128 (g_idx, ragged 576 = 4 x 128 + 64, packed 4-bit codes)
# block 1: RTN 3-bit g64 symmetric (packed 3-bit), block 2's MLP: RTN 8-bit per channel (u8 codes)
MIXED = Recipe("mixed", [Rule(r"model\.layers\.0\.", int_scheme(4, 128), "gptq", {"act_order": True}),
                         Rule(r"model\.layers\.1\.", int_scheme(3, 64, symmetric=True), "rtn"),
                         Rule(r"model\.layers\.2\.mlp\.", int_scheme(8, None, True), "rtn")],
               calibration={"n_samples": 4, "seq_len": 64, "batch_size": 4})
IDS = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 1001]])


def quantized(smollm2):
    model = copy.deepcopy(smollm2.model)
    rep = api.quantize(model, MIXED, tokenizer=smollm2.tokenizer)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    return lm, rep


@pytest.fixture(scope="module")
def saved(smollm2, tmp_path_factory):
    lm, rep = quantized(smollm2)
    out = api.save_quantized(lm, rep, tmp_path_factory.mktemp("native") / "m")
    return lm, rep, out


def test_round_trip_is_bit_exact(saved):
    lm, rep, out = saved
    back = load_model(out)
    n = 0
    for name, mod in lm.model.named_modules():
        if isinstance(mod, QuantLinear):
            other = back.model.get_submodule(name)
            assert isinstance(other, QuantLinear), name
            for t in ("qdata", "scale", "zero_point", "g_idx"):
                a, b = getattr(mod, t), getattr(other, t)
                assert (a is None and b is None) or torch.equal(a, b), (name, t)
            n += 1
    assert n == 7 + 7 + 3
    assert back.model.model.layers[0].self_attn.q_proj.g_idx is not None
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, back.model(IDS).logits)
    # tied embeddings stay tied after loading
    assert back.model.lm_head.weight is back.model.model.embed_tokens.weight


def test_manifest_records_the_run(saved):
    lm, rep, out = saved
    m = native.read_manifest(out)
    assert m["format"] == "lowbit-native" and m["format_version"] == 1
    assert m["source"]["model"] == "smollm2-135m" and len(m["source"]["sha256"]) == 64
    assert m["calibration"]["n_samples"] == 4 and m["calibration"]["seed"] == 0
    q = m["layers"]["model.layers.0.self_attn.q_proj"]
    assert q["method"] == "gptq" and q["ragged_last_group"] == 64 and q["has_g_idx"]
    assert q["codes_layout"] == "packed_u8" and q["code_bits"] == 4 and q["scale_dtype"] == "float16"
    assert q["info"]["loss"] > 0 and q["info"]["act_order"] is True
    assert m["layers"]["model.layers.1.mlp.up_proj"]["code_bits"] == 3
    assert m["layers"]["model.layers.2.mlp.up_proj"]["codes_layout"] == "u8"
    assert set(m["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert m["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    # the recipe comes back from the manifest and reproduces the run's settings
    back = Recipe.load(out / "lowbit.json")
    assert back.to_dict() == rep.recipe.to_dict()
    assert back.calibration == m["calibration"]


def test_same_recipe_and_seed_give_the_same_bytes(smollm2, saved, tmp_path):
    _, _, out = saved
    lm, rep = quantized(smollm2)
    again = api.save_quantized(lm, rep, tmp_path / "again")
    for f in sorted(p.name for p in out.iterdir()):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f


def test_refusals(saved, tmp_path):
    lm, rep, out = saved
    with pytest.raises(LowbitError, match="already exists"):
        api.save_quantized(lm, rep, out)
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(out, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="sha256 does not match"):
        load_model(broken)
    m = json.loads((broken / "lowbit.json").read_text())
    m["format_version"] = 99
    (broken / "lowbit.json").write_text(json.dumps(m))
    with pytest.raises(LowbitError, match="format_version 99"):
        load_model(broken)


def test_cli_quantize_then_load(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    Recipe("first-block", [Rule(r"model\.layers\.0\.mlp\.", int_scheme(4, 64), "gptq")]).save(recipe)
    out = tmp_path / "q"
    rc = cli_main(["quantize", "smollm2-135m", "--recipe", str(recipe), "--out", str(out),
                   "--samples", "4", "--seq-len", "64"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "block 1/1" in cap.err and "quantized 3 layer(s)" in cap.out
    back = load_model(out)
    assert isinstance(back.model.model.layers[0].mlp.down_proj, QuantLinear)
    assert native.read_manifest(out)["calibration"]["n_samples"] == 4
    # bad input: clear errors, exit code 2, nothing written
    assert cli_main(["quantize", "smollm2-135m", "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["quantize", "smollm2-135m", "--recipe", "w4g128-gptq", "--out", str(tmp_path / "x"),
                     "--samples", "100000"]) == 2
    assert "windows" in capsys.readouterr().err and not (tmp_path / "x").exists()
