"""Walk a GGUF's header with every count and length checked against the file, before gguf-py sees it.

    check_header(path)          # LowbitError naming the file and the field, or None
    r = open_reader(path)       # check_header, then gguf.GGUFReader; its errors as LowbitError
    table = tensor_table(path)  # {name: TensorEntry}: type decodable, shape whole blocks, bytes in the file
    a = read_tensor(path, table[name])      # float32, numpy order, decoded by lowbit's codecs

Why: gguf-py's reader slices its memory map without checking that a slice lies in the file; a
slice past the end is simply empty. An array whose element count is damaged (2**40 entries in a
100 KB file) makes it build one Python object per claimed element, past the end, where each costs
nothing to "read": gigabytes and minutes from a small file (found by tests/fuzz, target
gguf_stream). transformers' GGUF loader uses the same reader. Here each claimed count is first
compared with the bytes left in the file (an element takes at least its encoded size), so a header
that passes describes at most the file's size in entries.

Layout (GGUF v2 / v3, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF",
u32 version, u64 tensor count, u64 key/value count; each key/value: string key, u32 value type,
value; each tensor: string name, u32 n_dims (at most 4, GGML_MAX_DIMS), u64 ne[n_dims], u32 ggml
type, u64 offset into the data section. A string is u64 length + bytes; an array is u32 element
type + u64 count + elements. The file's byte order is the one its version reads in (gguf-py's rule).
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lowbit.errors import LowbitError

# GGUF value type -> encoded size (fixed-size types); 8 = string, 9 = array
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DEPTH = 4          # arrays of arrays: gguf-py reads them recursively; no real file nests deeper
_MAX_DIMS = 4


class _Walk:
    def __init__(self, path: Path, buf, end: str):
        self.path, self.buf, self.end, self.pos, self.size = path, buf, end, 0, len(buf)

    def fail(self, what: str, why: str):
        raise LowbitError(f"GGUF {self.path}: {what}: {why} (header byte {self.pos} of {self.size}); "
                          "the file is damaged or not a GGUF")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            self.fail(what, f"needs {n} bytes, {self.size - self.pos} left in the file")
        p = self.pos
        self.pos += n
        return p

    def u32(self, what: str) -> int:
        return struct.unpack_from(self.end + "I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from(self.end + "Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(what)
        p = self.take(n, what)
        return bytes(self.buf[p:p + n])

    def count(self, n: int, least: int, what: str) -> int:
        if n * least > self.size - self.pos:
            self.fail(what, f"claims {n} entries of at least {least} bytes, {self.size - self.pos} bytes left")
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _FIXED:
            self.take(_FIXED[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY:
            if depth >= _MAX_DEPTH:
                self.fail(what, f"arrays nested more than {_MAX_DEPTH} deep")
            itype = self.u32(what)
            n = self.u64(what)
            if itype in _FIXED:
                self.take(self.count(n, _FIXED[itype], what) * _FIXED[itype], what)
            elif itype == _STRING:
                for _ in range(self.count(n, 8, what)):
                    self.string(what)
            elif itype == _ARRAY:
                for _ in range(self.count(n, 12, what)):
                    self.value(_ARRAY, what, depth + 1)
            else:
                self.fail(what, f"array of unknown value type {itype}")
        else:
            self.fail(what, f"unknown value type {vtype}")


def check_header(path: str | Path) -> None:
    """Raise LowbitError (naming the file and the key or tensor) unless the header fits the file."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise LowbitError(f"GGUF {path}: cannot open ({e.strerror})") from None
    with fh:
        if path.stat().st_size < 24:
            raise LowbitError(f"GGUF {path}: {path.stat().st_size} bytes, shorter than a GGUF header (24)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise LowbitError(f"GGUF {path}: starts with {bytes(buf[:4])!r}, not the magic b'GGUF'")
            version = struct.unpack_from("<I", buf, 4)[0]
            end = ">" if version & 0xFFFF == 0 else "<"
            w = _Walk(path, buf, end)
            w.pos = 4
            version = w.u32("version")
            if version not in (2, 3):
                w.fail("version", f"{version}; GGUF versions 2 and 3 are read")
            n_tensors, n_kv = w.u64("tensor count"), w.u64("key/value count")
            w.count(n_kv, 13, "key/value count")       # key length 8 + type 4 + a 1-byte value
            for i in range(n_kv):
                key = w.string(f"key {i}").decode("utf-8", "replace")
                w.value(w.u32(f"key {key!r}"), f"key {key!r}")
            w.count(n_tensors, 24, "tensor count")      # name length 8 + n_dims 4 + type 4 + offset 8
            for i in range(n_tensors):
                name = w.string(f"tensor {i}").decode("utf-8", "replace")
                n_dims = w.u32(f"tensor {name!r}")
                if n_dims > _MAX_DIMS:
                    w.fail(f"tensor {name!r}", f"{n_dims} dimensions, at most {_MAX_DIMS}")
                w.take(8 * n_dims + 4 + 8, f"tensor {name!r}")
            del w                                       # its buffer reference, before the map closes


def open_reader(path: str | Path, what: str = "GGUF"):
    """check_header, then gguf-py's GGUFReader; anything it raises becomes a LowbitError."""
    import gguf
    check_header(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:          # the reader raises several types on a damaged file
        raise LowbitError(f"{what} {path}: not readable ({type(e).__name__}: {e})") from None


class TensorEntry(NamedTuple):
    name: str
    type: object            # numerics.ggml.types.GGMLType
    shape: tuple            # numpy order (rows..., n_per_row)
    offset: int             # absolute, in the file
    n_bytes: int


def tensor_table(path: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a GGUF, checked before any is read: a type lowbit decodes, a non-empty shape
    of whole blocks per row, and its bytes inside the file."""
    from lowbit.numerics.ggml.types import GGML_BY_ID
    path = Path(path)
    size = path.stat().st_size
    r = open_reader(path)
    out = {}
    for t in r.tensors:
        gt = GGML_BY_ID.get(int(t.tensor_type))
        if gt is None:
            raise LowbitError(f"GGUF {path}: tensor {t.name} has type {t.tensor_type.name}, which lowbit "
                              "cannot decode")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))     # ggml ne[] -> numpy order
        n = shape[-1] if shape else 1
        rows = math.prod(shape[:-1])                    # Python ints: a damaged dim cannot wrap around
        if n < 1 or rows < 1:
            raise LowbitError(f"GGUF {path}: tensor {t.name} has an empty shape {shape}")
        if not gt.fits(n):
            raise LowbitError(f"GGUF {path}: tensor {t.name}: rows of {n} are not whole {gt.name} blocks")
        need = rows * gt.row_bytes(n)
        off = int(t.data_offset)
        if off < 0 or off + need > size:
            raise LowbitError(f"GGUF {path}: tensor {t.name}: {need} bytes at offset {off} run past the "
                              f"file ({size} bytes)")
        out[t.name] = TensorEntry(t.name, gt, shape, off, need)
    del r
    return out


def read_tensor(path: str | Path, e: TensorEntry) -> np.ndarray:
    """One tensor's bytes, read on their own with os.pread (no page of a mapping stays resident),
    decoded bit for bit as ggml's to_float; NaN/inf refused naming the tensor."""
    from lowbit.numerics.ggml import dequantize
    buf = bytearray(e.n_bytes)
    with open(path, "rb") as fh:
        got = os.preadv(fh.fileno(), [buf], e.offset)
    if got != e.n_bytes:
        raise LowbitError(f"GGUF {path}: tensor {e.name}: read {got} of {e.n_bytes} bytes (file truncated?)")
    a = dequantize(buf, e.type, (math.prod(e.shape[:-1]), e.shape[-1]), name=e.name).reshape(e.shape)
    del buf
    if not np.isfinite(a).all():
        raise LowbitError(f"GGUF {path}: tensor {e.name} decodes to NaN/inf values")
    return a
