"""Architecture specs: the table entries match what the blocks really do (probed on a real run),
the generic fallback finds blocks of unlisted models, and a model with no repeated blocks is refused.

Other architectures than the bundled Llama are built from tiny configs with transformers' own
classes (random weights, no download): the structure is what is under test, not the weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lowbit import api
from lowbit.arch import find_block_list, get_blocks, is_linear_like, linear_weight, probe_groups, spec_for
from lowbit.calibration import capture_block_inputs, run_block
from lowbit.errors import LowbitError
from lowbit.nn.qlinear import QuantLinear

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(kind: str) -> nn.Module:
    import transformers as tf
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    elif kind == "opt":
        cfg = tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
    elif kind == "gpt_neox":   # not in the table: exercises the generic fallback
        cfg = tf.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64)
    else:
        cls = {"qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "gemma": tf.GemmaConfig,
               "phi3": tf.Phi3Config, "qwen3": tf.Qwen3Config}[kind]
        extra = {"head_dim": 16} if kind in ("gemma", "qwen3") else {}
        cfg = cls(**TINY, **extra, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def probed(model: nn.Module, spec) -> tuple:
    blocks = get_blocks(model, spec)
    tokens = torch.randint(0, 128, (2, 16))
    acts = capture_block_inputs(model, blocks[0], tokens, batch_size=2)
    return probe_groups(blocks[0], lambda: run_block(blocks[0], acts[0]))


@pytest.mark.model
def test_llama_spec_matches_the_real_block(smollm2):
    spec = spec_for(smollm2.model)
    assert spec.name == "llama" and not spec.discovered
    assert len(get_blocks(smollm2.model, spec)) == 30
    assert probed(smollm2.model, spec) == spec.groups
    assert spec.groups[0] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@pytest.mark.parametrize("kind,name", [("qwen2", "llama"), ("mistral", "llama"), ("gemma", "llama"),
                                       ("qwen3", "llama"), ("phi3", "phi3"), ("opt", "opt"),
                                       ("gpt2", "gpt2")])
def test_table_specs_match_probed_groups(kind, name):
    model = tiny_model(kind)
    spec = spec_for(model)
    assert spec.name == name and not spec.discovered
    assert probed(model, spec) == spec.groups
    for n in spec.linears:
        mod = get_blocks(model, spec)[0].get_submodule(n)
        assert is_linear_like(mod)
        w = linear_weight(mod)
        assert w.shape[1] in (64, 96, 256)   # (out, in): in is hidden, intermediate or GPT-2's 4*hidden


def test_generic_fallback_finds_blocks_and_groups():
    model = tiny_model("gpt_neox")
    spec = spec_for(model)
    assert spec.discovered and spec.blocks == "gpt_neox.layers"
    groups = probed(model, spec)
    assert groups == (("attention.query_key_value",), ("attention.dense",),
                      ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))


def test_model_without_repeated_blocks_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 4)

    with pytest.raises(LowbitError, match="no repeated block list"):
        find_block_list(Flat())
    with pytest.raises(LowbitError, match="no repeated block list"):
        spec_for(Flat())
    # the calibrated path refuses before drawing any calibration data
    with pytest.raises(LowbitError, match="no repeated block list"):
        api.quantize(Flat(), "w4g8-gptq", tokens=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])
def test_gptq_pipeline_on_other_architectures(kind):
    """GPT-2's Conv1D (weight stored transposed) and a generic model go through the same loop."""
    model = tiny_model(kind)
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens[:1]).logits
    report = api.quantize(model, "w4g32-gptq", tokens=tokens, progress=False)
    n_linears = 4 * 2
    assert len(report.layers) == n_linears
    assert all(r["loss"] >= 0 for r in report.layers)
    spec = spec_for(model) if kind == "gpt2" else None
    if spec is not None:
        assert isinstance(get_blocks(model, spec)[0].attn.c_attn, QuantLinear)
    else:
        assert any("discovered" in n for n in report.notes)
    with torch.no_grad():
        out = model(tokens[:1]).logits
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.3, rel
