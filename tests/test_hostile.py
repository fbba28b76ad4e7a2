"""Issue 23's findings, each reproduced as a careless or hostile user met it (the real CLI and API,
the real bundled model), then held: overwrite safety, a corrupted GGUF cache, copied files, fp16
scale overflow, NaN/inf outside the quantized layers, bad options, stale temp directories, the
cached kernel library."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit import api
from lowbit.cli import main as cli_main
from lowbit.errors import LowbitError
from lowbit.models import LoadedModel
from lowbit.numerics.scheme import int_scheme
from lowbit.recipe import Recipe, Rule, get_recipe

pytestmark = pytest.mark.model
ONE = "model.layers.0.self_attn.q_proj"


def one_layer(method: str = "rtn") -> Recipe:
    return Recipe(name=f"one-{method}", rules=[Rule(ONE.replace(".", r"\.") + "$", int_scheme(4, 64), method)])


@pytest.fixture(scope="module")
def native_out(smollm2, tmp_path_factory):
    """A real native output (one quantized layer, the rest float) to tamper with."""
    model = copy.deepcopy(smollm2.model)
    rep = api.quantize(model, one_layer(), progress=False)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    return api.export(lm, rep, tmp_path_factory.mktemp("n") / "q", "native")


def _cli(argv) -> int:
    try:
        return cli_main([str(a) for a in argv])
    except SystemExit as e:          # argparse refusing an option
        return int(e.code)


# ---- overwrite safety ---------------------------------------------------------------------------

def test_cli_overwrite_refuses_foreign_paths(tmp_path, capsys):
    victim = tmp_path / "photos"
    victim.mkdir()
    (victim / "a.jpg").write_bytes(b"x")
    afile = tmp_path / "notes.gguf"
    afile.write_text("mine")
    assert _cli(["quantize", "smollm2-135m", "--recipe", "w4g128-rtn", "--out", victim, "--overwrite"]) == 2
    assert _cli(["quantize", "smollm2-135m", "--recipe", "q4_0", "--format", "gguf", "--out", afile,
                 "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not a lowbit output" in err and (victim / "a.jpg").exists() and afile.read_text() == "mine"


# ---- output paths and options fail before any work -----------------------------------------------

def test_bad_output_paths_refused_up_front(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    d = tmp_path / "adir"
    d.mkdir()
    assert _cli(["quantize", "smollm2-135m", "--recipe", "w4g128-rtn", "--out", f / "x"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert _cli(["imatrix", "smollm2-135m", "--out", d]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert _cli(["eval", "smollm2-135m", "--json", f / "r.json"]) == 2
    if os.geteuid() != 0:           # root writes through a read-only mode bit
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert _cli(["quantize", "smollm2-135m", "--recipe", "w4g128-rtn", "--out", ro / "x"]) == 2


@pytest.mark.parametrize("argv,what", [
    (["quantize", "smollm2-135m", "--out", "X", "--threads", "-1"], "--threads"),
    (["generate", "smollm2-135m", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "smollm2-135m", "--prompt", "hi", "--threads", "0"], "--threads"),
    (["imatrix", "smollm2-135m", "--out", "X.gguf", "--chunks", "-2"], "--chunks"),
    (["quantize", "smollm2-135m", "--out", "X", "--samples", "0"], "--samples"),
])
def test_bad_numbers_refused_by_the_parser(argv, what, capsys):
    assert _cli(argv) == 2
    assert what in capsys.readouterr().err


def test_group_size_options():
    for bad in ("w4g0-gptq", "w4g0-rtn"):
        with pytest.raises(LowbitError, match="group size 0"):
            get_recipe(bad)
    with pytest.raises(LowbitError, match="group_size"):
        get_recipe("w4g100000000-rtn")
    assert "per output channel" in get_recipe("w4-rtn").description


def test_seq_len_past_context_refused(smollm2):
    with pytest.raises(LowbitError, match="context of 8192"):
        api.quantize(copy.deepcopy(smollm2.model), one_layer("gptq"), tokenizer=smollm2.tokenizer,
                     calibration={"seq_len": 9000, "n_samples": 1})


def test_generate_rejects_bad_sampling(smollm2):
    from lowbit.nn.decode import generate
    ids = smollm2.tokenizer("Paris is", return_tensors="pt").input_ids
    for kw in ({"temperature": float("nan")}, {"temperature": -1.0}, {"top_k": -3}):
        with pytest.raises(LowbitError, match="generate"):
            generate(smollm2.model, ids, 2, **kw)
    with pytest.raises(LowbitError, match="outside the model's vocabulary"):
        generate(smollm2.model, torch.tensor([[1, 49152]]), 2)


# ---- numerics: fp16 scale overflow, NaN/inf anywhere ---------------------------------------------

def test_rtn_fp16_scale_overflow_refused_naming_the_tensor(smollm2):
    model = copy.deepcopy(smollm2.model)
    model.get_submodule(ONE).weight.data[3, 5] = 1e6         # finite, but its scale is not an fp16
    with pytest.raises(LowbitError, match=rf"{ONE}\.weight: .*exceeds the float16 range"):
        api.quantize(model, one_layer(), progress=False)
    # with float32 scales it quantizes and stays finite
    r = Recipe(name="f32", rules=[Rule(ONE.replace(".", r"\.") + "$", int_scheme(4, 64), "rtn",
                                       {"scale_dtype": "float32"})])
    rep = api.quantize(model, r, progress=False)
    assert bool(torch.isfinite(rep.qweights[ONE].scale).all())


def test_nonfinite_weight_error_names_the_tensor(smollm2):
    model = copy.deepcopy(smollm2.model)
    model.get_submodule(ONE).weight.data[0, 0] = float("nan")
    with pytest.raises(LowbitError, match=rf"^{ONE}\.weight: .*contains 1 NaN/inf"):
        api.quantize(model, one_layer(), progress=False)


@pytest.mark.parametrize("fmt", ["native", pytest.param("gptq", marks=pytest.mark.slow),
                                 pytest.param("compressed-tensors", marks=pytest.mark.slow)])
def test_nan_outside_quantized_layers_never_saved(smollm2, tmp_path, fmt):
    model = copy.deepcopy(smollm2.model)
    model.model.norm.weight.data[7] = float("inf")
    rep = api.quantize(model, one_layer("rtn"), progress=False)
    lm = LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256)
    out = tmp_path / "m"
    with pytest.raises(LowbitError, match=r"model\.norm\.weight"):
        api.export(lm, rep, out, fmt)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _nan_copy(native_out, tmp_path) -> Path:
    """The native output with one NaN in model.norm.weight, re-hashed: consistent but broken."""
    from safetensors.torch import load_file, save_file

    from lowbit.export.manifest import write_manifest
    bad = tmp_path / "bad"
    shutil.copytree(native_out, bad)
    t = load_file(bad / "model.safetensors")
    t["model.norm.weight"][0] = float("nan")
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    m = json.loads((bad / "lowbit.json").read_text())      # re-hashed: a consistent but broken model
    write_manifest(bad, m, "lowbit.json")
    return bad


def test_nan_model_on_disk_refused_at_load(native_out, tmp_path):
    with pytest.raises(LowbitError, match=r"model\.norm\.weight contains 1 NaN/inf"):
        api.load(_nan_copy(native_out, tmp_path))


@pytest.mark.slow
def test_generate_cli_on_nan_model_exits_nonzero(native_out, tmp_path):
    bad = _nan_copy(native_out, tmp_path)
    r = subprocess.run([sys.executable, "-m", "lowbit", "generate", str(bad), "--prompt", "Hi",
                        "--max-new-tokens", "2"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 2 and "NaN/inf" in r.stderr


def test_nan_logits_stop_generate(smollm2):
    from lowbit.nn.decode import generate
    model = copy.deepcopy(smollm2.model)
    model.model.norm.weight.data[:] = float("nan")
    with pytest.raises(LowbitError, match="logits contain"):
        generate(model, torch.tensor([[1, 504, 3458]]), 4)


def test_tokenizer_larger_than_embedding_refused(smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.export.common import check_vocab
    small = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(LowbitError, match="tokenizer has 49152 tokens but the model's embedding has 1000"):
        check_vocab(small, smollm2.tokenizer, "here")
    check_vocab(smollm2.model, smollm2.tokenizer, "here")


# ---- the GGUF-to-fp32 cache ----------------------------------------------------------------------

def test_corrupted_gguf_cache_entry_not_trusted(smollm2, tmp_path):
    from lowbit.models.cache_check import RECORD, cache_entry_ok, write_record
    from lowbit.models.registry import sha256_file
    entry = tmp_path / "entry"
    shutil.copytree(smollm2.path, entry)
    digest = smollm2.source_sha256
    if not (entry / RECORD).is_file():   # an entry cached before records existed: rebuilt on load
        assert cache_entry_ok(entry, digest) is not None
        write_record(entry, "x.gguf", digest)
    assert cache_entry_ok(entry, digest) is None
    assert cache_entry_ok(entry, "0" * 64) is not None            # made from another GGUF
    w = entry / "model.safetensors"
    with open(w, "r+b") as fh:                                    # one byte of the weights
        fh.seek(w.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert "model.safetensors" in cache_entry_ok(entry, digest)
    assert sha256_file(smollm2.path / "model.safetensors") != sha256_file(w)


@pytest.mark.slow
def test_corrupted_gguf_cache_is_rebuilt_on_load(tmp_path, monkeypatch):
    """End to end: the corrupted entry is dequantized again and the model is the pristine one."""
    from lowbit.models import load_model
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    good = load_model("smollm2-135m")
    ref = good.model.model.layers[3].mlp.down_proj.weight.clone()
    w = good.path / "model.safetensors"
    with open(w, "r+b") as fh:
        fh.seek(w.stat().st_size // 2)
        fh.write(b"\xff" * 4096)
    again = load_model("smollm2-135m")
    assert torch.equal(again.model.model.layers[3].mlp.down_proj.weight, ref)


# ---- temp directories left by a kill; the kernel library ------------------------------------------

def test_stale_temp_dirs_of_dead_processes_are_cleaned(tmp_path):
    from lowbit.export.common import output_dir
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()                                              # a pid that no longer runs
    stale = tmp_path / f".q.tmp{p.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    old = tmp_path / f".q.old{p.pid}"
    old.mkdir()
    live = tmp_path / f".q.tmp{os.getppid()}-zz"         # a running process's: left alone
    live.mkdir()
    with output_dir(tmp_path / "q") as tmp:
        (tmp / "lowbit.json").write_text("{}")
    assert not stale.exists() and not old.exists() and live.exists() and (tmp_path / "q").is_dir()


def test_cached_kernel_library_checked_before_load(tmp_path):
    from lowbit.nn import ext
    if ext.disabled() or not ext.load():
        pytest.skip(f"C++ kernels unavailable: {ext.status()}")
    lib = ext.library_path()
    assert ext.library_intact(lib)
    copy_ = tmp_path / lib.name
    shutil.copyfile(lib, copy_)
    shutil.copyfile(ext._digest_path(lib), ext._digest_path(copy_))
    assert ext.library_intact(copy_)
    with open(copy_, "r+b") as fh:
        fh.seek(4096)
        fh.write(b"\x90\x90")
    assert not ext.library_intact(copy_)
    ext._digest_path(copy_).unlink()
    assert not ext.library_intact(copy_)


@pytest.mark.model
def test_gguf_array_count_past_the_file_refused_by_every_reader(tmp_path, monkeypatch):
    """A GGUF whose tokenizer.ggml.token_type claims 2**40 entries. gguf-py's reader does not
    check a slice against the file (past the end it is just empty), so it would build one object
    per claimed entry: gigabytes from this 2 MB file (found by the fuzzer, target gguf_stream).
    Every lowbit path into a GGUF walks the header first and refuses it, naming the key."""
    import struct

    from lowbit.calibration.imatrix import Imatrix
    from lowbit.export.gguf.header import check_header
    from lowbit.export.gguf.reader import read_tensors
    from lowbit.models import resolve_source
    from lowbit.models.gguf_source import gguf_meta_dir
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    with open(resolve_source("smollm2-135m")[1], "rb") as fh:
        head = bytearray(fh.read(2 << 20))          # the whole header (1.8 MB) and some data
    good = tmp_path / "head.gguf"
    good.write_bytes(head)
    check_header(good)                             # the real header fits its file
    key = b"tokenizer.ggml.token_type"
    at = head.find(key) + len(key) + 4 + 4          # value type (array), element type, count
    assert struct.unpack_from("<I", head, at - 4)[0] == 5           # int32 elements: a real count
    struct.pack_into("<Q", head, at, 2 ** 40)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(head)
    expect = r"bad\.gguf: key 'tokenizer\.ggml\.token_type': claims 1099511627776 entries"
    for read in (check_header, read_tensors, gguf_meta_dir, Imatrix.load):
        with pytest.raises(LowbitError, match=expect):
            read(bad)
    with pytest.raises(LowbitError, match=expect):
        api.load(str(bad))
