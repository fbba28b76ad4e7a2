"""The formats layer itself: registry dispatch, sharded safetensors, manifests and `lowbit verify`,
atomic and safe overwrites, one native reader for both the reference and the packed path."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit import api
from lowbit.cli import main as cli_main
from lowbit.errors import LowbitError
from lowbit.export import detect_format, formats, get_format
from lowbit.export.common import parse_size
from lowbit.export.manifest import verify
from lowbit.models import LoadedModel, load_model
from lowbit.nn.qlinear import QuantLinear

pytestmark = pytest.mark.model
IDS = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 1001]])


@pytest.fixture(scope="module")
def rtn_model(smollm2):
    model = copy.deepcopy(smollm2.model)
    rep = api.quantize(model, "w4g64-rtn", progress=False)
    return LoadedModel(model, smollm2.tokenizer, smollm2.path, smollm2.source, smollm2.source_sha256), rep


def test_registry_names_and_errors():
    assert {"native", "gguf"} <= set(formats())
    with pytest.raises(LowbitError, match="unknown; expected one of"):
        get_format("safetensors-of-my-own")


def test_sharded_native_round_trip_and_verify(rtn_model, tmp_path):
    lm, rep = rtn_model
    out = api.export(lm, rep, tmp_path / "sharded", "native", max_shard_size="40MB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert detect_format(out).name == "native"
    back = load_model(out)
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, back.model(IDS).logits)
    assert verify(out)["files"] == len(json.loads((out / "lowbit.json").read_text())["files"])
    assert cli_main(["verify", str(out)]) == 0


def test_one_reader_two_paths(rtn_model, tmp_path):
    """The native reader builds QuantLinear (reference) or PackedLinear (kernels) from the same file."""
    from lowbit.nn.prepare import PackedLinear
    lm, rep = rtn_model
    out = api.export(lm, rep, tmp_path / "m", "native")
    ref, fast = load_model(out), load_model(out, backend="auto")
    assert any(type(m) is QuantLinear for m in ref.model.modules())
    assert sum(isinstance(m, PackedLinear) for m in fast.model.modules()) == len(rep.layers)
    with torch.no_grad():
        a, b = ref.model(IDS).logits, fast.model(IDS).logits
    # kernels sum in another order: fp32 rounding over K=1536-term dot products, 30 layers deep
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-2)


def test_tampered_and_hashless_manifests_refused(rtn_model, tmp_path):
    lm, rep = rtn_model
    out = api.export(lm, rep, tmp_path / "t", "native")
    m = json.loads((out / "lowbit.json").read_text())
    cfg = out / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    with pytest.raises(LowbitError, match="config.json: sha256 does not match"):
        verify(out)
    with pytest.raises(LowbitError, match="sha256 does not match"):
        load_model(out)
    del m["files"]
    (out / "lowbit.json").write_text(json.dumps(m))
    with pytest.raises(LowbitError, match="no 'files' table"):
        verify(out)
    assert cli_main(["verify", str(out)]) == 2


def test_unlisted_weights_file_refused(rtn_model, tmp_path):
    lm, rep = rtn_model
    out = api.export(lm, rep, tmp_path / "u", "native")
    (out / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(LowbitError, match="not listed"):
        verify(out)


def test_overwrite_only_replaces_lowbit_outputs(rtn_model, tmp_path):
    lm, rep = rtn_model
    victim = tmp_path / "not-ours"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    with pytest.raises(LowbitError, match="already exists"):
        api.export(lm, rep, victim, "native")
    with pytest.raises(LowbitError, match="not a lowbit output"):
        api.export(lm, rep, victim, "native", overwrite=True)
    assert (victim / "precious.txt").read_text() == "keep me"
    out = api.export(lm, rep, tmp_path / "ours", "native")
    api.export(lm, rep, out, "native", overwrite=True)        # an earlier lowbit output: replaced
    assert verify(out) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_source_files_copied_by_name_only(smollm2, rtn_model, tmp_path):
    """Only config and tokenizer files travel: no dotfiles, pickles or symlinked files."""
    import shutil
    lm, rep = rtn_model
    src = tmp_path / "src"
    shutil.copytree(smollm2.path, src)
    (src / ".env").write_text("SECRET=1")
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    (src / "notes.txt").symlink_to("/etc/hostname")
    lm2 = LoadedModel(lm.model, lm.tokenizer, src, lm.source, lm.source_sha256)
    out = api.export(lm2, rep, tmp_path / "o", "native")
    names = {p.name for p in out.iterdir()}
    assert not names & {".env", "pytorch_model.bin", "notes.txt"} and "tokenizer.json" in names


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(123) == 123
    with pytest.raises(LowbitError, match="max_shard_size"):
        parse_size("lots")


def test_export_cli_from_quantized_dir_to_gguf(tmp_path, capsys):
    """A native w4g32-sym directory becomes a GGUF with its codes unchanged (Q4_0), converted
    layer by layer (each encoded tensor spooled beside the output until the header is written):
    the bytes of the in-memory export, and no spool left."""
    src = load_model("smollm2-135m")
    rep = api.quantize(src.model, "w4g32-sym-rtn", progress=False)
    nat = api.export(src, rep, tmp_path / "w4g32", "native")
    out = tmp_path / "w4g32.gguf"
    assert cli_main(["export", str(nat), "--format", "gguf", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "210 int weight(s) written with their codes unchanged" in text and "re-encoded" not in text
    assert cli_main(["verify", str(out)]) == 0
    loaded = api.load(nat)                     # the whole-model path: read back, then export
    mem = api.export(loaded, None, tmp_path / "mem.gguf", "gguf")
    assert out.read_bytes() == mem.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["w4g32", "w4g32.gguf", "w4g32.gguf.lowbit.json", "mem.gguf", "mem.gguf.lowbit.json"])


def test_export_cli_from_native_dir_to_gptq_layer_by_layer(tmp_path, capsys):
    """`lowbit export NATIVE --format gptq` converts layer by layer (native.read_for_export) and
    writes the bytes the in-memory export of the same quantization writes."""
    import hashlib
    src = load_model("smollm2-135m")
    rep = api.quantize(src.model, "w4g128-rtn", progress=False)
    nat = api.export(src, rep, tmp_path / "nat", "native")
    mem = api.export(src, rep, tmp_path / "mem", "gptq")
    out = tmp_path / "cli"
    assert cli_main(["export", str(nat), "--format", "gptq", "--out", str(out), "--quiet"]) == 0

    def digests(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}
    assert digests(out) == digests(mem)
