"""`lowbit formats`, `lowbit estimate`, `lowbit inspect` through the real CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowbit.cli import main
from lowbit.numerics.memory import estimate_weight_memory, tensor_weight_memory

LOWBIT = Path(sys.executable).parent / "lowbit"


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def row(out: str, first: str) -> list[str]:
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{out}")


def test_formats_table(capsys):
    rc, out, _ = run(capsys, "formats")
    assert rc == 0
    assert row(out, "fp16")[1:6] == ["16", "-65504", "65504", "0.000976562", "2"]
    assert row(out, "int8")[1:6] == ["8", "-128", "127", "1", "1"]
    assert row(out, "int8_restricted")[2] == "-127"
    assert row(out, "fp8_e4m3")[3] == "448"
    assert row(out, "nf4")[5] == "0.5"
    # how 0.1234 and 75535 survive: fp16 rounds and saturates (a plain cast would give inf)
    assert "0.123413" in row(out, "fp16") and "65504 (sat; .to() gives inf)" in out
    assert row(out, "bf16")[6:9] == ["0.123535", "3.14062", "75776"]
    assert "QLoRA" in out and "BitNet" in out


def test_formats_custom_values(capsys):
    rc, out, _ = run(capsys, "formats", "--values", "1000", "-0.3")
    assert rc == 0
    assert row(out, "fp8_e4m3")[6:] == ["448", "(sat)", "-0.3125"]


def test_estimate_70b_via_the_installed_entry_point():
    assert LOWBIT.is_file(), f"{LOWBIT} missing: run make install"
    p = subprocess.run([str(LOWBIT), "estimate", "--params", "70e9", "--format", "int4", "--group-size", "128"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = row(p.stdout, "int4")
    # 70e9 * 4 bits = 35 GB of codes; 70e9/128 groups x (16-bit scale + 4-bit zero) = 1.094 GB + 273.4 MB
    assert r[1] == f"{4 + 20 / 128:.4f}"
    assert " ".join(r[2:10]) == "35 GB 1.094 GB 273.4 MB 36.37 GB"
    p = subprocess.run([str(LOWBIT), "estimate", "--params", "70e9", "--format", "fp32"],
                       capture_output=True, text=True, timeout=120)
    assert row(p.stdout, "fp32")[2:4] == ["280", "GB"]


def test_estimate_all_formats_and_arithmetic(capsys):
    rc, out, _ = run(capsys, "estimate", "--params", "1e9", "--symmetric")
    assert rc == 0
    for f in ("int8", "int2", "nf4", "fp4", "ternary", "fp8_e4m3", "bf16", "fp32"):
        row(out, f)
    assert row(out, "int4")[1] == f"{4 + 16 / 128:.4f}"       # symmetric: no zero point
    m = estimate_weight_memory(7e9, "int4", -1, in_features=4096)
    assert math.isclose(m.scale_bytes, math.ceil(7e9 / 4096) * 2)
    # shape-exact: a ragged last group still has a scale and a zero
    t = tensor_weight_memory((1536, 576), "int4", 128)
    assert t.scale_bytes == 1536 * 5 * 2 and t.zero_bytes == 1536 * 5 * 4 / 8


def _write_checkpoint(d: Path, sharded: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(100, 48, generator=g),
        "model.norm.weight": torch.ones(48),
    }
    for i in range(3):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(48, 48, generator=g).to(torch.bfloat16)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(200, 48, generator=g).to(torch.bfloat16)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(48)
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if sharded:
        names = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
        for f, ns in halves.items():
            save_file({n: tensors[n] for n in ns}, str(d / f))
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for f, ns in halves.items() for n in ns}}))
    else:
        save_file(tensors, str(d / "model.safetensors"))
    return tensors


@pytest.mark.parametrize("sharded", [False, True])
def test_inspect_local_checkpoint(tmp_path, capsys, sharded):
    tensors = _write_checkpoint(tmp_path / "ckpt", sharded)
    rc, out, err = run(capsys, "inspect", str(tmp_path / "ckpt"), "--group-size", "32")
    assert rc == 0, err
    n = sum(t.numel() for t in tensors.values())
    assert f"{n:,} parameters" in out
    assert row(out, "BF16")[1:3] == ["6", f"{3 * (48 * 48 + 200 * 48):,}"]
    assert row(out, "F32")[1:3] == ["5", f"{100 * 48 + 48 * 4:,}"]
    assert row(out, "model.layers.N.mlp.up_proj.weight")[1:5] == ["3", "28,800", "BF16", "200x48"]
    # int4 at g32 (48 = 32 + a ragged 16: two groups per row) + the rest at 16 bits
    q = sum(tensor_weight_memory(tuple(t.shape), "int4", 32).total_bytes
            for k, t in tensors.items() if ".layers." in k and t.dim() == 2)
    rest = sum(t.numel() * 2 for k, t in tensors.items() if not (".layers." in k and t.dim() == 2))
    from lowbit.numerics.memory import human_bytes
    assert " ".join(row(out, "int4")[1:3]) == human_bytes(q + rest)


def test_inspect_errors(tmp_path, capsys):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\0" * 16)
    rc, _, err = run(capsys, "inspect", str(d))
    assert rc == 2 and "no *.safetensors" in err and "pytorch_model.bin" in err
    (d / "model.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{bad}")
    rc, _, err = run(capsys, "inspect", str(d))
    assert rc == 2 and "not valid JSON" in err
    rc, _, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert rc == 2 and "no such built-in name" in err
    rc, _, err = run(capsys, "estimate", "--params", "-3")
    assert rc == 2 and "params" in err


@pytest.mark.model
def test_inspect_bundled_model(capsys):
    rc, out, err = run(capsys, "inspect", "smollm2-135m")
    assert rc == 0, err
    assert "134,515,008 parameters" in out and "538.1 MB now" in out       # fp32, tied lm_head
    assert row(out, "model.layers.N.mlp.down_proj.weight")[1:5] == ["30", "26,542,080", "F32", "576x1536"]
    assert "210 2-D linear weights" in out
