"""Size: bits per weight of the linear layers, bytes per parameter of the whole model, files on disk.

Packed size is computed, not measured from a file: a QuantLinear counts
`QuantizedWeight.storage_bits()` (codes at their code width + fp16 scales + integer zero points at
`bits` + g_idx, the layout GPTQ-style formats store), every other tensor counts at its dtype as
held (fp32 for the bundled model's embeddings and norms; tied weights once; non-persistent
buffers such as rotary tables not at all, as a checkpoint would not store them).

    linear_bits_per_weight   over every nn.Linear / QuantLinear except the output head
                             (lm_head; tied to the embedding in SmolLM2 and kept in float by presets)
    bytes_per_param          packed_bytes / parameters, the whole model
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn


def files_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _persistent_tensors(model: nn.Module, skip: set[int]):
    """(tensor) for every parameter and persistent buffer, each storage once, minus `skip` ids."""
    seen: set[int] = set()
    for mod in model.modules():
        items = list(mod._parameters.items()) + [
            (n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for _, t in items:
            if t is None or id(t) in skip:
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            yield t


def size_report(model: nn.Module, *, path: str | os.PathLike | None = None,
                source_path: str | os.PathLike | None = None) -> dict:
    from lowbit.nn.qlinear import QuantLinear
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip: set[int] = set()
    q_weights = q_bits = 0
    lin_weights = lin_bits = 0
    from lowbit.nn.vq import VQLinear
    for mod in model.modules():
        if isinstance(mod, (QuantLinear, VQLinear)):
            qw = mod.qweight
            bits = qw.storage_bits()
            n = qw.shape[0] * qw.shape[1]
            q_weights += n
            q_bits += bits
            # its codes, qparams and any packed kernel below it are counted by storage_bits
            skip.update(id(t) for t in mod.buffers())
            if mod is not head:
                lin_weights += n
                lin_bits += bits
        elif isinstance(mod, nn.Linear) and mod is not head:
            lin_weights += mod.weight.numel()
            lin_bits += mod.weight.numel() * mod.weight.element_size() * 8
    float_params = float_bytes = 0
    for t in _persistent_tensors(model, skip):
        float_params += t.numel()
        float_bytes += t.numel() * t.element_size()
    params = q_weights + float_params
    packed_bytes = q_bits / 8 + float_bytes
    out = {
        "parameters": params,
        "quantized_weights": q_weights,
        "float_parameters": float_params,
        "packed_bytes": int(round(packed_bytes)),
        "bytes_per_param": packed_bytes / params if params else 0.0,
        "linear_bits_per_weight": lin_bits / lin_weights if lin_weights else None,
        "quantized_bits_per_weight": q_bits / q_weights if q_weights else None,
        "disk_bytes": files_bytes(path) if path is not None and Path(path).exists() else None,
        "source_bytes": files_bytes(source_path) if source_path is not None and Path(source_path).exists() else None,
        "method": ("packed_bytes = quantized linears at QuantizedWeight.storage_bits (codes + fp16 scales "
                   "+ zero points) + other tensors at their dtype (tied once); linear_bits_per_weight "
                   "over decoder linears (lm_head excluded), scales included"),
    }
    return out
