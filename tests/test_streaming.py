"""Streaming quantization (lowbit.streaming): the bundled model's fp32 safetensors directory,
read one tensor at a time, gives the same bytes as the in-memory path (load, quantize, export);
malformed safetensors headers are refused against the file size before anything is allocated."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models import load_model
from lowbit.models.shards import SafetensorsSource, read_header
from lowbit.streaming import quantize_streaming



def digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir())}


def _same_bytes(src, recipe, tmp_path, shard):
    s = quantize_streaming(src, recipe, tmp_path / "stream", max_shard_size=shard)
    lm = load_model(src)
    rep = api.quantize(lm.model, recipe, progress=False)
    m = api.export(lm, rep, tmp_path / "mem", "native", max_shard_size=shard)
    assert digests(s) == digests(m)
    return s


@pytest.mark.model
def test_stream_block0_same_bytes_as_in_memory(smollm2, tmp_path):
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule
    r = Recipe(name="b0", rules=[Rule(r"model\.layers\.0\.", int_scheme(4, 128), "rtn")])
    out = _same_bytes(smollm2.path, r, tmp_path, "60MB")        # two shards and an index
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.slow
@pytest.mark.model
def test_stream_whole_model_same_bytes_cli(smollm2, tmp_path):
    from lowbit.cli import main
    assert main(["quantize", str(smollm2.path), "--recipe", "w4g128-rtn", "--stream", "--out",
                 str(tmp_path / "cli")]) == 0
    lm = load_model(smollm2.path)
    rep = api.quantize(lm.model, "w4g128-rtn", progress=False)
    m = api.export(lm, rep, tmp_path / "mem", "native", max_shard_size="1GB")
    assert digests(tmp_path / "cli") == digests(m)


@pytest.mark.model
def test_stream_refuses_calibrated_and_gguf(smollm2, tmp_path):
    with pytest.raises(LowbitError, match="GGUF"):
        quantize_streaming("smollm2-135m", "w4g128-rtn", tmp_path / "o")
    with pytest.raises(LowbitError, match="calibrated method 'gptq'"):
        quantize_streaming(smollm2.path, "w4g128-gptq", tmp_path / "o")


def _st(tmp_path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


@pytest.mark.parametrize("header,data,match", [
    ({"w": {"dtype": "F16", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 8]}}, b"\0" * 8, "expected"),
    ({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 1 << 40]}}, b"\0" * 8, "outside the data"),
    ({"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
    ({"w": {"dtype": "F16", "shape": [-4], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
    ({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
      "b": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]}}, b"\0" * 8, "overlap"),
])
def test_safetensors_header_checked_against_file(tmp_path, header, data, match):
    with pytest.raises(LowbitError, match=match):
        read_header(_st(tmp_path, header, data))


def test_safetensors_header_length_past_file(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 50) + b"{}")
    with pytest.raises(LowbitError, match="does not fit"):
        SafetensorsSource(tmp_path)
