"""What a checkpoint holds, read from safetensors headers without loading a single weight.

A safetensors file starts with an 8-byte little-endian header length N, then N bytes of JSON:
    {"__metadata__": {...}, "<tensor name>": {"dtype": "F32", "shape": [rows, cols],
                                              "data_offsets": [begin, end]}, ...}
(https://github.com/huggingface/safetensors, "Format"). A sharded checkpoint lists its files in
model.safetensors.index.json ("weight_map"); any *.safetensors in the directory is read either way.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header

# bits per element of each safetensors dtype
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8,
              "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8,
              "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "E8M0": 8}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        """The name with block indices folded:
        model.layers.17.mlp.up_proj.weight -> model.layers.N.mlp.up_proj.weight"""
        return re.sub(r"\.\d+\.", ".N.", self.name)

    @property
    def is_block_linear_weight(self) -> bool:
        """A 2-D .weight inside a numbered block: what weight-only quantizers (GPTQ, AWQ, RTN
        recipes) quantize by default. Embeddings, norms, biases and lm_head stay as they are."""
        return len(self.shape) == 2 and self.name.endswith(".weight") and ".N." in self.module \
            and "embed" not in self.name and "norm" not in self.name


def read_safetensors_header(path: str | Path) -> list[TensorEntry]:
    """Tensor entries of one .safetensors file (reads only the header)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise LowbitError(f"{path}: too short to be a safetensors file (no 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise LowbitError(f"{path}: header length {n} exceeds the safetensors limit of "
                                  f"{_MAX_HEADER} bytes; not a safetensors file?")
            header = fh.read(n)
    except OSError as e:
        raise LowbitError(f"{path}: cannot read ({e})") from e
    try:
        meta = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: header is not valid JSON ({e}); expected a safetensors file") from e
    out = []
    for name, d in meta.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = d["data_offsets"]
            out.append(TensorEntry(name, d["dtype"], tuple(int(s) for s in d["shape"]), int(end - begin),
                                   path.name))
        except (KeyError, TypeError, ValueError) as e:
            raise LowbitError(f"{path}: tensor {name!r} has a malformed header entry {d!r}; expected "
                              "dtype, shape and data_offsets") from e
    return out


def checkpoint_tensors(model_dir: str | Path) -> list[TensorEntry]:
    """All tensors of a Hugging Face checkpoint directory, from its safetensors headers."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError) as e:
            raise LowbitError(f"{index}: expected JSON with a 'weight_map' ({e})") from e
        missing = sorted(f for f in wanted if not (model_dir / f).is_file())
        if missing:
            raise LowbitError(f"{index}: lists shard(s) missing from {model_dir}: {', '.join(missing)}")
        files = [model_dir / f for f in sorted(wanted)]
    if not files:
        other = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = (f"; found {', '.join(other)}: pickled weights cannot be inspected without loading them, "
                "convert to safetensors first") if other else ""
        raise LowbitError(f"{model_dir}: no *.safetensors files{hint}")
    return [t for f in files for t in read_safetensors_header(f)]
