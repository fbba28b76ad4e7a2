"""GGUF files from the real bundled model: writer, reader, imatrix, tokenizer metadata, CLI;
and (slow, needs bench/.venv-llamacpp) llama.cpp itself on our files."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.numerics.ggml import dequantize, quantize
from lowbit.calibration.imatrix import Imatrix, collect_imatrix, imatrix_targets
from lowbit.arch.gguf_names import permute_qk, unpermute_qk
from lowbit.export.gguf.reader import load_gguf, read_tensors
from lowbit.export.gguf.writer import write_gguf
from lowbit.models.load import resolve_source

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / "bench" / ".venv-llamacpp" / "bin" / "python"
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def source_gguf():
    return resolve_source("smollm2-135m")[1]


@pytest.fixture(scope="module")
def small_imatrix(smollm2):
    from lowbit.data.text import calibration_batches
    batches = calibration_batches(smollm2.tokenizer, 2, 128, seed=0)
    return collect_imatrix(smollm2.model, batches, imatrix_targets(smollm2.model), dataset="wiki-calibration",
                           progress=False)


@pytest.fixture(scope="module")
def q4km_file(smollm2, source_gguf, small_imatrix, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "smol-q4_k_m.gguf"
    rep = write_gguf(smollm2.model, out, "q4_k_m", hf_dir=smollm2.path, source_gguf=source_gguf,
                     imatrix=small_imatrix, progress=False)
    return out, rep


def test_q4_k_m_file_layout_and_bytes(smollm2, q4km_file, small_imatrix):
    path, rep = q4km_file
    r = gguf.GGUFReader(path)
    f = r.fields
    assert f["GGUF.version"].contents() == 3
    assert f["general.architecture"].contents() == "llama"
    assert f["general.quantization_version"].contents() == 2
    assert f["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert f["tokenizer.ggml.pre"].contents() == "smollm" and len(f["tokenizer.ggml.tokens"].data) == 49152
    assert f["tokenizer.chat_template"].contents().startswith("{% for message in messages %}")
    assert f["llama.block_count"].contents() == 30 and f["llama.attention.head_count_kv"].contents() == 3
    assert f["quantize.imatrix.entries_count"].contents() == 210
    assert r.data_offset % 32 == 0 and all(t.data_offset % 32 == 0 for t in r.tensors)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert len(types) == 272 and "output.weight" not in types            # tied: token_embd is the output
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q5_0"
    assert types["blk.5.ffn_down.weight"] == "Q6_K" and types["blk.6.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    # every 576-column tensor fell back, and the report names each one
    fb = {t.name: (t.wanted, t.used) for t in rep.fallbacks}
    assert fb["blk.0.attn_q.weight"] == ("Q4_K", "Q5_0") and fb["blk.0.attn_v.weight"] == ("Q6_K", "Q8_0")
    assert len(fb) == 181 and "blk.6.ffn_down.weight" not in fb
    # tensor bytes are the codec's, on llama.cpp's row order (q/k permuted per head)
    sd = smollm2.model.state_dict()
    tens = {t.name: np.asarray(t.data) for t in r.tensors}
    w_down = sd["model.layers.6.mlp.down_proj.weight"].numpy()
    imp = small_imatrix.mean("blk.6.ffn_down.weight")
    assert np.array_equal(tens["blk.6.ffn_down.weight"].ravel(), quantize(w_down, "Q4_K", imatrix=imp).ravel())
    wq = permute_qk(sd["model.layers.3.self_attn.q_proj.weight"].numpy(), 9)
    imq = small_imatrix.mean("blk.3.attn_q.weight")
    assert np.array_equal(tens["blk.3.attn_q.weight"].ravel(), quantize(wq, "Q5_0", imatrix=imq).ravel())
    assert abs(rep.bits_per_weight - 8 * sum(t.nbytes for t in rep.tensors) / rep.n_weights) < 1e-9


def test_reader_round_trip_and_model_quality(smollm2, q4km_file):
    path, _ = q4km_file
    tensors = read_tensors(path)
    r = {t.name: t for t in gguf.GGUFReader(path).tensors}
    raw = np.asarray(r["blk.2.attn_k.weight"].data)
    assert np.array_equal(tensors["blk.2.attn_k.weight"], dequantize(raw, "Q5_0", (192, 576)))
    model, tok, meta = load_gguf(path)
    assert meta["general.name"].startswith("Smollm2")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = smollm2.model.state_dict()
    got = model.state_dict()
    for k in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"):
        rel = float((got[k] - ref[k]).norm() / ref[k].norm())
        assert rel < 0.05, f"{k}: relative error {rel:.3f} (un-permuted rows must line up)"
    ids = smollm2.tokenizer("The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named after",
                            return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits.argmax(-1), smollm2.model(ids).logits.argmax(-1)
    assert float((a == b).float().mean()) > 0.8


def test_f16_file_round_trips_exactly(smollm2, source_gguf, tmp_path):
    out = tmp_path / "smol-f16.gguf"
    rep = write_gguf(smollm2.model, out, "f16", hf_dir=smollm2.path, source_gguf=source_gguf, progress=False)
    got = read_tensors(out)
    ref = smollm2.model.state_dict()
    for row in rep.tensors:
        want = ref[row.hf_name].numpy()
        if want.ndim == 2:
            want = want.astype(np.float16).astype(np.float32)
        if ".q_proj." in row.hf_name or ".k_proj." in row.hf_name:
            want = permute_qk(want, 9 if ".q_proj." in row.hf_name else 3)
        assert np.array_equal(got[row.name], want), row.name


def test_imatrix_statistic_and_file_formats(smollm2, small_imatrix, tmp_path):
    im = small_imatrix
    assert len(im.sums) == 210 and set(im.counts.values()) == {256}
    # blk.0 attention input = input_layernorm(embeddings): check the hook's statistic directly
    from lowbit.data.text import calibration_batches
    ids = calibration_batches(smollm2.tokenizer, 2, 128, seed=0)
    with torch.no_grad():
        h = smollm2.model.model.layers[0].input_layernorm(smollm2.model.model.embed_tokens(ids)).double()
    want = (h ** 2).reshape(-1, 576).mean(0).numpy()
    assert np.allclose(im.mean("blk.0.attn_q.weight"), want, rtol=1e-5)
    assert np.array_equal(im.mean("blk.0.attn_q.weight"), im.mean("blk.0.attn_v.weight"))  # shared input
    p = im.save(tmp_path / "im.gguf")
    r = gguf.GGUFReader(p)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == 2 and r.fields["imatrix.chunk_size"].contents() == 128
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.attn_q.weight.in_sum2"].shape.tolist() == [576, 1] and "blk.0.attn_q.weight.counts" in t
    back = Imatrix.load(p)
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
        # bit for bit what llama-quantize computes from the file: float32 in_sum2 / float32 count,
        # so a file quantized with the in-memory matrix equals llama.cpp's made with the saved one
        sums = np.asarray(t[name + ".in_sum2"].data, dtype=np.float32).ravel()
        count = np.float32(np.asarray(t[name + ".counts"].data).ravel()[0])
        assert np.array_equal(im.mean(name), sums / count)
        assert np.array_equal(back.mean(name), im.mean(name))
    legacy = Imatrix.load(im.save(tmp_path / "im.dat"))
    assert legacy.chunk_count == 2 and legacy.datasets == ["wiki-calibration"]
    assert np.allclose(legacy.mean("blk.7.ffn_up.weight"), im.mean("blk.7.ffn_up.weight"), rtol=1e-6)
    (tmp_path / "bad.dat").write_bytes(b"\x02\x00\x00\x00\x05")
    with pytest.raises(LowbitError, match="truncated"):
        Imatrix.load(tmp_path / "bad.dat")


def test_tokenizer_from_hf_matches_llama_cpp_converter(smollm2, source_gguf, tmp_path):
    """Built from the HF tokenizer, the vocabulary, types, merges and special ids equal those
    llama.cpp's convert_hf_to_gguf.py wrote into the bundled GGUF."""
    from lowbit.export.gguf.vocab import add_hf_tokenizer, detect_pre
    out = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(out, arch="llama")
    add_hf_tokenizer(w, smollm2.path, 49152, pre="smollm")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, ref = gguf.GGUFReader(out).fields, gguf.GGUFReader(source_gguf).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        assert ours[key].contents() == ref[key].contents(), key
    tj = json.loads((Path(smollm2.path) / "tokenizer.json").read_text())
    assert detect_pre(tj) == "gpt-2"   # transformers' GGUF->HF conversion keeps only the byte-level step


def test_permute_inverse_and_refusals(smollm2, tmp_path):
    w = np.arange(192 * 4, dtype=np.float32).reshape(192, 4)
    assert np.array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
    from lowbit.numerics.scheme import Scheme
    from lowbit.recipe import Recipe, Rule
    nf4 = Recipe("nf4", [Rule(r"\.mlp\.", Scheme(bits=4, format="nf4", group_size=64), "rtn")])
    with pytest.raises(LowbitError, match="GGUF holds ggml types"):
        write_gguf(smollm2.model, tmp_path / "x.gguf", nf4, hf_dir=smollm2.path, progress=False)
    assert not list(tmp_path.iterdir())      # nothing half-written left behind


def test_cli_export_and_imatrix(tmp_path, capsys):
    from lowbit.cli import main
    im = tmp_path / "im.gguf"
    assert main(["imatrix", "smollm2-135m", "--out", str(im), "--chunks", "1", "--seq-len", "64", "--quiet"]) == 0
    out = tmp_path / "smol-q8_0.gguf"
    assert main(["export", "smollm2-135m", "--format", "gguf", "--type", "q8_0", "--imatrix", str(im),
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "Q8_0" in text and "0 fallback(s)" in text
    assert main(["verify", str(out)]) == 0
    fields = gguf.GGUFReader(out).fields
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert fields["quantize.imatrix.file"].contents() == str(im)   # llama-quantize's record of its imatrix


# ---- llama.cpp itself (slow; needs the peer venv and bench/peers/llamacpp_ref.py) ----------------
def _peer(*args: str) -> dict:
    if not PEER_PY.is_file() or not (ROOT / "bench" / "peers" / "llamacpp_ref.py").is_file():
        pytest.skip("bench/.venv-llamacpp (bench/setup_peers.sh llamacpp) or bench/peers/llamacpp_ref.py absent")
    r = subprocess.run([str(PEER_PY), *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip()
    return json.loads(out[out.rfind("\n{") + 1:] if not out.startswith("{") else out)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["q4_k_m", "q2_k", "q6_k"])
def test_llama_cpp_quantizer_gives_our_exact_tensors(smollm2, source_gguf, small_imatrix, tmp_path, preset):
    """llama.cpp's own llama_model_quantize, from an F32 GGUF written by lowbit, with and without the
    same imatrix, produces byte-identical tensors to lowbit's direct export."""
    f32 = tmp_path / "f32.gguf"
    write_gguf(smollm2.model, f32, "f32", hf_dir=smollm2.path, source_gguf=source_gguf, progress=False)
    imf = small_imatrix.save(tmp_path / "im.gguf")
    for im in (None, imf):
        ours = tmp_path / "ours.gguf"
        write_gguf(smollm2.model, ours, preset, hf_dir=smollm2.path, source_gguf=source_gguf,
                   imatrix=None if im is None else Imatrix.load(im), progress=False)
        theirs = tmp_path / "theirs.gguf"
        args = ["bench/peers/llamacpp_ref.py", "quantize", str(f32), str(theirs), "--ftype", preset.upper()]
        _peer(*args, *(["--imatrix", str(im)] if im else []))
        a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        assert set(a) == set(b)
        bad = [n for n in a if a[n].tensor_type != b[n].tensor_type
               or not np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))]
        assert not bad, f"{preset} imatrix={im is not None}: {len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.slow
def test_llama_cpp_perplexity_agrees_with_ours(smollm2, q4km_file, tmp_path):
    """llama.cpp runs our Q4_K_M file; its perplexity on the same 2 x 512 token windows agrees with
    lowbit's evaluation of the same file within 2%. The gap is llama.cpp's arithmetic, not the file:
    it quantizes activations to 8 bits for its quantized dot products and keeps the KV cache in
    fp16, while lowbit dequantizes to fp32 (on an F32 file the two agree to 1e-5, BENCHMARKS.md)."""
    from lowbit.data.text import load_text, token_windows, tokenize_text
    path, _ = q4km_file
    wins = token_windows(tokenize_text(smollm2.tokenizer, load_text("wiki-evaluation")), 512, 2)
    np.save(tmp_path / "w.npy", wins.numpy())
    theirs = _peer("bench/peers/llamacpp_ids_ppl.py", str(path), str(tmp_path / "w.npy"))
    model, _, _ = load_gguf(path)
    with torch.no_grad():
        nll = []
        for w in wins:
            logits = model(w[None]).logits[0, :-1].double()
            nll.append(float((torch.logsumexp(logits, -1) - logits.gather(1, w[1:, None])[:, 0]).mean()))
    ours = float(np.exp(np.mean(nll)))
    assert abs(theirs["ppl"] / ours - 1) < 0.02, (ours, theirs["ppl"])


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_lowbit(smollm2, tmp_path):
    """Exported from an HF directory (tokenizer.ggml.* built from tokenizer.json), llama.cpp cuts the
    whole evaluation text into exactly the token ids lowbit's tokenizer gives."""
    from lowbit.data.text import load_text, tokenize_text
    from lowbit.data.text import NAMED_TEXTS
    out = tmp_path / "hf.gguf"
    write_gguf(smollm2.model, out, "q8_0", hf_dir=smollm2.path, progress=False)
    theirs = _peer("bench/peers/llamacpp_ids_ppl.py", str(out), "--tokenize", str(NAMED_TEXTS["wiki-evaluation"]))
    ours = tokenize_text(smollm2.tokenizer, load_text("wiki-evaluation")).tolist()
    assert theirs["text_tokens"] == ours
