"""LoRA / QLoRA (train/lora.py) on the real bundled model with a frozen NF4 base; the task text is
the Python standard library's docstrings (data/pydocs.py), train and held-out parts disjoint.
The PEFT peer test loads our adapter with peft in bench/.venv-bnb (skipped without)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import lowbit.api as api
from lowbit.data.pydocs import task_text
from lowbit.data.text import token_windows, tokenize_text
from lowbit.errors import LowbitError
from lowbit.nn.bnb4 import BnbConfig, Linear4bit, quantize_model
from lowbit.train.lora import (LoraConfig, LoraLinear, add_lora, load_adapter, merge_lora, save_adapter,
                               trainable_parameters)
from lowbit.train.loop import TrainConfig, heldout_loss, train

ROOT = Path(__file__).resolve().parents[1]
BNB_PY = Path(os.environ.get("LOWBIT_BNB_PY", ROOT / "bench/.venv-bnb/bin/python"))
PEER = ROOT / "bench/peers/bnb_peer.py"


def _ids(lm, n: int = 64) -> torch.Tensor:
    """The first n tokens of the bundled evaluation text (real Wikipedia prose), (1, n)."""
    from lowbit.data.text import load_text
    return tokenize_text(lm.tokenizer, load_text("wiki-evaluation")[:2000])[:n].reshape(1, -1)


@pytest.fixture(scope="module")
def nf4_base(smollm2):
    model = copy.deepcopy(smollm2.model)
    quantize_model(model, BnbConfig("nf4", double_quant=True))
    return model


def test_task_text_parts_are_disjoint():
    tr, ho = task_text("train"), task_text("heldout")
    assert len(tr) > 100_000 and len(ho) > 50_000
    assert not set(tr.split("\n\n")) & set(ho.split("\n\n"))
    with pytest.raises(LowbitError, match="part"):
        task_text("test")


def test_add_lora_starts_at_the_base(nf4_base, smollm2):
    model = copy.deepcopy(nf4_base)
    with torch.no_grad():
        ref = model(_ids(smollm2)).logits
    names = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert len(names) == 30 * 7 and all(isinstance(model.get_submodule(n).base, Linear4bit) for n in names)
    per_block = sum(4 * (m.in_features + m.out_features) for n, m in model.named_modules()
                    if isinstance(m, LoraLinear) and ".layers.0." in n)
    assert trainable_parameters(model) == 30 * per_block
    with torch.no_grad():
        assert torch.equal(model(_ids(smollm2)).logits, ref)          # B = 0: exactly the base
    with pytest.raises(LowbitError, match="already"):
        add_lora(model, LoraConfig())
    with pytest.raises(LowbitError, match="rank"):
        add_lora(copy.deepcopy(nf4_base), LoraConfig(r=0))


def test_adapter_roundtrip_and_merge(nf4_base, smollm2, tmp_path):
    model = copy.deepcopy(nf4_base)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj")))
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0, 0.01)
        ours = model(_ids(smollm2)).logits
    out = save_adapter(model, tmp_path / "ad", base="smollm2-135m")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(LowbitError, match="already exists"):
        save_adapter(model, out)
    back = copy.deepcopy(nf4_base)
    load_adapter(back, out)
    with torch.no_grad():
        assert torch.equal(back(_ids(smollm2)).logits, ours)
    # merge into the NF4 base re-quantizes W + B A (alpha / r) with the base's own settings
    name = "model.layers.3.self_attn.v_proj"
    lm_ = back.get_submodule(name)
    want = torch.nn.Linear(lm_.in_features, lm_.out_features, bias=False)
    with torch.no_grad():
        want.weight.copy_(lm_.base.dequantize(torch.float32) + lm_.delta_weight())
    want = Linear4bit.from_linear(want, "nf4", 64, True)
    merged = merge_lora(back)
    assert len(merged) == 60
    got = back.get_submodule(name)
    assert isinstance(got, Linear4bit) and got.double_quant
    assert torch.equal(got.weight_packed, want.weight_packed) and torch.equal(got.absmax, want.absmax)
    # merge into a float base is exact up to float32 rounding of W + BA
    fl = copy.deepcopy(smollm2.model)
    load_adapter(fl, out)
    with torch.no_grad():
        a = fl(_ids(smollm2)).logits
        merge_lora(fl)
        b = fl(_ids(smollm2)).logits
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()


@pytest.mark.slow
def test_qlora_lowers_heldout_loss(nf4_base, smollm2):
    tok = smollm2.tokenizer
    tr = token_windows(tokenize_text(tok, task_text("train")), 128)
    ho = token_windows(tokenize_text(tok, task_text("heldout")), 128)[:8]
    model = copy.deepcopy(nf4_base)
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05))
    before = heldout_loss(model, ho)
    res = train(model, tr, TrainConfig(steps=30, batch_size=4, seq_len=128, lr=3e-4, warmup_steps=3,
                                       grad_checkpointing=True))
    after = heldout_loss(model, ho)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert after < before
    # the 4-bit base never changed
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            assert torch.equal(m.weight_packed, nf4_base.get_submodule(n).weight_packed)
            break


@pytest.mark.slow
@pytest.mark.skipif(not (BNB_PY.is_file() and PEER.is_file()),
                    reason="peer venv bench/.venv-bnb absent (bash bench/setup_peers.sh bnb)")
def test_peft_loads_our_adapter_on_our_nf4_file(nf4_base, smollm2, tmp_path):
    from safetensors.torch import load_file, save_file
    lm = copy.copy(smollm2)
    lm.model = copy.deepcopy(nf4_base)
    base_dir = api.export(lm, None, tmp_path / "base", "bnb")
    add_lora(lm.model, LoraConfig(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():
        for m in lm.model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0, 0.01)
        ours = lm.model(_ids(smollm2)).logits
    ad = save_adapter(lm.model, tmp_path / "adapter", base=str(base_dir))
    save_file({"ids": _ids(smollm2)}, str(tmp_path / "ids.safetensors"))
    r = subprocess.run([str(BNB_PY), str(PEER), "peft", str(base_dir), str(ad), "--ids",
                        str(tmp_path / "ids.safetensors"), "--out", str(tmp_path / "chk")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["lora_modules"] == 210
    theirs = load_file(str(tmp_path / "chk" / "logits.safetensors"))["logits"]
    # same base weights, same A/B and scaling; float32 summation order only
    assert (theirs - ours).abs().max() <= 64 * torch.finfo(torch.float32).eps * ours.abs().max()
