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

SIZED_FORMATS = ("native", "gguf")
# GGUF: the tensors the plan does not choose are stored as llama.cpp's mixes store them: the token
# embedding / untied lm_head in HEAD_TYPE (the lm_head rule of every K mix; its fallback where the
# row does not fit, Q8_0 for 576 columns), 1-D tensors (norms, biases) in F32
HEAD_TYPE = "q6_k"
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
    if fmt == "gguf":
        from lowbit.numerics.ggml.weight import GGMLWeight
        if not isinstance(qw, GGMLWeight):
            raise LowbitError(f"{name}: a GGUF budget counts ggml-typed weights, got {type(qw).__name__}")
        return int(qw.data.numel())
    from lowbit.export.native import _layer_tensors
    tensors, _ = _layer_tensors(name, qw)
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


def fixed_bytes(fmt: str, model: nn.Module, quantized: list[str], source_dir: str | Path | None = None) -> dict:
    """The bytes that no plan changes: every tensor outside `quantized` (each storage once), the
    biases of the quantized modules, and the model files the format copies."""
    check_format(fmt)
    if fmt == "gguf":
        return _gguf_fixed_bytes(model, quantized, source_dir)
    from lowbit.export.common import MODEL_FILES
    floats = _unshared(model, set(quantized))
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


def _unshared(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of `model` outside the modules `skip`, each storage once (a tied lm_head is
    the embedding). A meta tensor (a streamed model's blocks not in memory) is its own: only its
    shape and dtype are read."""
    out, seen = {}, set()
    for key, value in model.state_dict(keep_vars=False).items():
        if key.rpartition(".")[0] in skip:
            continue
        ident = key if value.is_meta else (value.untyped_storage().data_ptr(), value.storage_offset(),
                                          tuple(value.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = value
    return out


def file_payload_bytes(out_dir: str | Path) -> dict:
    """Tensor data bytes (sum over safetensors headers' data_offsets, or a GGUF file's tensors) and
    total bytes of an output directory or GGUF file: what the budget accounting is checked against."""
    import json
    import struct
    out = Path(out_dir)
    if out.is_file() and out.suffix == ".gguf":       # one GGUF file: its tensors' bytes, the rest header
        import gguf
        payload = sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors)
        total = out.stat().st_size
        return {"payload_bytes": payload, "header_bytes": total - payload, "total_bytes": total}
    payload = header = 0
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            meta = json.loads(fh.read(n))
        header += 8 + n
        payload += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in meta.items() if k != "__metadata__")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"payload_bytes": payload, "header_bytes": header, "total_bytes": total}


def _gguf_fixed_bytes(model: nn.Module, quantized: list[str], source_dir) -> dict:
    """GGUF: tensors outside `quantized` as the mixes store them (HEAD_TYPE above), and the header
    (tokenizer vocabulary and merges as strings, per-tensor info, alignment) estimated."""
    import json
    from lowbit.numerics.ggml.types import ggml_type
    from lowbit.presets.gguf_mixes import fallback_type
    floats = _unshared(model, set(quantized))
    tensor_bytes = 0
    for name, t in floats.items():
        if t.dim() == 2:
            tensor_bytes += int(t.shape[0]) * ggml_type(fallback_type(HEAD_TYPE, int(t.shape[1]))).row_bytes(int(t.shape[1]))
        else:
            tensor_bytes += 4 * t.numel()
    for name in quantized:
        b = getattr(model.get_submodule(name), "bias", None)
        if isinstance(b, torch.Tensor):
            tensor_bytes += 4 * b.numel()
    n_tensors = len(floats) + len(quantized)
    vocab = 0
    tok = Path(source_dir) / "tokenizer.json" if source_dir is not None else None
    if tok is not None and tok.is_file():
        try:
            m = json.loads(tok.read_text(encoding="utf-8")).get("model", {})
        except (OSError, ValueError):
            m = {}
        # tokenizer.ggml.tokens (string: 8-byte length + bytes), token_type (int32), merges
        vocab = sum(8 + len(k.encode()) + 4 for k in m.get("vocab", {}))
        vocab += sum(8 + len((x if isinstance(x, str) else " ".join(x)).encode()) for x in m.get("merges", []))
    # per tensor: name, dims, type, offset (~80 bytes) and up to 32 bytes of alignment padding
    overhead = OVERHEAD_FIXED + vocab + 112 * n_tensors
    return {"tensor_bytes": int(tensor_bytes), "model_files_bytes": 0, "overhead_bytes": int(overhead),
            "total": int(tensor_bytes + overhead)}
