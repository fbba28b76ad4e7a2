"""Bytes a quantized module takes in the file a format writes, and the bytes that do not depend on
the plan (float tensors, tokenizer files, headers).

A module's bytes come from the format's own tensor producer (native: export.native._layer_tensors),
so the accounting is the file's, not a formula: 3-bit rows padded to whole 8-value runs, 5-8 bit
codes stored one byte each, zero points as uint8, fp16 scales, int32 g_idx.

    payload(plan) = sum over quantized modules of layer_bytes + fixed tensor bytes      (exact)
    file bytes    = payload + safetensors header + lowbit.json + config/tokenizer files (estimated:
                    the header and manifest hold per-layer text, measured ~1 KiB per layer)
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from lowbit.errors import LowbitError

SIZED_FORMATS = ("native",)
# lowbit.json + safetensors header text per quantized layer (names, shapes, offsets, scheme, info);
# measured on SmolLM2 native outputs: 0.9-1.1 KiB per layer. The file check in the tests bounds it.
OVERHEAD_PER_LAYER = 1100
OVERHEAD_FIXED = 4096


def check_format(fmt: str) -> None:
    if fmt not in SIZED_FORMATS:
        raise LowbitError(f"budget: format {fmt!r} has no byte accounting yet; expected one of {SIZED_FORMATS}")


def layer_bytes(fmt: str, name: str, qw) -> int:
    """Bytes of the tensors `fmt` writes for quantized weight `qw` (bias excluded: it is stored
    whatever the scheme, so it counts as fixed)."""
    check_format(fmt)
    from lowbit.export.native import _layer_tensors
    tensors, _ = _layer_tensors(name, qw)
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


def fixed_bytes(fmt: str, model: nn.Module, quantized: list[str], source_dir: str | Path | None = None) -> dict:
    """The bytes that no plan changes: every tensor outside `quantized` (each storage once), the
    biases of the quantized modules, and the model files the format copies."""
    check_format(fmt)
    from lowbit.export.common import MODEL_FILES, float_tensors
    floats, _ = float_tensors(model, set(quantized))
    tensor_bytes = sum(t.numel() * t.element_size() for t in floats.values())
    for name in quantized:
        b = getattr(model.get_submodule(name), "bias", None)
        if isinstance(b, torch.Tensor):
            tensor_bytes += b.numel() * b.element_size()
    files = 0
    if source_dir is not None:
        src = Path(source_dir)
        files = sum((src / n).stat().st_size for n in ("config.json",) + MODEL_FILES
                    if (src / n).is_file() and not (src / n).is_symlink())
    overhead = OVERHEAD_FIXED + OVERHEAD_PER_LAYER * len(quantized)
    return {"tensor_bytes": int(tensor_bytes), "model_files_bytes": int(files),
            "overhead_bytes": int(overhead), "total": int(tensor_bytes + files + overhead)}


def file_payload_bytes(out_dir: str | Path) -> dict:
    """Tensor data bytes (sum over safetensors headers' data_offsets) and total bytes of an output
    directory: what the budget accounting is checked against."""
    import json
    import struct
    out = Path(out_dir)
    payload = header = 0
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            meta = json.loads(fh.read(n))
        header += 8 + n
        payload += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in meta.items() if k != "__metadata__")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"payload_bytes": payload, "header_bytes": header, "total_bytes": total}
