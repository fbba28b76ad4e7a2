"""Generation with a KV cache on packed-weight kernels, on the real bundled model, and the CLI."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.nn.decode import generate
from lowbit.nn.kernels import set_decode_activations
from lowbit.nn.prepare import PackedLinear, prepare_for_inference
from lowbit.nn.qlinear import QuantLinear
from lowbit.recipe import get_recipe

pytestmark = pytest.mark.model
PROMPT = "The history of the Roman Empire"


@pytest.fixture(scope="module")
def quantized(smollm2):
    """The bundled model, w4g128-rtn on every linear (lm_head included), quantized once."""
    m = copy.deepcopy(smollm2.model)
    recipe = get_recipe("w4g128-rtn")
    recipe.ignore = []
    api.quantize(m, recipe, progress=False)
    return m


def reference_copy(model, dtype=torch.float32):
    """QuantLinear's reference math (dequantize, then F.linear), with each dequantized weight
    computed once instead of on every call, so 16 reference tokens take seconds, not minutes."""
    ref = copy.deepcopy(model).to(dtype)
    for mod in ref.modules():
        if isinstance(mod, QuantLinear):
            w = mod.dequantize_weight(dtype)
            mod.set_kernel(lambda x, m, w=w: F.linear(x, w))
    return ref


def fast_copy(model, dtype=torch.float32, act="fp32"):
    """The packed-kernel model; decode activations pinned (fp32 unless asked) so the tests do
    not depend on kernels.DECODE_ACT."""
    fast = copy.deepcopy(model).to(dtype)
    rep = prepare_for_inference(fast)
    assert rep["layers"] == 211 and set(rep["backends"]) <= {"ext", "tiled"}
    set_decode_activations(fast, act)
    assert all(isinstance(m, PackedLinear) for m in fast.modules() if isinstance(m, QuantLinear))
    return fast


def test_kernel_path_greedy_tokens_equal_reference_fp32(smollm2, quantized):
    tok = smollm2.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref_model, fast_model = reference_copy(quantized), fast_copy(quantized)
    # the reference-with-cache equals QuantLinear's own forward
    x = torch.randn(2, 576)
    layer = quantized.model.layers[0].mlp.gate_proj
    assert torch.equal(ref_model.model.layers[0].mlp.gate_proj(x), layer(x))
    ref = generate(ref_model, ids, 16, min_new_tokens=16)
    fast = generate(fast_model, ids, 16, min_new_tokens=16)
    assert len(fast.tokens) == 16
    assert fast.tokens == ref.tokens, (tok.decode(ref.tokens), tok.decode(fast.tokens))
    assert fast.decode_tokens_per_s > 0 and fast.prompt_tokens_per_s > 0
    # the prompt's logits agree to fp32 rounding too (a stronger check than argmax)
    with torch.inference_mode():
        lr, lf = ref_model(ids).logits, fast_model(ids).logits
    assert float((lr - lf).abs().max()) < 1e-3 * float(lr.abs().max())


@torch.inference_mode()
def stepwise_logits(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits (1, P, V) of `ids` fed as a prefill of prompt_len tokens, then one cached decode
    step per token: the decode path (GEMV kernels) as generate() runs it, teacher-forced so both
    models see the same tokens whatever they would pick."""
    from transformers import DynamicCache
    out = model(input_ids=ids[:, :prompt_len], past_key_values=DynamicCache(), use_cache=True)
    logits = [out.logits.float()]
    for t in range(prompt_len, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits.float())
    return torch.cat(logits, dim=1)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


# bf16 tolerance, from the arithmetic. bf16 keeps 8 significant bits: each rounding of an
# intermediate is a relative error of at most u = 2^-8. On the way to the logits a value is
# rounded n = 30 blocks x 10 sites (input norm, q/k/v, attention, o_proj, residual add,
# post-attention norm, gate/up, act * up, down_proj, residual add) + final norm + lm_head = 302
# times. The errors are independent and the RMS norms keep each site's gain near 1, so they add
# in quadrature: a bf16 model's logits differ from exact (fp32) arithmetic by a relative RMS of
# at most u * sqrt(n) = 0.068, and two bf16 models (the reference rounds W to bf16, our kernels
# keep fp32 W and round only their outputs) from each other by at most sqrt(2) * u * sqrt(n).
# (Measured on the bundled model, prefill / decode, over the 4 ISA variants: 0.013-0.033 vs
# fp32, 0.013-0.030 between the two.)
BF16_SITES = 30 * 10 + 2
BF16_REL = 2.0 ** -8 * BF16_SITES ** 0.5


def test_bf16_compute_runs_and_agrees(smollm2, quantized):
    """bf16 activations on the packed kernels: logits of the prompt (prefill, tile path) and of 8
    cached decode steps (GEMV path) within bf16's own error of the fp32 model's and of the bf16
    reference's. (Greedy tokens are not compared: near-ties flip under any bf16 rounding
    order, e.g. AVX2 vs AVX-512 kernels.)"""
    tok = smollm2.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids
    p = ids.shape[1]
    ref32 = reference_copy(quantized)
    cont = torch.tensor([generate(ref32, ids, 8, min_new_tokens=8).tokens])
    seq = torch.cat([ids, cont], dim=1)
    ref_model = reference_copy(quantized, torch.bfloat16)
    fast_model = fast_copy(quantized, torch.bfloat16)
    with torch.inference_mode():
        assert fast_model(ids).logits.dtype == torch.bfloat16
    l32 = stepwise_logits(ref32, seq, p)
    lr, lf = stepwise_logits(ref_model, seq, p), stepwise_logits(fast_model, seq, p)
    assert bool(lf.isfinite().all())
    for name, part in (("prefill", slice(0, p)), ("decode", slice(p, None))):
        assert rel_rms(lf[:, part], l32[:, part]) <= BF16_REL, name
        assert rel_rms(lr[:, part], l32[:, part]) <= BF16_REL, name
        assert rel_rms(lf[:, part], lr[:, part]) <= 2 ** 0.5 * BF16_REL, name
    fast = generate(fast_model, ids, 8, min_new_tokens=8)
    assert len(fast.tokens) == 8 and fast.decode_tokens_per_s > 0


# int8 decode activations (kernels' act="int8"), tolerance from the arithmetic. Each linear's
# input is rounded per 32-value block to steps of d = max|x_b| / 127; the error is uniform in
# +-d/2, RMS d / sqrt(12) = max|x_b| / 440, and max|x_b| <= sqrt(32) * RMS(x_b), so each
# rounding is a relative RMS error of at most sqrt(32) / 440 = 0.0129. Per block 4 inputs are
# rounded (q/k/v share one, o_proj, gate/up share one, down_proj), plus lm_head: n = 121;
# independent errors add in quadrature: relative RMS <= 0.0129 * sqrt(121) = 0.14 vs the
# fp32-activation kernels. (Measured over the 4 ISA variants: 0.018-0.031.)
INT8_REL = 32 ** 0.5 / (127 * 12 ** 0.5) * (30 * 4 + 1) ** 0.5


def test_int8_decode_activations_close_to_fp32_activations(smollm2, quantized):
    from lowbit.nn import ext
    if not ext.load():
        pytest.skip(f"C++ extension unavailable: {ext.status()}")
    tok = smollm2.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids
    p = ids.shape[1]
    f32 = fast_copy(quantized)
    seq = torch.cat([ids, torch.tensor([generate(f32, ids, 8, min_new_tokens=8).tokens])], dim=1)
    l32 = stepwise_logits(f32, seq, p)
    set_decode_activations(f32, "int8")
    l8 = stepwise_logits(f32, seq, p)
    assert torch.equal(l8[:, :p], l32[:, :p])            # prefill (tile path) keeps fp32 activations
    assert 0 < rel_rms(l8[:, p:], l32[:, p:]) <= INT8_REL
    assert bool(l8.isfinite().all())


def test_generate_stops_at_eos_and_checks_input(smollm2):
    model = smollm2.model
    ids = smollm2.tokenizer("Hello", return_tensors="pt").input_ids
    first = generate(model, ids, 1).tokens[0]
    res = generate(model, ids, 10, eos_token_id=first)
    assert res.tokens == [first] and res.stopped_by == "eos"
    with pytest.raises(LowbitError, match="input_ids"):
        generate(model, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(LowbitError, match="max_new_tokens"):
        generate(model, ids, 0)


def test_cli_generate_streams_and_reports_speed(capsys):
    rc = main(["generate", "smollm2-135m", "--prompt", "The capital of France is",
               "--recipe", "w4g128-rtn", "--max-new-tokens", "6", "--threads", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.startswith("The capital of France is") and len(out) > len("The capital of France is")
    from lowbit.nn import ext
    kernel = "ext" if ext.load() else "tiled"   # LOWBIT_EXT=0: the tiled fallback
    assert "decode 6 tok @" in err and "tok/s" in err and f"kernels {kernel}" in err


def test_cli_generate_with_an_int8_kv_cache(capsys):
    rc = main(["generate", "smollm2-135m", "--prompt", "The capital of France is", "--kv-cache", "int8",
               "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("The capital of France is") and "int8 KV cache" in err
    with pytest.raises(SystemExit) as e:                      # argparse names the choices
        main(["generate", "smollm2-135m", "--prompt", "x", "--kv-cache", "int4"])
    assert e.value.code == 2 and "--kv-cache" in capsys.readouterr().err


def test_cli_chat_applies_template(capsys, smollm2):
    from lowbit.cli.generate import chat_input_ids
    tok = smollm2.tokenizer
    ids = chat_input_ids(tok, [{"role": "user", "content": "Hi"}])
    text = tok.decode(ids[0])
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    rc = main(["chat", "smollm2-135m", "--prompt", "What is the capital of France?",
               "--recipe", "w8-rtn", "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("assistant> ") and "decode" in err
    assert main(["generate", "smollm2-135m", "--prompt", "x", "--quantize-lm-head"]) == 2


def test_load_packed_from_native_dir_never_builds_float_linears(smollm2, quantized, tmp_path):
    """Issue 4's native directory -> PackedLinear modules straight from the file."""
    native = pytest.importorskip("lowbit.export.native")
    from lowbit.models import load_model
    report = api.QuantizeReport(get_recipe("w4g128-rtn"))
    if not hasattr(report, "qweights"):
        pytest.skip("needs issue 4's api (QuantizeReport.qweights)")
    report.qweights = {n: m.qweight for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    lm = copy.copy(smollm2)
    lm.model = quantized
    out = native.save(lm, report, tmp_path / "w4")
    loaded = load_model(out, backend="auto")
    packed = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 211 and not any(p.is_meta for p in loaded.model.parameters())
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    fast = fast_copy(quantized)
    set_decode_activations(loaded.model, "fp32")   # as fast_copy: the same arithmetic, the same tokens
    assert generate(loaded.model, ids, 8).tokens == generate(fast, ids, 8).tokens
