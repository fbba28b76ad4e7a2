"""lowbit.nn.step (our Llama-family forward step: fused q/k/v and gate/up calls, preallocated KV
cache) against the Hugging Face forward, on the real bundled model.

Tolerance, from the arithmetic: both paths compute the same fp32 operations, differing only in
the order of fp32 sums (a fused GEMM over concatenated rows may block K differently, sdpa with
enable_gqa vs repeated heads, is_causal vs an explicit mask). A length-K fp32 dot product in any
order is within K * u (u = 2^-24) relative of the exact sum of |terms|; RMS norms keep every
block's gain near 1, so over L blocks the logits differ by at most L * K_max * u relative to the
largest logit: 30 * 1536 * 2^-24 = 2.7e-3. The fused kernel call itself is exact at decode:
every GEMV computes each output row on its own, so concatenating rows changes nothing.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit import api
from lowbit.nn import ext
from lowbit.nn.decode import generate
from lowbit.nn.kernels import set_decode_activations
from lowbit.nn.prepare import prepare_for_inference
from lowbit.nn.step import FusedRows, step_model, why_unsupported
from lowbit.numerics.scheme import int_scheme
from lowbit.recipe import Recipe, Rule

pytestmark = pytest.mark.model
PROMPT = "The history of the Roman Empire"
REL = 30 * 1536 * 2.0 ** -24


@pytest.fixture(scope="module")
def int4(smollm2):
    """w4 g128 blocks + w8 per-channel lm_head (bench_decode's int4), packed, fp32 activations."""
    m = copy.deepcopy(smollm2.model)
    api.quantize(m, Recipe("w4g128+head-w8c", [Rule(r"lm_head", int_scheme(8, None, symmetric=True)),
                                                Rule(r".*", int_scheme(4, 128))], ignore=[]), progress=False)
    prepare_for_inference(m)
    set_decode_activations(m, "fp32")
    return m


@torch.inference_mode()
def hf_logits(model, seq: torch.Tensor, p: int) -> torch.Tensor:
    """Last-position logits of a p-token prefill, then of each cached single-token step (HF)."""
    from transformers import DynamicCache
    out = model(input_ids=seq[:, :p], past_key_values=DynamicCache(), use_cache=True)
    rows = [out.logits[0, -1]]
    for t in range(p, seq.shape[1]):
        out = model(input_ids=seq[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        rows.append(out.logits[0, -1])
    return torch.stack(rows).float()


def step_logits(model, seq: torch.Tensor, p: int) -> torch.Tensor:
    sm = step_model(model, True)
    cache = sm.new_cache(seq.shape[1])
    rows = [sm.step(seq[0, :p], 0, cache)]
    for t in range(p, seq.shape[1]):
        rows.append(sm.step(seq[0, t:t + 1], cache.pos, cache))
    return torch.stack(rows).float()


def _seq(smollm2, model, n: int = 8):
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    cont = generate(model, ids, n, min_new_tokens=n, step=False).tokens
    return torch.cat([ids, torch.tensor([cont])], dim=1), ids.shape[1]


@pytest.mark.parametrize("which", ["fp32", "int4"])
def test_step_path_logits_match_hf_forward(smollm2, int4, which):
    """Both block implementations (plain torch ops; nn/ext/step_ops.cpp where it loads) against
    the HF forward: prefill, 8 cached steps, and a multi-token chunk after cached tokens."""
    model = copy.deepcopy(smollm2.model) if which == "fp32" else int4
    assert why_unsupported(model) is None
    seq, p = _seq(smollm2, model)
    ref = hf_logits(model, seq, p)
    bound = REL * float(ref.abs().max())
    sm = step_model(model, True)
    for use_ops in (False, True):
        sm.use_ops = use_ops
        if use_ops and sm._fused_ops() is None:
            continue   # extension unavailable: the plain path is what runs
        got = step_logits(model, seq, p)
        assert bool(got.isfinite().all())
        assert float((got - ref).abs().max()) <= bound, use_ops
        cache = sm.new_cache(seq.shape[1])
        sm.step(seq[0, :p], 0, cache)
        last = sm.step(seq[0, p:], p, cache)           # explicit causal mask
        assert float((last.float() - ref[-1]).abs().max()) <= bound, use_ops
    sm.use_ops = True
    # greedy generation through generate() picks the HF path's tokens
    ids = seq[:, :p]
    assert generate(model, ids, 8, min_new_tokens=8).tokens == seq[0, p:].tolist()


@pytest.mark.parametrize("isa", ext.ISAS)
@pytest.mark.parametrize("act", ["fp32", "int8"])
def test_fused_rows_equal_separate_calls(int4, isa, act):
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    why = ext.isa_status()[isa]
    if why != "ready":
        pytest.skip(f"ISA variant {isa}: {why}")
    blk = int4.model.layers[3]
    set_decode_activations(int4, act)
    try:
        with ext.use_isa(isa):
            mods = [blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj]
            x = torch.randn(1, 576)
            before = torch.cat([m(x) for m in mods], dim=-1)
            fused = FusedRows(mods)
            assert fused.kind == "ext"
            assert torch.equal(fused(x), before)                       # GEMV: exact
            assert torch.equal(torch.cat([m(x) for m in mods], dim=-1), before)  # modules on views
            # the modules now hold slices of one buffer: no extra memory
            ptrs = {m.packed.codes.untyped_storage().data_ptr() for m in mods}
            assert ptrs == {fused.args[0].untyped_storage().data_ptr()}
            xm = torch.randn(16, 576)                                   # tile path (M > GEMV_MAX_M)
            sep = torch.cat([m(xm) for m in mods], dim=-1)
            bound = 576 * 2.0 ** -24 * (xm.abs() @ torch.cat([m.dequantize_weight().abs() for m in mods]).t())
            assert bool(((fused(xm) - sep).abs() <= bound + 1e-30).all())
    finally:
        set_decode_activations(int4, "fp32")


def test_step_path_refuses_what_it_does_not_run(smollm2):
    m = copy.deepcopy(smollm2.model)
    m.config.hidden_act = "gelu"
    assert "silu" in why_unsupported(m)
    assert step_model(m) is None
    with pytest.raises(Exception, match="unsupported model"):
        step_model(m, True)
    assert step_model(m, False) is None
    # and a model changed after the step path was built gets a new one (model.to rebuilt tensors)
    f = copy.deepcopy(smollm2.model)
    s1 = step_model(f)
    f.to(torch.bfloat16)
    s2 = step_model(f)
    assert s2 is not s1 and s2.dtype == torch.bfloat16


def test_fused_rows_with_bias_as_qwen2_has(smollm2):
    """q/k/v with biases (Qwen2): the fused call adds the concatenated biases (0 where a linear has
    none) and equals the separate calls exactly at decode."""
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    from lowbit.nn.prepare import PackedLinear
    from lowbit.numerics.qweight import quantize_weight
    attn = smollm2.model.model.layers[0].self_attn
    sch = int_scheme(4, 128)
    mods = []
    for i, lin in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        bias = None if i == 1 else torch.randn(lin.out_features)
        mods.append(PackedLinear(quantize_weight(lin.weight.detach(), sch), bias, backend="ext"))
    x = torch.randn(1, 576)
    before = torch.cat([m(x) for m in mods], dim=-1)
    fused = FusedRows(mods)
    assert fused.kind == "ext" and fused.bias is not None
    assert torch.equal(fused(x), before)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_kv_cache_holds_each_row_within_its_formats_rounding(smollm2, kv):
    """Block 0's keys and values depend only on each token's embedding, so a float cache and a
    quantized one see the same rows there: every stored row (one head, one position) must be
    within the format's rounding of the float row, at prefill (plain torch ops) and at decode
    (nn/ext/step_ops.cpp where it loads). int8: |x - q s| <= s / 2, s = absmax / 127. e4m3 (3
    mantissa bits, s = absmax / 448): half a step is 2^-4 of |x| for normals, 2^-10 s below 2^-6 s."""
    from lowbit.nn.step import KVCache
    model = smollm2.model
    sm = step_model(model, True)
    seq, p = _seq(smollm2, model, 4)
    caches = [sm.new_cache(seq.shape[1]), sm.new_cache(seq.shape[1], kv)]
    for c in caches:
        sm.step(seq[0, :p], 0, c)
        for t in range(p, seq.shape[1]):
            sm.step(seq[0, t:t + 1], c.pos, c)
    f, q = caches
    end = seq.shape[1]
    kq, vq = q.layer(0, end)
    for ref, got, what in ((f.k[0, :, :end], kq[:, :end], "keys"), (f.v[0, :, :end], vq[:, :end], "values")):
        s = ref.abs().amax(-1, keepdim=True) / (127.0 if kv == "int8" else 448.0)
        bound = s / 2 if kv == "int8" else torch.maximum(ref.abs() * 2.0 ** -4, s * 2.0 ** -10)
        err = (got - ref).abs()
        assert bool((err <= bound * (1 + 1e-5) + 1e-6 * ref.abs()).all()), (what, float((err - bound).max()))
        assert float(err.max()) > 0                   # the rows were rounded, not stored in float
    codes = torch.int8 if kv == "int8" else torch.float8_e4m3fn
    assert q.kq.dtype == codes and q.nbytes() * 4 * 64 == f.nbytes() * (64 + 4)   # 1 byte + 4 per 64
    assert isinstance(q, KVCache) and q.scratch_bytes() == f.nbytes() // 30


def test_quantized_kv_cache_refuses_nan_with_the_block_named():
    from lowbit.errors import LowbitError
    from lowbit.nn.step import KVCache
    c = KVCache(2, 1, 8, 4, torch.float32, "int8")
    k, v = c.layer(1, 0)
    k[:, 0:2] = 1.0
    v[:, 0:2] = 1.0
    k[0, 1, 2] = float("nan")
    with pytest.raises(LowbitError, match=r"block 1's keys at positions 0\.\.1 contain NaN/inf"):
        c.commit(1, 0, 2)
    with pytest.raises(LowbitError, match="KV cache: expected float"):
        KVCache(2, 1, 8, 4, torch.float32, "int4")


def test_quantized_kv_cache_at_long_context_and_through_generate(smollm2):
    """eval/kvcache.py on a real 1024-token window: the int8 cache (as `lowbit generate
    --kv-cache int8` runs it) keeps the float cache's predictions (measured: KL 6e-4, top-1
    0.986 on this window; the bounds leave 20x), at 0.27x the bytes."""
    from lowbit.data.text import load_text, tokenize_text
    from lowbit.errors import LowbitError
    from lowbit.eval.kvcache import long_context
    ids = tokenize_text(smollm2.tokenizer, load_text("wiki-evaluation"))
    r = long_context(smollm2.model, ids, 1024, "int8", chunk=256, windows=1)
    assert r["tokens"] == 1023 and len(r["by_position"]) == 4
    assert 0 < r["kl"] < 0.012 and r["top1"] > 0.9 and abs(r["dppl"]) < 0.05 * r["ppl_float"]
    assert r["cache_bytes_kv"] * 4 * 64 == r["cache_bytes_float"] * 68
    prompt = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    out = generate(smollm2.model, prompt, 4, min_new_tokens=4, kv_cache="fp8")
    assert len(out.tokens) == 4
    with pytest.raises(LowbitError, match="step path"):
        generate(smollm2.model, prompt, 4, step=False, kv_cache="int8")


@pytest.mark.parametrize("isa", ext.ISAS)
@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_kv_attend_on_codes_matches_dequantized_attention(isa, kv):
    """lowbit_cpu.kv_attend (decode attention read from the codes) against float64 attention on
    the dequantized rows, grouped-query heads, two position blocks. Bound from the arithmetic
    (u = 2^-24): a score is off by at most hd u scaling sum_d |q_d k_d|, which moves the output by
    at most twice that times max|v|; the value sum over `end` terms adds end u max|v|."""
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    why = ext.isa_status()[isa]
    if why != "ready":
        pytest.skip(f"ISA variant {isa}: {why}")
    from lowbit.nn.step import KVCache
    H, G, T, hd, end, scaling = 9, 3, 1100, 64, 1037, 64 ** -0.5
    g = torch.Generator().manual_seed(3)
    c = KVCache(1, G, T, hd, torch.float32, kv)
    k, v = c.layer(0, 0)
    k[:, :end] = torch.randn(G, end, hd, generator=g) * torch.rand(G, end, 1, generator=g) * 4
    v[:, :end] = torch.randn(G, end, hd, generator=g)
    c.commit(0, 0, end)
    kd, vd = (t[:, :end].double() for t in c.layer(0, end))        # what the cache holds
    q = torch.randn(H, hd, generator=g)
    with ext.use_isa(isa):
        got = c.attend(0, q, end, scaling)
    rep = H // G
    kh, vh = kd.repeat_interleave(rep, 0), vd.repeat_interleave(rep, 0)   # (H, end, hd)
    s = scaling * torch.einsum("hd,htd->ht", q.double(), kh)
    want = torch.einsum("ht,htd->hd", torch.softmax(s, -1), vh)
    u = 2.0 ** -24
    vmax = float(vd.abs().max())
    dscore = hd * u * scaling * float(torch.einsum("hd,htd->ht", q.double().abs(), kh.abs()).max())
    bound = vmax * (2 * dscore + (end + 16) * u)
    assert float((got.double() - want).abs().max()) <= bound
    with pytest.raises(RuntimeError, match="end"):
        torch.ops.lowbit_cpu.kv_attend(q, c._u8[0][0], c.ks[0], c._u8[1][0], c.vs[0], c._lut, kv == "int8", T + 1, 1.0)
