"""Hadamard rotations (lowbit.transforms): exact orthogonality of the constructions, the real
bundled model's float outputs unchanged after folding, online down_proj rotation, refusals, and
a rotated + quantized model through a GPTQ checkpoint and back."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models import LoadedModel, load_model
from lowbit.recipe import get_recipe
from lowbit.transforms import make_transforms
from lowbit.transforms.hadamard import _paley, random_hadamard
from lowbit.transforms.rotate import RotateConfig, rotate_model

IDS = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 1001, 5, 77, 9012, 30, 2, 40, 615, 48]])


@pytest.mark.parametrize("n", [576, 1536, 64, 896, 9, 1])
def test_rotation_is_orthogonal_and_apply_matches_matrix(n):
    r = random_hadamard(n, seed=3)
    Q = r.matrix()
    # float64 products of +-1/sqrt(n) entries: error ~ n * eps
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=n * 1e-15)
    x = torch.randn(4, 3, n, dtype=torch.float64)
    assert torch.allclose(r.apply(x), x @ Q, atol=n * 1e-15)
    assert torch.equal(random_hadamard(n, seed=3).signs, r.signs)       # seeded: same Q
    if r.kind == "hadamard":                                            # incoherent: |Q_ij| = 1/sqrt(n)
        assert torch.allclose(Q.abs(), torch.full_like(Q, n ** -0.5))


def test_paley_orders_used_by_transformer_widths():
    for h in (12, 20, 28, 36, 140):
        H = _paley(h)
        assert H is not None and torch.equal(H @ H.T, h * torch.eye(h, dtype=torch.float64))
    assert random_hadamard(576, 0).describe() == "hadamard 36x16 = 576"
    assert random_hadamard(1536, 0).describe() == "hadamard 12x128 = 1536"


@pytest.mark.model
def test_rotated_bundled_model_has_the_same_float_outputs():
    lm = load_model("smollm2-135m")
    with torch.no_grad():
        ref = lm.model(IDS).logits
        info = rotate_model(lm.model, RotateConfig(seed=0, online_down=True))
        out = lm.model(IDS).logits
    assert info["untied_lm_head"] and lm.model.config.tie_word_embeddings is False
    assert lm.model.lm_head.weight.data_ptr() != lm.model.model.embed_tokens.weight.data_ptr()
    # fp32 forward through 30 blocks after float64 folding: ~1e-6 relative seen; 1e-4 asked
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    # the norms are folded (weight 1) and the weights really moved
    assert torch.equal(lm.model.model.layers[0].input_layernorm.weight,
                       torch.ones_like(lm.model.model.layers[0].input_layernorm.weight))
    with pytest.raises(LowbitError, match="already rotated"):
        rotate_model(lm.model)
    with pytest.raises(LowbitError, match="online"):
        api.export(lm, None, "/nonexistent/never-written", format="gptq")


def test_refusals():
    m = nn.Module()
    m.config = SimpleNamespace(model_type="gemma2")
    with pytest.raises(LowbitError, match="gemma2.*no rotation spec"):
        rotate_model(m)
    with pytest.raises(LowbitError, match="unknown option"):
        make_transforms([{"name": "rotate", "angle": 3}])
    with pytest.raises(LowbitError, match="unknown"):
        make_transforms([{"name": "spin"}])
    r = get_recipe("w3g64-rot-gptq")
    assert r.transforms == [{"name": "rotate", "seed": 0}] and r.rules[0].method == "gptq"
    assert type(r).from_dict(r.to_dict()).transforms == r.transforms
    assert "transforms" not in get_recipe("w3g64-gptq").to_dict()   # old recipes keep their JSON


@pytest.mark.model
@pytest.mark.slow
def test_rotated_rtn_through_gptq_checkpoint(smollm2, tmp_path):
    model = copy.deepcopy(smollm2.model)
    rep = api.quantize(model, "w4g64-rot-rtn", progress=False)
    assert any("transform rotate" in n for n in rep.notes)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    with torch.no_grad():
        want = model(IDS).logits
    api.export(lm, rep, tmp_path / "gptq", format="gptq")
    back = load_model(tmp_path / "gptq")
    with torch.no_grad():
        got = back.model(IDS).logits
    assert back.model.config.tie_word_embeddings is False
    # same codes, scales and float lm_head / embeddings: equal up to summation order
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())
