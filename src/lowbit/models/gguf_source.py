"""Read a GGUF's tensors one at a time, under their Hugging Face names, for streamed quantization.

    meta, digest = gguf_meta_dir(path)      # config.json + tokenizer files, no weights (cached)
    src = GGUFSource(path, config)          # the SafetensorsSource interface: keys / shape / dtype / read
    t = src.read("model.layers.3.mlp.down_proj.weight")     # decoded to float32 by lowbit's codecs

The header (metadata and tensor table) is parsed by gguf-py's reader, which maps the file but
touches only the header's pages; every tensor's offset and size is checked against the file
before anything is read. A tensor's bytes are then read on their own with os.pread into a fresh
buffer (no page of the mapping is touched, so nothing stays resident), decoded bit for bit as
ggml's to_float (numerics.ggml.dequantize), and LLaMA's q/k rows are un-permuted
(arch.gguf_names.unpermute_qk). The fp32 model never exists: peak memory is one tensor in
float32 plus its encoded bytes.

The values are exactly those of the fp32 copy load_model makes from the same file (transformers'
GGUF loader; tests/test_streaming.py checks the bundled model's streamed output against the
in-memory one byte for byte). The config directory has the files that copy has, save the weights.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError


def gguf_meta_dir(gguf: Path) -> tuple[Path, str]:
    """config.json, generation_config.json and the tokenizer of a GGUF, as the fp32 copy of
    models.load.gguf_to_hf_dir has them, in a cached directory (no weights). -> (dir, sha256)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from lowbit.export.common import empty_model
    from lowbit.io import atomic_dir, cache_dir, sha256_file
    from lowbit.models.cache_check import cache_entry_ok, discard_entry, write_record
    from lowbit.export.gguf.header import check_header
    gguf = Path(gguf)
    check_header(gguf)                  # before transformers' loader (gguf-py) reads it
    digest = sha256_file(gguf)
    out = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}.meta"
    if out.exists():
        if cache_entry_ok(out, digest) is None:
            return out, digest
        discard_entry(out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as e:  # transformers raises many types for a truncated / foreign file
        raise LowbitError(f"model file {gguf}: could not be read as a GGUF causal LM "
                          f"({type(e).__name__}: {e}). Is the file complete? sha256={digest}") from e
    names = _table(gguf)[0]
    config.tie_word_embeddings = "output.weight" not in names
    skeleton = empty_model(gguf.parent, torch.float32, config=config)
    config = skeleton.config                      # as save_pretrained writes it: architectures, dtype
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32
    with atomic_dir(out) as tmp:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_record(tmp, gguf.name, digest)
    return out, digest


def _table(path: Path) -> tuple[dict, int]:
    """-> ({gguf name: (ggml type, numpy shape, absolute offset, n_bytes)}, file size)."""
    from lowbit.export.gguf.header import open_reader
    from lowbit.numerics.ggml.types import GGML_BY_ID
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
        rows = math.prod(shape[:-1])                    # Python ints: a mutated dim cannot wrap around
        if n < 1 or rows < 1:
            raise LowbitError(f"GGUF {path}: tensor {t.name} has an empty shape {shape}")
        if not gt.fits(n):
            raise LowbitError(f"GGUF {path}: tensor {t.name}: rows of {n} are not whole {gt.name} blocks")
        need = rows * gt.row_bytes(n)
        off = int(t.data_offset)
        if off < 0 or off + need > size:
            raise LowbitError(f"GGUF {path}: tensor {t.name}: {need} bytes at offset {off} run past the "
                              f"file ({size} bytes)")
        out[t.name] = (gt, shape, off, need)
    del r
    return out, size


class GGUFSource:
    """A GGUF's tensors by their HF names (config: the model's HF config, from gguf_meta_dir)."""

    def __init__(self, path: str | os.PathLike, config):
        from lowbit.arch.gguf_names import NameMap, arch_spec, qk_heads
        from lowbit.export.common import empty_model
        self.path = Path(path)
        table, _ = _table(self.path)
        spec = arch_spec(config.model_type)
        skeleton = empty_model(self.path.parent, torch.float32, config=config)
        expected = {n: tuple(p.shape) for n, p in skeleton.named_parameters(remove_duplicate=False)}
        hf_names = list(expected)
        names = NameMap(spec.gguf_arch, int(config.num_hidden_layers))
        n_head = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
        self.entries = {}
        for gname, e in table.items():
            try:
                hf = names.to_hf(gname, hf_names)
            except LowbitError as err:
                raise LowbitError(f"GGUF {self.path}: tensor {gname}: {err}") from None
            if hf in expected and e[1] != expected[hf]:
                # checked before anything is decoded: the shape decides how much memory a read takes
                raise LowbitError(f"GGUF {self.path}: tensor {gname} ({hf}) has shape {e[1]}, the model's "
                                  f"config expects {expected[hf]}")
            heads = qk_heads(hf, n_head, n_kv) if spec.permute_qk else None
            self.entries[hf] = (gname, *e, heads)

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _entry(self, name: str):
        if name not in self.entries:
            raise LowbitError(f"GGUF {self.path}: no tensor for {name}")
        return self.entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def read(self, name: str) -> torch.Tensor:
        from lowbit.arch.gguf_names import unpermute_qk
        from lowbit.numerics.ggml import dequantize
        gname, gt, shape, off, n, heads = self._entry(name)
        buf = bytearray(n)
        with open(self.path, "rb") as fh:
            got = os.preadv(fh.fileno(), [buf], off) if n else 0
        if got != n:
            raise LowbitError(f"GGUF {self.path}: tensor {gname}: read {got} of {n} bytes (file truncated?)")
        rows = math.prod(shape[:-1])
        a = dequantize(buf, gt, (rows, shape[-1] if shape else 1), name=gname).reshape(shape)
        del buf
        if not np.isfinite(a).all():
            raise LowbitError(f"GGUF {self.path}: tensor {gname} decodes to NaN/inf values")
        if heads is not None:
            a = unpermute_qk(a, heads)
        return torch.from_numpy(np.ascontiguousarray(a))
