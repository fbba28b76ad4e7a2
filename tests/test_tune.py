"""End-to-end fine-tuning with codes fixed (lowbit.train.tune): the tuned module is the quantized
one at step 0 (int grids with act-order g_idx, vector codebooks), the teacher's kept states give
the float model's logits, and on the real bundled model: quantize with a -ft recipe -> the KL on
the windows falls, every code is unchanged, scales are fp16 numbers -> native export -> read back
with the same logits. A tuning that ends worse keeps the start, byte for byte."""
import copy
import dataclasses

import pytest
import torch

from lowbit import api
from lowbit.data.text import load_text, token_windows, tokenize_text
from lowbit.errors import LowbitError
from lowbit.nn.qlinear import QuantLinear
from lowbit.numerics.qweight import QuantizedWeight, quantize_weight
from lowbit.numerics.scheme import int_scheme
from lowbit.recipe import Recipe, Rule, get_recipe
from lowbit.train.tune import TuneConfig, _TunedLinear, finetune, teacher_of


def _windows(tok, n=4, seq=64):
    # a slice of wiki-calibration tokenized (the whole text costs seconds)
    return token_windows(tokenize_text(tok, load_text("wiki-calibration")[:12000]), seq, max_windows=n)


def test_tuned_int_linear_is_the_quantized_one_at_step_0():
    """GPTQ-style codes (not RTN of anything) with an act-order g_idx and a ragged last group."""
    scheme = int_scheme(3, 48)
    w = torch.randn(16, 200) * 0.05
    g_idx = (torch.arange(200) // 48)[torch.randperm(200)].int()
    qw0 = quantize_weight(w, scheme)
    codes = torch.randint(0, 8, qw0.qdata.shape, dtype=torch.uint8)
    qw = QuantizedWeight(codes, qw0.scale, qw0.zero_point, scheme, None)
    qw_g = QuantizedWeight(codes, qw0.scale, qw0.zero_point, scheme, g_idx)
    for q in (qw, qw_g):
        m = _TunedLinear(q, None)
        assert torch.equal(m.weight(), q.dequantize(torch.float32))
        back = m.result()
        assert torch.equal(back.qdata, q.qdata) and torch.equal(back.scale, q.scale.float())
        # gradients reach every scale group, none reaches the codes (there is no latent weight)
        m.weight().sum().backward()
        assert m.u.grad is not None and bool((m.u.grad != 0).any())
        assert [n for n, _ in m.named_parameters()] == ["u"]


def test_tuned_vq_linear_is_the_quantized_one_at_step_0(smollm2):
    from lowbit.methods.vq import VQConfig, vq_quantize
    from lowbit.numerics.vq import vq_scheme
    w = smollm2.model.model.layers[2].self_attn.k_proj.weight.detach().float()
    x = torch.randn(256, w.shape[1], dtype=torch.float64)
    vw = vq_quantize(w, x.t() @ x, vq_scheme(2, 64), VQConfig(kmeans_iters=2))
    m = _TunedLinear(vw, None)
    assert torch.equal(m.weight(), vw.dequantize(torch.float32))
    back = m.result()
    assert torch.equal(back.indices, vw.indices) and torch.equal(back.codebook, vw.codebook)
    assert sorted(n for n, _ in m.named_parameters()) == ["codebook", "u"]


def test_teacher_states_give_the_float_models_logits(smollm2):
    ids = _windows(smollm2.tokenizer, 2, 32)
    t = teacher_of(smollm2.model, ids)
    assert t.hidden.shape == (2, 32, smollm2.model.config.hidden_size)
    with torch.no_grad():
        want = torch.log_softmax(smollm2.model(input_ids=ids).logits.float(), -1).reshape(-1, t.head_weight.shape[0])
    got = t.log_probs(torch.arange(2))
    assert torch.allclose(got, want, atol=1e-4)


def test_recipe_grammar_and_options():
    r = get_recipe("w4g64-rot-gptq-actorder-mse-ft")
    assert r.finetune == dataclasses.asdict(TuneConfig()) and r.transforms
    assert "fine-tuned end to end" in r.description
    assert Recipe.from_dict(r.to_dict()).finetune == r.finetune
    assert "finetune" not in get_recipe("w4g64-rtn").to_dict()      # recipes without it keep their bytes
    assert get_recipe("w2g64-vq-ft").finetune["epochs"] == TuneConfig().epochs
    with pytest.raises(LowbitError, match=r"finetune: unknown option\(s\) \['epoch'\]"):
        Recipe("x", [Rule(".*", int_scheme(4, 64))], finetune={"epoch": 2})
    with pytest.raises(LowbitError, match="finetune option lr"):
        TuneConfig(lr=float("nan"))
    with pytest.raises(LowbitError, match="finetune option epochs"):
        TuneConfig(epochs=0)


@pytest.fixture(scope="module")
def tuned(smollm2):
    """Bundled model, w3g64 RTN on blocks 0-3 (the rest float), then 2 epochs of fine-tuning on 4
    windows of 64 tokens of wiki-calibration."""
    model = copy.deepcopy(smollm2.model)
    ids = _windows(smollm2.tokenizer)
    start = api.quantize(copy.deepcopy(smollm2.model),
                         Recipe("w3g64-rtn", [Rule(r"model\.layers\.[0-3]\.", int_scheme(3, 64))]), progress=False)
    recipe = Recipe("w3g64-rtn-ft", [Rule(r"model\.layers\.[0-3]\.", int_scheme(3, 64))],
                    finetune={"epochs": 2, "batch_size": 2, "lr": 3e-3})
    rep = api.quantize(model, recipe, tokens=ids, progress=False)
    return model, rep, start, ids


def test_finetune_lowers_the_kl_and_keeps_every_code(tuned, smollm2):
    model, rep, start, ids = tuned
    f = rep.finetune
    assert f["kept"] and f["loss_final"] < f["loss_init"] and f["layers"] == 28
    assert f["norms"] == 2 * 30 + 1                  # every block's two norms and the final norm
    assert all(r["method"] == "rtn+ft" for r in rep.layers) and "finetune" in rep.timing
    assert any("finetune: KL" in n for n in rep.notes)
    moved = 0
    for name, qw in rep.qweights.items():
        q0 = start.qweights[name]
        assert torch.equal(qw.qdata, q0.qdata)                         # codes fixed
        assert torch.equal(qw.scale.half().float(), qw.scale)          # what the file stores
        moved += int(not torch.equal(qw.scale, q0.scale))
        assert isinstance(model.get_submodule(name), QuantLinear)
    assert moved == len(rep.qweights)
    assert not any(p.requires_grad for p in model.parameters())
    # the measured KL on the windows matches what the report says (the file's numbers)
    t = teacher_of(smollm2.model, ids)
    from lowbit.train.tune import InMemory
    assert abs(InMemory(model).mean_kl(ids, t, 2) - f["loss_final"]) < 1e-4 * max(1.0, f["loss_final"])


@pytest.mark.parametrize("fmt", ["native", "gptq"])
def test_finetuned_model_exports_and_reads_back_the_same_logits(tuned, smollm2, tmp_path, fmt):
    """The codes are the method's, the scales plain fp16: any format that holds the scheme holds it."""
    model, rep, _, ids = tuned
    lm = dataclasses.replace(smollm2, model=model)
    out = api.export(lm, rep, tmp_path / fmt, format=fmt)
    back = api.load(out)
    with torch.no_grad():
        a = model(input_ids=ids[:1]).logits
        b = back.model(input_ids=ids[:1]).logits
    assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))
    if fmt == "native":
        import json
        man = json.loads((out / "lowbit.json").read_text())
        assert man["lowbit_recipe"]["finetune"]["epochs"] == 2 and man["lowbit_recipe"]["name"] == "w3g64-rtn-ft"


def test_a_worse_tuning_keeps_the_start(smollm2):
    """lr 1e3 wrecks the scales: the result is refused (or the KL turns non-finite and the run
    fails with the reason) and either way the model is the quantized start again."""
    model = copy.deepcopy(smollm2.model)
    ids = _windows(smollm2.tokenizer, 2, 32)
    t = teacher_of(model, ids)
    rep = api.quantize(model, Recipe("w4g64-rtn", [Rule(r"model\.layers\.0\.", int_scheme(4, 64))]), progress=False)
    before = {n: (qw.qdata.clone(), qw.scale.clone()) for n, qw in rep.qweights.items()}
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    with torch.no_grad():
        want = model(input_ids=ids).logits
    try:
        res = finetune(model, ids, t, TuneConfig(epochs=1, batch_size=1, lr=1e3, norm_lr=1e3), qweights=rep.qweights)
        assert not res.kept and res.loss_final >= res.loss_init
    except LowbitError as e:
        assert "lower lr" in str(e)
    for n, (q, s) in before.items():
        assert torch.equal(rep.qweights[n].qdata, q) and torch.equal(rep.qweights[n].scale, s)
        assert isinstance(model.get_submodule(n), QuantLinear)
    assert all(torch.equal(p, norms[n]) for n, p in model.named_parameters() if "norm" in n)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)


def test_refused_where_it_cannot_run(smollm2, tmp_path):
    ids = _windows(smollm2.tokenizer, 2, 32)
    t = teacher_of(smollm2.model, ids)
    with pytest.raises(LowbitError, match="no quantized linear"):
        finetune(copy.deepcopy(smollm2.model), ids, t)
    with pytest.raises(LowbitError, match="do not match the windows"):
        finetune(copy.deepcopy(smollm2.model), ids[:1], t)
    from lowbit.streaming import quantize_streaming
    from lowbit.recipe import Recipe, get_recipe
    ggml = Recipe.from_dict({**get_recipe("q4_k_m").to_dict(), "finetune": {"epochs": 1}})
    with pytest.raises(LowbitError, match="nothing to tune"):     # ggml blocks hold their own scales
        quantize_streaming(smollm2.path, ggml, tmp_path / "o.gguf", format="gguf")
    assert not (tmp_path / "o.gguf").exists()
    with pytest.raises(LowbitError, match="nothing to tune"):     # in memory: before any work
        api.quantize(copy.deepcopy(smollm2.model), ggml, tokens=ids, progress=False)
