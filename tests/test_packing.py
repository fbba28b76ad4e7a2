"""Packing: exact round trips along either axis, known bit layouts, GPTQ / compressed-tensors shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.numerics import int_scheme, quantize_weight
from lowbit.numerics.packing import (pack_2bit_u8, pack_3bit_u8, pack_4bit_u8, pack_8bit_u8, pack_bits_u8,
                                     pack_int32, pack_ternary_5per_u8, packed_len, unpack_2bit_u8,
                                     unpack_3bit_u8, unpack_4bit_u8, unpack_8bit_u8, unpack_bits_u8,
                                     unpack_int32, unpack_ternary_5per_u8)


def codes(shape, bits, seed=0, high=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high or (1 << bits), shape, generator=g, dtype=torch.int64).to(torch.uint8)


@given(bits=st.sampled_from([2, 3, 4, 8]), container=st.sampled_from(["u8", "i32"]),
       rows=st.integers(1, 40), cols=st.integers(1, 70), axis=st.sampled_from([0, 1, -1, -2]),
       seed=st.integers(0, 2**16))
@settings(max_examples=150, deadline=None)
def test_roundtrip_exact_any_axis_any_length(bits, container, rows, cols, axis, seed):
    c = codes((rows, cols), bits, seed)
    pack, unpack = (pack_bits_u8, unpack_bits_u8) if container == "u8" else (pack_int32, unpack_int32)
    p = pack(c, bits, axis=axis)
    assert p.dtype == (torch.uint8 if container == "u8" else torch.int32)
    n = c.shape[axis]
    assert p.shape[axis] == packed_len(n, bits, p.dtype)
    assert torch.equal(unpack(p, bits, n, axis=axis), c)


@given(rows=st.integers(1, 20), cols=st.integers(1, 60), axis=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_ternary_roundtrips(rows, cols, axis, seed):
    c = codes((rows, cols), 2, seed, high=3)
    p5 = pack_ternary_5per_u8(c, axis=axis)
    assert p5.shape[axis] == -(-c.shape[axis] // 5) and int(p5.max()) <= 242
    assert torch.equal(unpack_ternary_5per_u8(p5, c.shape[axis], axis=axis), c)
    p2 = pack_2bit_u8(c, axis=axis)
    assert torch.equal(unpack_2bit_u8(p2, c.shape[axis], axis=axis), c)


def test_named_wrappers_and_3d():
    c4 = codes((3, 5, 17), 4)
    assert torch.equal(unpack_4bit_u8(pack_4bit_u8(c4, axis=1), 5, axis=1), c4)
    c3 = codes((3, 5, 17), 3)
    assert torch.equal(unpack_3bit_u8(pack_3bit_u8(c3), 17), c3)
    c8 = codes((4, 9), 8)
    assert torch.equal(pack_8bit_u8(c8), c8) and torch.equal(unpack_8bit_u8(c8, 9), c8)


def test_known_bit_layouts():
    # 4-bit, low nibble first; odd length padded with a zero code
    assert pack_4bit_u8(torch.tensor([1, 2, 3], dtype=torch.uint8)).tolist() == [0x21, 0x03]
    # 2-bit: 4 per byte, first value in bits 0-1
    assert pack_2bit_u8(torch.tensor([1, 2, 3, 0], dtype=torch.uint8)).tolist() == [0b00111001]
    # 3-bit in uint8: a 24-bit little-endian stream of 8 values
    v = torch.arange(8, dtype=torch.uint8)
    stream = sum(int(x) << (3 * i) for i, x in enumerate(v))
    assert pack_3bit_u8(v).tolist() == [stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]
    # int32: 8 nibbles, value i at bits 4i; a set top bit reads negative (two's complement)
    assert pack_int32(torch.arange(8, dtype=torch.uint8), 4).tolist() == [0x76543210]
    assert pack_int32(torch.full((8,), 15, dtype=torch.uint8), 4).tolist() == [-1]
    # ternary base 3: t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4
    assert pack_ternary_5per_u8(torch.tensor([2, 1, 0, 2, 2], dtype=torch.uint8)).tolist() == [2 + 3 + 54 + 162]


def _gptq_reference_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ/AutoGPTQ qweight layout, written out independently from its description: intweight
    (in, out) packed along `in` into uint32 rows; for 2/4/8 bits, 32/bits values per row, value j
    at bits j*bits; for 3 bits, 32 values per 3 rows as one 96-bit little-endian stream."""
    rows_in, out = q.shape
    per_run, words = (32, 3) if bits == 3 else (32 // bits, 1)
    res = np.zeros((rows_in // per_run * words, out), dtype=np.uint64)
    for r in range(rows_in // per_run):
        for j in range(per_run):
            bit = j * bits
            for col in range(out):
                val = int(q[r * per_run + j, col])
                w, off = divmod(bit, 32)
                res[r * words + w, col] |= np.uint64((val << off) & 0xFFFFFFFF)
                if off + bits > 32:
                    res[r * words + w + 1, col] |= np.uint64(val >> (32 - off))
    return res.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_qweight_layout_golden(bits):
    q = codes((64, 6), bits, seed=bits)                         # (in, out) = qdata.t()
    ours = pack_int32(q, bits, axis=0)
    assert ours.shape == (64 * bits // 32, 6)
    assert np.array_equal(ours.numpy(), _gptq_reference_pack(q.numpy(), bits))


def test_gptq_and_compressed_tensors_orientations_from_a_real_quantized_weight():
    w = torch.randn(96, 256)                                   # (out, in)
    qw = quantize_weight(w, int_scheme(4, 128))
    gptq_qweight = pack_int32(qw.qdata.t(), 4, axis=0)         # (in/8, out)
    ct_weight_packed = pack_int32(qw.qdata, 4, axis=1)         # (out, in/8)
    assert gptq_qweight.shape == (32, 96) and ct_weight_packed.shape == (96, 32)
    assert torch.equal(gptq_qweight, ct_weight_packed.t())
    # GPTQ qzeros: (groups, out/8), packed along the output axis
    zeros = qw.zero_point.t().to(torch.uint8)                  # (groups, out)
    qzeros = pack_int32(zeros, 4, axis=1)
    assert qzeros.shape == (2, 12)
    assert torch.equal(unpack_int32(qzeros, 4, 96, axis=1), zeros)
    assert torch.equal(unpack_int32(gptq_qweight, 4, 256, axis=0).t(), qw.qdata)


@pytest.mark.parametrize("call,match", [
    (lambda: pack_4bit_u8(torch.tensor([16], dtype=torch.uint8)), r"\[0, 15\]"),
    (lambda: pack_int32(torch.tensor([1.0]), 4), "integer tensor"),
    (lambda: pack_int32(torch.tensor([1], dtype=torch.uint8), 5), "bits"),
    (lambda: pack_bits_u8(torch.tensor([1], dtype=torch.uint8), 6), "bits"),
    (lambda: pack_2bit_u8(torch.tensor([[1]], dtype=torch.uint8), axis=2), "axis 2 out of range"),
    (lambda: unpack_4bit_u8(torch.zeros(3, dtype=torch.uint8), 7), "length=7"),
    (lambda: unpack_4bit_u8(torch.zeros(3, dtype=torch.uint8), 4), "expected 5..6"),
    (lambda: unpack_int32(torch.zeros(3, dtype=torch.uint8), 4, 8), "int32"),
    (lambda: unpack_int32(torch.zeros(4, dtype=torch.int32), 3, 8), "runs of 3"),
    (lambda: pack_ternary_5per_u8(torch.tensor([3], dtype=torch.uint8)), "ternary"),
    (lambda: unpack_ternary_5per_u8(torch.tensor([250], dtype=torch.uint8), 5), "242"),
    (lambda: unpack_ternary_5per_u8(torch.tensor([1], dtype=torch.uint8), 6), "length=6"),
])
def test_bad_input_errors(call, match):
    with pytest.raises(LowbitError, match=match):
        call()
