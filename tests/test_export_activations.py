"""Export of issue-19 results: static W8A8 as compressed-tensors with input_scale tensors (vLLM's
format), AWQ-transformed weights as AWQ GEMM (the folded norms travel as plain float weights)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models import LoadedModel, load_model
from lowbit.recipe import Recipe, Rule, get_recipe

pytestmark = pytest.mark.model
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 260, 1345]])


def _slice(name: str, pattern: str = r"model\.layers\.[01]\.") -> Recipe:
    base = get_recipe(name)
    return Recipe(name, [Rule(pattern, r.scheme, r.method, r.method_args, r.input_activations) for r in base.rules],
                  transforms=base.transforms)


def _quantized(smollm2, recipe):
    m = copy.deepcopy(smollm2.model)
    tokens = torch.randint(100, 20000, (2, 64), generator=torch.Generator().manual_seed(0))
    rep = api.quantize(m, recipe, tokens=tokens, progress=False)
    return LoadedModel(m, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256), rep


def test_static_w8a8_writes_input_scales(smollm2, tmp_path):
    lm, rep = _quantized(smollm2, _slice("w8a8-static-minmax"))
    out = api.export(lm, rep, tmp_path / "w8a8s", format="compressed-tensors")
    g = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert g["format"] == "int-quantized"
    assert g["input_activations"]["strategy"] == "tensor" and g["input_activations"]["dynamic"] is False
    t = load_file(str(out / "model.safetensors"))
    q = lm.model.model.layers[1].self_attn.o_proj
    assert t["model.layers.1.self_attn.o_proj.input_scale"].tolist() == [float(q.act_quant.scale)]
    assert sum(k.endswith(".input_scale") for k in t) == 14


def test_llm_int8_has_no_compressed_tensors_form(smollm2, tmp_path):
    lm, rep = _quantized(smollm2, _slice("llm-int8", r"model\.layers\.0\.mlp\.down_proj"))
    assert rep.layers[0]["outlier_columns"] >= 0
    with pytest.raises(LowbitError, match="LLM.int8"):
        api.export(lm, rep, tmp_path / "x", format="compressed-tensors")


@pytest.mark.slow
def test_awq_result_round_trips_as_awq_gemm(smollm2, tmp_path):
    lm, rep = _quantized(smollm2, _slice("w4g64-awq"))
    out = api.export(lm, rep, tmp_path / "awq", "awq")
    back = load_model(out)
    with torch.no_grad():
        a, b = lm.model(IDS).logits, back.model(IDS).logits
    # the checkpoint holds the folded norms and the AWQ-scaled codes; the float model is not it
    with torch.no_grad():
        f = smollm2.model(IDS).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4) and not torch.allclose(a, f, atol=1e-3)
