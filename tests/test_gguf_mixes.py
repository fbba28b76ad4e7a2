"""GGUF mixes as Recipe rules: every tensor gets the type llama.cpp's own quantizer gives it.

Golden: tests/golden/llama_cpp_mix_types.json, from llama_model_quantize(dry_run) on the bundled
SmolLM2-135M (hidden 576: fallbacks everywhere) and Qwen2.5-Coder-1.5B (all rows multiples of 256,
untied output, 12/2 heads) - see bench/peers/llamacpp_mix_types.py. Only the models'
hyperparameters are needed here, so the test builds them on the meta device (no weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.presets.gguf_mixes import MIXES, PRESETS, bind_mix, fallback_type, layer_sets, mix_recipe
from lowbit.export.gguf.writer import plan_tensors, resolve_recipe
from lowbit.recipe import Recipe, get_recipe, list_presets

GOLDEN = json.loads((Path(__file__).parent / "golden" / "llama_cpp_mix_types.json").read_text())


def _meta_model(hp: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[hp["architecture"]]
    cfg = cls(vocab_size=hp["vocab_size"], hidden_size=hp["embedding_length"],
              intermediate_size=hp["feed_forward_length"], num_hidden_layers=hp["block_count"],
              num_attention_heads=hp["attention.head_count"],
              num_key_value_heads=hp["attention.head_count_kv"],
              max_position_embeddings=hp["context_length"], tie_word_embeddings=hp["tied"])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_label", sorted(GOLDEN["models"]))
@pytest.mark.parametrize("mix", sorted(GOLDEN["models"]["smollm2-135m"]["types"]))
def test_mix_types_equal_llama_cpp(model_label, mix):
    entry = GOLDEN["models"][model_label]
    model = _meta_model(entry["hparams"])
    recipe = resolve_recipe(mix.lower(), model.config)
    _, rows = plan_tensors(model, recipe)
    ours = {r.name: r.used for r in rows}
    theirs = entry["types"][mix]
    assert set(ours) == set(theirs)
    diff = {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]}
    assert not diff, f"{model_label} {mix}: {len(diff)} tensors differ, e.g. {list(diff.items())[:4]}"


def test_presets_are_registered_recipes_and_round_trip():
    presets = list_presets()
    for name in PRESETS:
        assert name in presets
        r = get_recipe(name)
        assert r.rules[-1].targets == ".*" and r.rules[-1].scheme.format == MIXES[name].default
        assert Recipe.from_dict(json.loads(r.to_json())).to_dict() == r.to_dict()


def test_binding_and_layer_sets():
    # llama.cpp's use_more_bits for 30 layers: first 3, last 4, and every third from layer 5
    assert layer_sets(30)["more_bits"] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    unbound = mix_recipe("q4_k_m")
    assert unbound.rule_for("model.layers.0.self_attn.v_proj").scheme.format == "q4_k"  # placeholder never matches
    bound = bind_mix(unbound, 30, 9, 3)
    assert bound.rule_for("model.layers.5.self_attn.v_proj").scheme.format == "q6_k"
    assert bound.rule_for("model.layers.15.self_attn.v_proj").scheme.format == "q4_k"
    assert bound.rule_for("model.layers.14.mlp.down_proj").scheme.format == "q6_k"
    q2 = mix_recipe("q2_k")
    assert bind_mix(q2, 28, 12, 2).rule_for("model.layers.3.self_attn.v_proj").scheme.format == "q4_k"
    assert bind_mix(q2, 30, 9, 3).rule_for("model.layers.3.self_attn.v_proj").scheme.format == "q3_k"


def test_fallback_table():
    assert fallback_type("Q4_K", 576) == "Q5_0"
    assert fallback_type("Q5_K", 576) == "Q5_1"
    assert fallback_type("Q6_K", 576) == "Q8_0"
    assert fallback_type("Q2_K", 576) == "Q4_0" and fallback_type("Q3_K", 576) == "Q4_0"
    assert fallback_type("Q4_K", 1536) == "Q4_K"
    assert fallback_type("Q4_K", 100) == "F16"                 # not even a multiple of 32
    with pytest.raises(LowbitError, match="unknown"):
        mix_recipe("q7_k_xl")
