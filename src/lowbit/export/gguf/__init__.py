"""GGUF (llama.cpp): one file holding the ggml blocks of every quantized tensor.

writer.py writes any QuantizedModel (ggml blocks unchanged, int grids unchanged where they are
exactly a ggml type, else re-encoded and reported); reader.py reads any GGUF back with lowbit's
decoders; vocab.py carries the tokenizer. A sidecar FILE.lowbit.json is the manifest.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.export import Format, register_format


def _detect(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() == ".gguf"


def write(qm, out, *, overwrite: bool = False, **options) -> Path:
    from lowbit.export.gguf.writer import write_quantized
    return write_quantized(qm, out, overwrite=overwrite, **options).path


def read(path, dtype: torch.dtype = torch.float32, backend=None):
    """Any GGUF -> LoadedModel with float weights decoded bit for bit as ggml (reader.load_gguf)."""
    from lowbit.export.gguf.reader import load_gguf
    from lowbit.models.base import LoadedModel
    model, tok, meta = load_gguf(path, dtype)
    return LoadedModel(model, tok, Path(path), str(path), meta={"gguf": meta, "format": "gguf"})


register_format(Format("gguf", "llama.cpp's GGUF v3: ggml block types (Q2_K..Q8_0, Q4_0/Q5_0/..., TQ1_0/TQ2_0)",
                       _detect, write, read, suffix=".gguf",
                       holds="ggml types; int g32 sym 4/5/8-bit and asym 4/5-bit exactly, other int grids re-encoded"))
