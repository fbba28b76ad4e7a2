"""8-bit AdamW: the dynamic-tree and linear maps, the block-wise state error bound from each map's
spacing, the update against torch's fp32 AdamW, state bytes, state_dict round trip, bad options."""
import io

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.train.optim8bit import (Adam8bit, AdamW8bit, dequantize_blockwise, dynamic_map, fp32_adam_state_bytes,
                                    linear_map, quantize_blockwise)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape(signed):
    m = dynamic_map(signed)
    assert m.numel() == (255 if signed else 256)
    assert torch.all(m[1:] > m[:-1])                       # strictly ascending: one code per value
    assert float(m[-1]) == 1.0 and (0.0 in m.tolist())
    assert (float(m[0]) == -1.0) if signed else (float(m[0]) == 0.0)
    pos = m[m > 0]
    # base-10 exponents 10^0 .. 10^-6 (signed) / 10^-7 (unsigned), finer near 1 than near 0
    assert float(pos.min()) == pytest.approx(1e-6 if signed else 1e-7, rel=1e-6)
    assert (pos[-1] - pos[-2]) > (pos[1] - pos[0])


@pytest.mark.parametrize("fmt_map", [dynamic_map(True), dynamic_map(False), linear_map(True), linear_map(False)])
def test_blockwise_error_within_half_the_map_spacing(fmt_map):
    signed = float(fmt_map[0]) < 0
    x = torch.randn(3, 5000) * torch.logspace(-4, 0, 5000)      # values over four decades
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise(x, fmt_map, 2048)
    assert codes.dtype == torch.uint8 and codes.numel() == 8 * 2048 and absmax.numel() == 8
    x_hat = dequantize_blockwise(codes, absmax, fmt_map, tuple(x.shape))
    # the bound: half the gap between the two map entries around x / absmax, times absmax
    flat = torch.zeros(8 * 2048)
    flat[: x.numel()] = x.reshape(-1)
    blocks = flat.view(8, 2048)
    normed = blocks / absmax[:, None]
    hi = torch.bucketize(normed, fmt_map).clamp(1, fmt_map.numel() - 1)
    gap = (fmt_map[hi] - fmt_map[hi - 1]) * absmax[:, None]
    err = (x_hat.reshape(-1) - x.reshape(-1)).abs()
    bound = (gap / 2).reshape(-1)[: x.numel()] * (1 + 1e-5) + absmax.max() * 1e-7   # + fp32 rounding
    assert torch.all(err <= bound)
    # each block's absmax value itself is exact (the map holds +-1)
    assert torch.equal(x_hat.reshape(-1)[blocks.abs().argmax(dim=1)[:3] + torch.arange(3) * 2048].abs(),
                       absmax[:3])


def test_dynamic_keeps_small_second_moments_that_linear_zeroes():
    v = torch.cat([torch.full((2047,), 1e-6), torch.ones(1)])       # one large value per block
    for qmap, zeroed in ((dynamic_map(False), False), (linear_map(False), True)):
        c, a = quantize_blockwise(v, qmap)
        v_hat = dequantize_blockwise(c, a, qmap, (2048,))
        assert bool((v_hat[:2047] == 0).all()) == zeroed


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 96, generator=g)),     # 6144 values: 8-bit state
            torch.nn.Parameter(torch.randn(96, generator=g))]         # small: fp32 state


def _run(opt_cls, params, steps=20, seed=1, **kw):
    opt = opt_cls(params, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 0.1 + 0.05 * p.detach()
        opt.step()
    return opt


def test_matches_fp32_adamw_within_state_quantization():
    ref, ours = _params(), _params()
    _run(torch.optim.AdamW, ref, lr=1e-2, weight_decay=0.1)
    opt = _run(AdamW8bit, ours, lr=1e-2, weight_decay=0.1)
    start = _params()[0]
    moved = (ref[0] - start).abs().mean()
    diff = (ours[0] - ref[0]).abs().mean()
    # 20 steps of lr 1e-2 move a weight ~0.1; 8-bit moments perturb each step's update by the
    # map's relative spacing (<= ~1 / 2^6 near |x| = absmax in the signed map): a few per cent
    assert diff < 0.05 * moved
    assert torch.equal(ours[1], ours[1]) and torch.allclose(ours[1], ref[1], atol=1e-6)   # fp32-state tensor
    assert "exp_avg_codes" in opt.state[ours[0]] and "exp_avg" in opt.state[ours[1]]


def test_state_bytes_under_0_3x_fp32():
    ps = [torch.nn.Parameter(torch.randn(576, 1536)), torch.nn.Parameter(torch.randn(576))]
    opt = _run(AdamW8bit, ps, steps=1)
    ours, fp32 = opt.state_bytes(), fp32_adam_state_bytes(ps)
    ref = _run(torch.optim.AdamW, [torch.nn.Parameter(p.detach().clone()) for p in ps], steps=1)
    torch_bytes = sum(v.numel() * v.element_size() for st in ref.state.values() for v in st.values())
    assert fp32 == torch_bytes
    assert ours <= 0.3 * fp32
    assert ours == pytest.approx(2 * 576 * 1536 + 8 * (576 * 1536 // 2048) + 8 * 576 + 8, abs=16)


@pytest.mark.parametrize("fmt", ["dynamic", "linear"])
def test_state_dict_round_trip(fmt):
    a = _params()
    opt = _run(AdamW8bit, a, steps=5, lr=1e-2, state_format=fmt)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in a], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    b = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    opt_b = AdamW8bit(b, lr=1e-2, state_format=fmt)
    opt_b.load_state_dict(saved["opt"])
    for opt_x, ps in ((opt, a), (opt_b, b)):
        g = torch.Generator().manual_seed(7)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt_x.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert opt.state_bytes() == opt_b.state_bytes()


def test_load_refuses_mismatched_state():
    a = _params()
    opt = _run(AdamW8bit, a, steps=1)
    sd = opt.state_dict()
    other = AdamW8bit([torch.nn.Parameter(torch.zeros(128, 96)), torch.nn.Parameter(torch.zeros(96))])
    with pytest.raises(LowbitError, match=r"parameter 0 \(shape \(128, 96\)\).*exp_avg_codes uint8 \(12288,\)"):
        other.load_state_dict(sd)
    sd["state"][0]["exp_avg_codes"] = sd["state"][0]["exp_avg_codes"].float()
    with pytest.raises(LowbitError, match="parameter 0: expected exp_avg_codes uint8"):
        AdamW8bit(_params()).load_state_dict(sd)


def test_adam8bit_is_coupled_decay():
    ref, ours = _params(), _params()
    _run(torch.optim.Adam, ref, lr=1e-2, weight_decay=0.1)
    _run(Adam8bit, ours, lr=1e-2, weight_decay=0.1)
    assert torch.allclose(ours[1], ref[1], atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": 0.0}, "eps"),
    ({"weight_decay": float("nan")}, "weight_decay"), ({"state_format": "fp8"}, "state_format.*dynamic"),
    ({"block_size": 0}, "block_size"), ({"min_8bit_size": -1}, "min_8bit_size")])
def test_bad_options_named(kw, match):
    with pytest.raises(LowbitError, match=match):
        AdamW8bit(_params(), **kw)


def test_sparse_gradient_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(LowbitError, match="sparse"):
        opt.step()
