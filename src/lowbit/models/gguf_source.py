"""Read a GGUF's tensors one at a time, under their Hugging Face names, for streamed quantization.

    meta, digest = gguf_meta_dir(path)      # config.json + tokenizer files, no weights (cached)
    src = GGUFSource(path, config)          # the SafetensorsSource interface: keys / shape / dtype / read
    t = src.read("model.layers.3.mlp.down_proj.weight")     # decoded to float32 by lowbit's codecs

The header (metadata and tensor table) is walked with every count checked against the file, then
parsed by gguf-py's reader (export.gguf.header); every tensor's offset and size is checked against
the file, and its shape against the config, before anything is read. A tensor's bytes are then
read on their own with os.pread into a fresh buffer (no page of a mapping stays resident), decoded
bit for bit as ggml's to_float (numerics.ggml.dequantize), and LLaMA's q/k rows are un-permuted
(arch.gguf_names.unpermute_qk). The fp32 model never exists: peak memory is one tensor in
float32 plus its encoded bytes.

The values are exactly those of the fp32 copy load_model makes from the same file (transformers'
GGUF loader; tests/test_streaming.py checks the bundled model's streamed output against the
in-memory one byte for byte). The config directory has the files that copy has, save the weights.
"""
from __future__ import annotations

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
    from lowbit.export.gguf.header import check_header, tensor_table
    gguf = Path(gguf)
    digest = sha256_file(gguf)
    try:
        check_header(gguf)              # before transformers' loader (gguf-py) reads it
    except LowbitError as e:
        raise LowbitError(f"model file {gguf}: could not be read as a GGUF causal LM ({e}). "
                          f"sha256={digest}") from None
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
    names = tensor_table(gguf)
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


class GGUFSource:
    """A GGUF's tensors by their HF names (config: the model's HF config, from gguf_meta_dir)."""

    def __init__(self, path: str | os.PathLike, config):
        from lowbit.arch.gguf_names import NameMap, arch_spec, qk_heads
        from lowbit.export.common import empty_model
        from lowbit.export.gguf.header import tensor_table
        self.path = Path(path)
        table = tensor_table(self.path)
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
            if hf in expected and e.shape != expected[hf]:
                # checked before anything is decoded: the shape decides how much memory a read takes
                raise LowbitError(f"GGUF {self.path}: tensor {gname} ({hf}) has shape {e.shape}, the "
                                  f"model's config expects {expected[hf]}")
            heads = qk_heads(hf, n_head, n_kv) if spec.permute_qk else None
            self.entries[hf] = (e, heads)

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _entry(self, name: str):
        if name not in self.entries:
            raise LowbitError(f"GGUF {self.path}: no tensor for {name}")
        return self.entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[0].shape

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def read(self, name: str) -> torch.Tensor:
        from lowbit.arch.gguf_names import unpermute_qk
        from lowbit.export.gguf.header import read_tensor
        e, heads = self._entry(name)
        a = read_tensor(self.path, e)
        if heads is not None:
            a = unpermute_qk(a, heads)
        return torch.from_numpy(np.ascontiguousarray(a))
