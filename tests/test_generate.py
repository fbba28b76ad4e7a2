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


def fast_copy(model, dtype=torch.float32):
    fast = copy.deepcopy(model).to(dtype)
    rep = prepare_for_inference(fast)
    assert rep["layers"] == 211 and set(rep["backends"]) <= {"ext", "tiled"}
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


def test_bf16_compute_runs_and_agrees(smollm2, quantized):
    tok = smollm2.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref_model = reference_copy(quantized, torch.bfloat16)
    fast_model = fast_copy(quantized, torch.bfloat16)
    with torch.inference_mode():
        lr, lf = ref_model(ids).logits, fast_model(ids).logits
    assert lf.dtype == torch.bfloat16
    # the reference rounds W to bf16, our kernels keep fp32 weights: differences are bf16-sized
    assert torch.equal(lr[0, -1].float().argmax(), lf[0, -1].float().argmax())
    assert float((lr.float() - lf.float()).abs().mean()) < 0.05 * float(lr.float().abs().mean())
    fast = generate(fast_model, ids, 8, min_new_tokens=8)
    ref = generate(ref_model, ids, 8, min_new_tokens=8)
    assert fast.tokens[:4] == ref.tokens[:4], (tok.decode(ref.tokens), tok.decode(fast.tokens))


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
    assert "decode 6 tok @" in err and "tok/s" in err and "kernels ext" in err


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
    assert generate(loaded.model, ids, 8).tokens == generate(fast, ids, 8).tokens
