"""Read a Hugging Face checkpoint's safetensors one tensor at a time, without a memory map.

    src = SafetensorsSource(dir)      # model.safetensors, or model.safetensors.index.json + shards
    src.shape(name), src.dtype(name)  # from the headers alone
    t = src.read(name)                # that tensor only: os.pread into a fresh buffer

Each header is parsed here and checked against its file before anything is allocated: the
header length fits the file, every entry has a known dtype, a shape of non-negative ints, and
data_offsets inside the data section whose length is numel * itemsize; entries do not overlap.
No mmap: a tensor read and released leaves no resident pages behind (a memory map's touched pages
count in the process's RSS until it is unmapped).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from lowbit.errors import LowbitError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20          # safetensors' own limit on the JSON header


def read_header(path: Path) -> tuple[dict, int]:
    """-> ({name: (dtype, shape, begin, end)}, data_start). LowbitError naming the file and entry."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise LowbitError(f"{path}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise LowbitError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        raw = fh.read(n)
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"{path}: safetensors header is not JSON ({e})") from None
    if not isinstance(hdr, dict):
        raise LowbitError(f"{path}: safetensors header is not a JSON object")
    start, avail = 8 + n, size - 8 - n
    out, spans = {}, []
    for name, e in hdr.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(e, dict) or e.get("dtype") not in DTYPES:
            raise LowbitError(f"{where}: expected {{dtype, shape, data_offsets}} with a dtype in "
                              f"{sorted(DTYPES)}, got {str(e)[:80]}")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise LowbitError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1] <= avail):
            raise LowbitError(f"{where}: data_offsets {offs!r} outside the data section ({avail} bytes)")
        dt = DTYPES[e["dtype"]]
        need = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        if offs[1] - offs[0] != need:
            raise LowbitError(f"{where}: {offs[1] - offs[0]} bytes for {e['dtype']} {shape} (expected {need})")
        out[name] = (dt, tuple(shape), offs[0], offs[1])
        spans.append((offs[0], offs[1], name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise LowbitError(f"{path}: tensors {n0} and {n1} overlap")
    return out, start


class SafetensorsSource:
    def __init__(self, path: str | os.PathLike, stem: str = "model"):
        path = Path(path)
        index = path / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
                files = sorted(set(wmap.values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise LowbitError(f"{index}: not a safetensors index (expected a weight_map): {e}") from None
        else:
            files = [f.name for f in sorted(path.glob("*.safetensors"))]
        if not files:
            raise LowbitError(f"{path}: no *.safetensors weights")
        self.path, self.entries = path, {}
        for fname in files:
            f = path / str(fname)
            if os.sep in str(fname) or not f.is_file():
                raise LowbitError(f"{path}: shard {fname!r} is missing or not a plain file name")
            hdr, start = read_header(f)
            for name, (dt, shape, b, e) in hdr.items():
                if name in self.entries:
                    raise LowbitError(f"{path}: tensor {name} is in two shards")
                self.entries[name] = (f, dt, shape, start + b, e - b)

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[1]

    def _entry(self, name: str):
        if name not in self.entries:
            raise LowbitError(f"{self.path}: tensor {name} is missing")
        return self.entries[name]

    def get(self, name: str, required: bool = True) -> torch.Tensor | None:
        """TensorFiles.get's signature (export.native.read_qweight's `take`): None when absent and
        not required."""
        return self.read(name) if required or name in self.entries else None

    def read(self, name: str) -> torch.Tensor:
        f, dt, shape, off, n = self._entry(name)
        buf = bytearray(n)
        with open(f, "rb") as fh:
            got = os.preadv(fh.fileno(), [buf], off) if n else 0
        if got != n:
            raise LowbitError(f"{f}: tensor {name}: read {got} of {n} bytes (file truncated?)")
        return torch.frombuffer(buf, dtype=torch.uint8).view(dt).reshape(shape) if n else torch.empty(shape, dtype=dt)
