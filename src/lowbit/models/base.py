"""LoadedModel: what every loader and every format reader returns. Imports nothing of lowbit's
loaders, so readers (export/*) and the loader that dispatches to them (models/load.py) can both
use it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path                      # the directory (or file) the weights were read from
    source: str                     # what the user asked for
    source_sha256: str | None = None  # of the GGUF / safetensors the weights came from
    meta: dict = field(default_factory=dict)   # "manifest", "format", "qweights" (readers)


def dtype_kw(dtype: torch.dtype) -> dict:
    """from_pretrained / from_config's dtype keyword: `dtype` from transformers 5, `torch_dtype` before."""
    import transformers
    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
