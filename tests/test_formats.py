"""Number formats: ranges, steps near 1.0, bytes per parameter, casts (against torch's own casts)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.numerics.codebooks import NF4_TABLE
from lowbit.numerics.formats import FORMATS, get_format, int_format


@pytest.mark.parametrize("name,lo,hi,bits", [
    ("int8", -128, 127, 8), ("int8_restricted", -127, 127, 8), ("uint8", 0, 255, 8),
    ("int4", -8, 7, 4), ("int4_restricted", -7, 7, 4), ("uint4", 0, 15, 4),
    ("int2", -2, 1, 2), ("int2_restricted", -1, 1, 2), ("uint2", 0, 3, 2), ("int3", -4, 3, 3),
    ("fp16", -65504, 65504, 16), ("fp8_e4m3", -448, 448, 8), ("fp8_e5m2", -57344, 57344, 8),
    ("nf4", -1, 1, 4), ("fp4", -6, 6, 4), ("ternary", -1, 1, 1.6),
])
def test_ranges_and_bits(name, lo, hi, bits):
    f = get_format(name)
    assert (f.min_value, f.max_value, f.storage_bits) == (lo, hi, bits)
    assert f.bytes_per_param == bits / 8


def test_every_int_width_and_range_is_there():
    for b in range(2, 9):
        assert {f"int{b}", f"int{b}_restricted", f"uint{b}"} <= set(FORMATS)
    assert {"fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "nf4", "fp4", "ternary"} <= set(FORMATS)
    assert all(f.description for f in FORMATS.values())


@pytest.mark.parametrize("name,step", [
    ("fp32", 2.0 ** -23), ("fp16", 2.0 ** -10), ("bf16", 2.0 ** -7), ("fp8_e4m3", 0.125),
    ("fp8_e5m2", 0.25), ("int8", 1.0), ("uint2", 1.0), ("fp4", 0.5), ("ternary", 1.0),
    ("nf4", 1.0 - NF4_TABLE[-2]),
])
def test_step_near_one(name, step):
    assert get_format(name).step_near_one() == pytest.approx(step, rel=1e-6)


def test_how_0_1234_and_75535_survive():
    x = torch.tensor([0.1234, 75535.0])
    expect = {
        "fp32": [0.1234, 75535.0], "fp16": [0.1234130859375, 65504.0], "bf16": [0.12353515625, 75776.0],
        "fp8_e4m3": [0.125, 448.0], "fp8_e5m2": [0.125, 57344.0], "int8": [0.0, 127.0],
        "uint4": [0.0, 15.0], "nf4": [NF4_TABLE[9], 1.0], "fp4": [0.0, 6.0], "ternary": [0.0, 1.0],
    }
    for name, want in expect.items():
        got = get_format(name).cast(x)
        assert torch.allclose(got, torch.tensor(want), rtol=1e-7), (name, got)
    # without saturation, fp16 and e5m2 overflow to inf, as a plain .to(dtype) does
    assert math.isinf(get_format("fp16").cast(x, saturate=False)[1])
    assert math.isinf(get_format("fp8_e5m2").cast(x, saturate=False)[1])


@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=64))
@settings(max_examples=60, deadline=None)
def test_float_cast_matches_torch_and_is_idempotent(vals):
    x = torch.tensor(vals)
    for name, dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        f = get_format(name)
        assert torch.equal(f.cast(x), x.to(dtype).float())
        assert torch.equal(f.cast(f.cast(x)), f.cast(x))
    for name in ("fp8_e4m3", "fp8_e5m2"):
        f = get_format(name)
        y = f.cast(x)
        assert torch.equal(f.cast(y), y)
        assert float(y.abs().max()) <= f.max_value


@given(st.lists(st.floats(-300, 300, allow_nan=False, width=32), min_size=1, max_size=64),
       st.integers(2, 8), st.booleans(), st.booleans())
@settings(max_examples=60, deadline=None)
def test_int_cast_is_round_half_even_then_clamp(vals, bits, signed, restricted):
    f = int_format(bits, signed=signed, restricted=restricted and signed)
    x = torch.tensor(vals)
    y = f.cast(x)
    assert torch.equal(y, torch.round(x).clamp(f.min_value, f.max_value))
    assert torch.equal(y, torch.round(y))
    inside = (x >= f.min_value) & (x <= f.max_value)
    assert torch.all((y - x)[inside].abs() <= 0.5)


def test_codebook_cast_picks_nearest_entry():
    f = get_format("nf4")
    x = torch.linspace(-1.2, 1.2, 1001)
    table = f.values()
    nearest = table[(x[:, None] - table[None, :]).abs().argmin(dim=1)]
    assert torch.equal(f.cast(x), nearest)
    assert f.values().numel() == 16 and get_format("fp4").values().numel() == 15


def test_bad_input():
    with pytest.raises(LowbitError, match="NaN/inf"):
        get_format("fp16").cast(torch.tensor([float("nan")]))
    with pytest.raises(LowbitError, match="floating-point"):
        get_format("int8").cast(torch.tensor([1, 2]))
    with pytest.raises(LowbitError, match="bits"):
        int_format(9)
    with pytest.raises(LowbitError, match="expected one of"):
        get_format("int9")
    with pytest.raises(LowbitError, match="saturate"):
        get_format("int8").cast(torch.tensor([300.0]), saturate=False)
