"""Export of issue-19 results: static W8A8 as compressed-tensors with input_scale tensors (vLLM's
format), AWQ-transformed weights as AWQ GEMM (the folded norms travel as plain float weights)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.export import compressed_tensors as ct
from lowbit.export import native
from lowbit.models import LoadedModel, load_model
from lowbit.recipe import Recipe, Rule, get_recipe

pytestmark = pytest.mark.model
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 260, 1345]])


def _slice(name: str, pattern: str = r"model\.layers\.[01]\.") -> Recipe:
    base = get_recipe(name)
    return Recipe(name, [Rule(pattern, r.scheme, r.method, r.method_args, r.input_activations) for r in base.rules],
                  transforms=base.transforms)


def _quantized(smollm2, recipe):
    m = copy.deepcopy(smollm2.model)
    tokens = torch.randint(100, 20000, (2, 64), generator=torch.Generator().manual_seed(0))
    rep = api.quantize(m, recipe, tokens=tokens, progress=False)
    return LoadedModel(m, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256), rep


def test_static_w8a8_writes_input_scales(smollm2, tmp_path):
    lm, rep = _quantized(smollm2, _slice("w8a8-static-minmax"))
    out = api.export(lm, rep, tmp_path / "w8a8s", format="compressed-tensors")
    g = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert g["format"] == "int-quantized"
    assert g["input_activations"]["strategy"] == "tensor" and g["input_activations"]["dynamic"] is False
    t = load_file(str(out / "model.safetensors"))
    q = lm.model.model.layers[1].self_attn.o_proj
    assert t["model.layers.1.self_attn.o_proj.input_scale"].tolist() == [float(q.act_quant.scale)]
    assert sum(k.endswith(".input_scale") for k in t) == 14


def test_static_w8a8_reads_back_with_its_scales(smollm2, tmp_path):
    """Both formats that hold a static W8A8 model give it back: the calibrated per-tensor scale
    of every layer bit for bit, and so the same logits as the model that was quantized."""
    lm, rep = _quantized(smollm2, _slice("w8a8-static-minmax"))
    with torch.no_grad():
        ref = lm.model(IDS).logits
    want = {n: m.act_quant for n, m in lm.model.named_modules() if getattr(m, "act_quant", None) is not None}
    assert len(want) == 14
    for fmt in ("compressed-tensors", "native"):
        back = load_model(api.export(lm, rep, tmp_path / fmt.replace("-", "_"), format=fmt))
        got = {n: m.act_quant for n, m in back.model.named_modules() if getattr(m, "act_quant", None) is not None}
        assert sorted(got) == sorted(want), fmt
        for n, a in got.items():
            assert not a.scheme.dynamic and a.scale.dtype == torch.float32, (fmt, n)
            assert torch.equal(a.scale, want[n].scale.float()), (fmt, n)
        with torch.no_grad():
            assert torch.equal(back.model(IDS).logits, ref), fmt


def test_static_scale_missing_or_bad_is_refused(smollm2, tmp_path):
    lm, rep = _quantized(smollm2, _slice("w8a8-static-minmax", r"model\.layers\.0\.self_attn\.o_proj"))
    out = api.export(lm, rep, tmp_path / "nat", format="native")
    m = json.loads((out / "lowbit.json").read_text())
    m["layers"]["model.layers.0.self_attn.o_proj"]["input_scale"] = -1.0
    (out / "lowbit.json").write_text(json.dumps(m))
    with pytest.raises(LowbitError, match=r"lowbit\.json: layer model\.layers\.0\.self_attn\.o_proj: static input "
                                          r"activations .*positive finite 'input_scale'.* got -1\.0"):
        native.read(out, verify_files=False)
    ct_out = api.export(lm, rep, tmp_path / "ct", format="compressed-tensors")
    t = load_file(str(ct_out / "model.safetensors"))
    t["model.layers.0.self_attn.o_proj.input_scale"] = torch.tensor([float("nan")])
    from safetensors.torch import save_file
    save_file(t, str(ct_out / "model.safetensors"), metadata={"format": "pt"})
    (ct_out / "lowbit_manifest.json").unlink()     # as a peer's checkpoint: no hashes of ours to trip first
    with pytest.raises(LowbitError, match=r"o_proj\.input_scale: expected one positive finite float scale"):
        ct.read(ct_out)


def test_llm_int8_has_no_compressed_tensors_form(smollm2, tmp_path):
    lm, rep = _quantized(smollm2, _slice("llm-int8", r"model\.layers\.0\.mlp\.down_proj"))
    assert rep.layers[0]["outlier_columns"] >= 0
    with pytest.raises(LowbitError, match="LLM.int8"):
        api.export(lm, rep, tmp_path / "x", format="compressed-tensors")


@pytest.mark.slow
def test_awq_result_round_trips_as_awq_gemm(smollm2, tmp_path):
    lm, rep = _quantized(smollm2, _slice("w4g64-awq"))
    out = api.export(lm, rep, tmp_path / "awq", "awq")
    back = load_model(out)
    with torch.no_grad():
        a, b = lm.model(IDS).logits, back.model(IDS).logits
    # the checkpoint holds the folded norms and the AWQ-scaled codes; the float model is not it
    with torch.no_grad():
        f = smollm2.model(IDS).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4) and not torch.allclose(a, f, atol=1e-3)


def test_w8a8_read_from_a_file_runs_the_int8_kernel(smollm2, tmp_path):
    """A W8A8 file read straight into kernels (`lowbit generate`'s path, backend "auto") runs the
    int8 kernel on the packed codes themselves (one copy of the weights), as prepare_for_inference
    does in memory: the same op on the same codes, so the same logits bit for bit. Another input
    scheme, or none, puts the layer back on its packed kernel."""
    from lowbit.nn import ext
    from lowbit.nn.prepare import prepare_for_inference
    from lowbit.nn.w8a8 import W8A8Kernel
    if not ext.load():
        pytest.skip(f"lowbit C++ kernels unavailable: {ext.status()}")
    lm, rep = _quantized(smollm2, _slice("w8a8"))
    paths = {fmt: api.export(lm, rep, tmp_path / fmt.replace("-", "_"), format=fmt)
             for fmt in ("native", "compressed-tensors")}
    codes = lm.model.model.layers[1].self_attn.k_proj.qdata.clone()
    assert prepare_for_inference(lm.model)["backends"] == {"w8a8": 14}
    with torch.no_grad():
        want = lm.model(IDS).logits
    for fmt, path in paths.items():
        back = load_model(path, backend="auto").model
        qs = [m for m in back.modules() if getattr(m, "act_quant", None) is not None]
        assert len(qs) == 14 and all(m.backend == "w8a8" for m in qs), fmt
        q = back.model.layers[1].self_attn.k_proj
        assert isinstance(q.kernel, W8A8Kernel) and q.kernel.codes.data_ptr() == q.packed.codes.data_ptr(), fmt
        assert torch.equal(q.qdata, codes), fmt
        with torch.no_grad():
            assert torch.equal(back(IDS).logits, want), fmt
        aq = q.act_quant
        q.act_quant = None                        # float inputs: the packed u8 kernel again
        assert q.kernel is q.packed and q.backend == "ext"
        q.act_quant = aq
        assert isinstance(q.kernel, W8A8Kernel)
