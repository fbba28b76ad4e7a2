"""SmoothQuant / AWQ as equivalent transforms on the real bundled model: folded scales leave the
float model's outputs unchanged (to fp32 rounding), the searches never lose to no scaling, the
AWQ path runs through the Recipe and the block loop (RTN and GPTQ on top)."""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit import api
from lowbit.arch import get_blocks, spec_for
from lowbit.calibration import CalibrationConfig, calibration_tokens, capture_block_inputs, run_block
from lowbit.errors import LowbitError
from lowbit.numerics import int_scheme
from lowbit.recipe import Recipe, Rule, get_recipe
from lowbit.transforms.awq import AWQConfig, awq_clip, awq_scales, fake_quant, output_error
from lowbit.transforms.block import make_transforms, transform_model_block
from lowbit.transforms.fold import expand_heads, reduce_heads
from lowbit.transforms.smooth import smooth_scales

pytestmark = pytest.mark.model


def _transform_all_blocks(model, tokens, transforms):
    arch = spec_for(model)
    blocks = get_blocks(model, arch)
    schemes = {n: int_scheme(4, 128) for n in arch.linears}
    rows = []
    with torch.no_grad():
        acts = capture_block_inputs(model, blocks[0], tokens, 2)
        for b in blocks:
            rows += transform_model_block(model, arch, b, schemes, acts, make_transforms(transforms))
            acts = [run_block(b, a) for a in acts]
    return rows


@pytest.mark.parametrize("transforms", [
    [{"name": "smoothquant", "alpha": 0.5}],
    pytest.param([{"name": "awq", "clip": False, "n_grid": 4}], marks=pytest.mark.slow)])
def test_folded_scales_leave_the_float_model_unchanged(smollm2, transforms):
    """All 4 pairs of all 30 blocks (norm -> qkv, v -> o through 9 query / 3 kv heads, norm ->
    gate/up, up -> down). The tolerance is the model's own fp32 rounding: the transformed fp32
    model may differ from the float64 original by at most a few times what the untransformed fp32
    model does (both are the same function evaluated with different fp32 roundings)."""
    tokens = calibration_tokens(smollm2.tokenizer, CalibrationConfig(n_samples=2, seq_len=64))
    m = copy.deepcopy(smollm2.model)
    rows = _transform_all_blocks(m, tokens, transforms)
    assert len(rows) == 4 * 30
    with torch.no_grad():
        ref32 = smollm2.model(tokens).logits.double()
        got = m(tokens).logits.double()
        moved = not torch.equal(m.model.layers[0].input_layernorm.weight,
                                smollm2.model.model.layers[0].input_layernorm.weight)
        del m
        m64 = copy.deepcopy(smollm2.model).double()
        ref64 = m64(tokens).logits
        del m64
    noise = float((ref32 - ref64).abs().max())
    err = float((got - ref64).abs().max())
    assert err <= 4 * noise + 1e-5, (err, noise)
    assert moved                      # the scales did fold into the norm


def test_smooth_scales_formula_and_gqa_expansion():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 1.0])
    s = smooth_scales(a, w, 0.5)
    assert torch.allclose(s[[0, 1, 3]], torch.tensor([2.0, 0.5, 3.0]))   # sqrt(a) / sqrt(w)
    assert s[2] == 1.0                                                    # never activated
    # kv head k of 2 (head_dim 2) feeds query heads 2k, 2k+1
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert expand_heads(v, 2, 2).tolist() == [1, 2, 1, 2, 3, 4, 3, 4]
    assert reduce_heads(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8]), 2, 2, "max").tolist() == [3, 4, 7, 8]


def test_awq_search_and_clip_never_worse_than_plain_rtn():
    torch.manual_seed(0)
    d, r = 256, 64
    gain = torch.ones(d)
    gain[torch.randperm(d)[:8]] = 30.0                                  # a few salient input channels
    x = torch.randn(2048, d) * gain
    H = 2 * x.T @ x / x.shape[0]
    w = torch.randn(r, d)
    sch = int_scheme(3, 64)
    cfg = AWQConfig(n_grid=10)
    s, info = awq_scales([w], [sch], x.abs().mean(0), H, cfg)
    assert info["loss"] <= info["loss_unscaled"] and info["alpha"] > 0
    assert info["loss"] < 0.5 * info["loss_unscaled"]                   # measured 0.25 (alpha 0.4)
    wc, ci = awq_clip(w * s, H / s[:, None] / s[None, :], sch, cfg)
    e_clip = output_error((w * s - fake_quant(wc, sch)) / s, H)
    e_plain = output_error((w * s - fake_quant(w * s, sch)) / s, H)
    assert e_clip <= e_plain and ci["clip_ratio_mean"] <= 1.0


def test_bad_transform_options_fail_before_work():
    with pytest.raises(LowbitError, match="unknown; available"):
        make_transforms([{"name": "rotate-everything"}])
    with pytest.raises(LowbitError, match="alpha"):
        make_transforms([{"name": "smoothquant", "alpha": 2}])
    with pytest.raises(LowbitError, match="unknown option"):
        make_transforms([{"name": "awq", "grid": 3}])


@pytest.mark.slow
def test_awq_presets_through_the_block_loop(smollm2):
    """w4g128-awq and -awq-gptq on blocks 0-1: the recipe's transform runs per block before its
    groups, and AWQ lowers the blocks' output error against RTN / GPTQ on held-out text."""
    from lowbit.data import load_text, tokenize_text
    calib = {"n_samples": 16, "seq_len": 256, "batch_size": 8}
    ev = tokenize_text(smollm2.tokenizer, load_text("wiki-evaluation")[:8000])[:512].view(4, 128)
    ref = smollm2.model.model.layers

    def err(name):
        base = get_recipe(name)
        recipe = Recipe(name, [Rule(r"model\.layers\.[01]\.", r.scheme, r.method, r.method_args)
                               for r in base.rules], transforms=base.transforms)
        m = copy.deepcopy(smollm2.model)
        rep = api.quantize(m, recipe, tokenizer=smollm2.tokenizer, calibration=calib, progress=False)
        acts = capture_block_inputs(smollm2.model, ref[0], ev, batch_size=4)
        with torch.no_grad():
            e = 0.0
            for a in acts:
                y, y_ref = a, a
                for b in range(2):
                    y, y_ref = run_block(m.model.layers[b], y), run_block(ref[b], y_ref)
                e += float((y.hidden - y_ref.hidden).square().mean())
        return e, rep

    e_awq, rep = err("w4g128-awq")
    assert any(n.startswith("awq: 8 smoothing pair(s)") for n in rep.notes), rep.notes
    assert rep.recipe.transforms == [{"name": "awq"}]
    e_rtn, _ = err("w4g128-rtn")
    assert e_awq < e_rtn, (e_awq, e_rtn)
    e_awq_gptq, _ = err("w4g128-awq-gptq")
    assert e_awq_gptq < e_rtn


def test_awq_preset_grammar_noclip_and_gptq_search():
    """-noclip turns the clipping search off, -gsearch makes the scale search measure GPTQ."""
    r = get_recipe("w4g128-awq-noclip-gsearch-gptq-actorder")
    assert r.transforms == [{"name": "awq", "clip": False, "search": "gptq", "n_grid": 10}]
    assert r.rules[0].method == "gptq" and r.rules[0].method_args == {"act_order": True}
    assert get_recipe("w3g128-awq-noclip").transforms == [{"name": "awq", "clip": False}]
    assert get_recipe("w4g128-awq-gptq").transforms == [{"name": "awq"}]
    (name, cfg), = make_transforms(get_recipe("w4g128-awq-gsearch-gptq").transforms)
    assert name == "awq" and cfg.search == "gptq" and cfg.clip
    with pytest.raises(LowbitError, match="awq option search"):
        make_transforms([{"name": "awq", "search": "signround"}])


def test_awq_gptq_search_on_real_qkv_never_worse_than_unscaled_gptq(smollm2):
    """search="gptq" on block 0's q/k/v with their real inputs (wiki-calibration): the chosen
    scales' GPTQ output error, recomputed here, is what the search reports and is no larger than
    GPTQ at s = 1 (alpha 0 is on the grid, and the same inputs give the same GPTQ result)."""
    from lowbit.methods.gptq import GPTQConfig, gptq_quantize
    tokens = calibration_tokens(smollm2.tokenizer, CalibrationConfig(n_samples=2, seq_len=128))
    attn = smollm2.model.model.layers[0].self_attn
    xs = []
    h = attn.q_proj.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            smollm2.model(tokens)
    finally:
        h.remove()
    x = torch.cat(xs).float()
    H = 2 * x.T @ x / x.shape[0]
    ws = [attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach()]
    sch = int_scheme(4, 64)
    s, info = awq_scales(ws, [sch] * 3, x.abs().mean(0), H, AWQConfig(n_grid=4, search="gptq"))
    w = torch.cat(ws).float()
    q = gptq_quantize(w * s, H / s[:, None] / s[None, :], sch, GPTQConfig()).dequantize(torch.float32)
    err = output_error(w - q / s, H)
    assert err == pytest.approx(info["loss"], rel=1e-6)
    assert info["loss"] <= info["loss_unscaled"]
    e1 = output_error(w - gptq_quantize(w, H, sch, GPTQConfig()).dequantize(torch.float32), H)
    assert e1 == pytest.approx(info["loss_unscaled"], rel=1e-6)
