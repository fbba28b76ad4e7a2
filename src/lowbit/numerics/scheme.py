"""What a quantized number is: the Scheme dataclass.

A Scheme says how one tensor is mapped to codes; it says nothing about *how* the values are
chosen (that is a method: rtn, gptq, ...) nor *where* it applies (that is a Recipe rule).

Granularity, for a weight of shape (out_features, in_features) = (rows, cols):

    tensor   one (scale, zero) for the whole tensor                      qparams (1, 1)
    channel  one per row (axis=0, the usual per-output-channel) or col   qparams (rows, 1) / (1, cols)
    group    one per `group_size` consecutive values along the last axis qparams (rows, ceil(cols/g))
             (a row whose length is not a multiple of g ends in a shorter group, as GPTQ's g_idx
             and compressed-tensors allow; `ragged_groups()` reports it)
    block    one per (block_rows x block_cols) tile, as fp8 block-wise    qparams (ceil(rows/br), ceil(cols/bc))
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from lowbit.errors import LowbitError

Granularity = Literal["tensor", "channel", "group", "block"]
IntRange = Literal["full", "restricted"]

# Formats whose codes are integers on a uniform (affine) grid.
INT_FORMATS = ("int",)
# Formats whose codes index a lookup table scaled per group (numerics/codebooks.py).
CODEBOOK_FORMATS = ("nf4", "fp4", "ternary")
# Formats that are a float cast after scaling (numerics/formats.py).
FLOAT_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp16", "bf16", "fp32")
# ggml block formats (llama.cpp): fixed block layouts with their own encoders (lowbit.numerics.ggml);
# granularity/group_size do not apply to them.
GGUF_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                "tq1_0", "tq2_0", "iq4_nl")
# Vector codebooks: an index per d consecutive weights into a learned codebook (numerics/vq.py,
# VQWeight); bits = index bits per weight, group_size = the scale groups.
VQ_FORMATS = ("vq",)
ALL_FORMATS = INT_FORMATS + CODEBOOK_FORMATS + FLOAT_FORMATS + GGUF_FORMATS + VQ_FORMATS


# the largest group size a scheme takes: wider than any row of today's models (a group at least
# a row long is per-channel quantization); past it, per-group scratch memory only grows
MAX_GROUP_SIZE = 65536


@dataclass(frozen=True)
class Scheme:
    """How a tensor is quantized.

    bits         code width for "int" (2..8); implied by the format otherwise
    format       "int" (affine integer grid), a codebook ("nf4", "fp4", "ternary") or a float cast
    symmetric    True: zero point fixed at the middle, scale from absmax; False: min/max + zero point
    int_range    symmetric only. "restricted": codes in [-(2^(b-1)-1), 2^(b-1)-1] (e.g. [-127, 127]);
                 "full": also allows -2^(b-1) (e.g. [-128, 127]). Scale is absmax / (2^(b-1)-1) in both,
                 so absmax itself is representable; "full" gives one spare negative level.
    granularity  see module docstring
    group_size   values per group along the last axis (granularity="group")
    axis         channel axis (granularity="channel"): 0 = per output row
    block_size   (rows, cols) tile (granularity="block")
    """

    bits: int = 4
    format: str = "int"
    symmetric: bool = False
    int_range: IntRange = "full"
    granularity: Granularity = "group"
    group_size: int = 128
    axis: int = 0
    block_size: tuple[int, int] = (128, 128)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.format not in ALL_FORMATS:
            raise LowbitError(f"Scheme.format: expected one of {ALL_FORMATS}, got {self.format!r}")
        if self.format == "int" and not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise LowbitError(f"Scheme.bits: integer formats take 2..8 bits, got {self.bits!r}")
        if self.format == "vq" and not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise LowbitError(f"Scheme.bits: vector codebooks take 1..8 index bits per weight, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group", "block"):
            raise LowbitError(
                f"Scheme.granularity: expected tensor|channel|group|block, got {self.granularity!r}")
        if self.granularity == "group" and not (isinstance(self.group_size, int)
                                                and 0 < self.group_size <= MAX_GROUP_SIZE):
            raise LowbitError(f"Scheme.group_size: expected an integer in 1..{MAX_GROUP_SIZE} (larger groups "
                              f"span whole rows: use per-channel), got {self.group_size!r}")
        if self.granularity == "channel" and self.axis not in (0, 1, -1):
            raise LowbitError(f"Scheme.axis: expected 0 or 1 for per-channel, got {self.axis!r}")
        if self.granularity == "block" and (len(self.block_size) != 2 or min(self.block_size) <= 0):
            raise LowbitError(f"Scheme.block_size: expected two positive ints, got {self.block_size!r}")
        if self.int_range not in ("full", "restricted"):
            raise LowbitError(f"Scheme.int_range: expected 'full' or 'restricted', got {self.int_range!r}")

    # ---- the integer grid -------------------------------------------------------------------
    @property
    def code_bits(self) -> int:
        """Bits each stored code takes before packing."""
        return {"nf4": 4, "fp4": 4, "ternary": 2, "fp8_e4m3": 8, "fp8_e5m2": 8,
                "fp16": 16, "bf16": 16, "fp32": 32}.get(self.format, self.bits)

    @property
    def qmin(self) -> int:
        """Smallest code, as an unsigned code (codes are stored in [0, 2^bits))."""
        if self.symmetric and self.int_range == "restricted":
            return 1
        return 0

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The fixed zero point of symmetric schemes, in unsigned code units (8 for 4 bits)."""
        return 1 << (self.bits - 1)

    def ragged_groups(self, cols: int) -> int | None:
        """Length of the shorter last group for a row of `cols` values, or None when g divides it."""
        if self.granularity != "group" or cols % self.group_size == 0:
            return None
        return cols % self.group_size

    def n_groups(self, cols: int) -> int:
        return -(-cols // self.group_size)

    # ---- naming and serialisation -------------------------------------------------------------
    def short_name(self) -> str:
        """w4g128a / w8c / nf4g64 / fp8_e4m3t ... used in tables and file names."""
        head = {"int": f"w{self.bits}", "vq": f"vq{self.bits}"}.get(self.format, self.format)
        gran = {"tensor": "t", "channel": "c", "group": f"g{self.group_size}",
                "block": f"b{self.block_size[0]}x{self.block_size[1]}"}[self.granularity]
        tail = "" if self.format != "int" else ("s" if self.symmetric else "a")
        return f"{head}{gran}{tail}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_size"] = list(self.block_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LowbitError(f"Scheme: unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        d = dict(d)
        if "block_size" in d:
            d["block_size"] = tuple(d["block_size"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def int_scheme(bits: int, group_size: int | None = 128, symmetric: bool = False) -> Scheme:
    """Shorthand: group_size=None or -1 means per output channel, 0 means per tensor."""
    if group_size in (None, -1):
        return Scheme(bits=bits, symmetric=symmetric, granularity="channel", axis=0)
    if group_size == 0:
        return Scheme(bits=bits, symmetric=symmetric, granularity="tensor")
    return Scheme(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)
