"""Load a lowbit native directory (export/native.py) straight into PackedLinear modules.

The float model is never allocated: the skeleton is built with accelerate's init_empty_weights
(parameters on the meta device, buffers such as rotary tables real), each quantized linear is
read from model.safetensors one tensor at a time (safe_open) and packed at once, and only the
tensors that stay float (embeddings, norms, a float lm_head) are materialised. Peak memory is
the packed model plus one layer's unpacked codes, not the float model (bench/bench_decode.py
--load measures it against loading fp32).

    lm = load_packed("out/smollm2-w4g128")          # -> LoadedModel, kernels attached
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from lowbit.errors import LowbitError


def _native():
    try:
        from lowbit.export import native
    except ImportError as e:  # export/native.py comes with issue 4
        raise LowbitError("loading a lowbit native directory needs lowbit.export.native "
                          f"(not in this install: {e})") from None
    return native


def is_native_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "lowbit.json").is_file()


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise LowbitError(f"tensor {key}: the model built from config.json has no such parameter or buffer")


def load_packed(path: str | os.PathLike, dtype: torch.dtype = torch.float32, backend: str = "auto",
                verify: bool = True):
    """A lowbit native directory -> LoadedModel whose quantized linears are PackedLinear."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.models.load import _dtype_kw
    from lowbit.nn.prepare import PackedLinear
    from lowbit.nn.qlinear import set_submodule

    native = _native()
    path = Path(path)
    manifest = native.read_manifest(path)
    wfile = path / native.WEIGHTS
    if verify:
        for fname, digest in manifest.get("files", {}).items():
            f = path / fname
            if not f.is_file() or native._sha256(f) != digest:
                raise LowbitError(f"{f}: missing or its sha256 does not match {native.MANIFEST}")
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **_dtype_kw(dtype))
    layers = manifest["layers"]
    used: set[str] = set()
    with safe_open(str(wfile), framework="pt") as f:
        keys = set(f.keys())

        def take(key: str, required: bool = True):
            if key not in keys:
                if required:
                    raise LowbitError(f"{wfile}: tensor {key} is missing")
                return None
            used.add(key)
            return f.get_tensor(key)

        for name, row in layers.items():
            qw, bias = native.read_qweight(take, name, row, wfile)   # any codes layout (packed or u8)
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise LowbitError(f"{path}: quantized layer {name} is not in the model built from "
                                  "config.json") from None
            if row.get("kind") == "embedding":  # lookup tables are served dequantized (api.quantize)
                _set_tensor(model, f"{name}.weight", qw.dequantize(dtype))
            else:
                set_submodule(model, name, PackedLinear(qw, None if bias is None else bias.to(dtype),
                                                        backend, name))
            del qw
        for key in sorted(keys - used):
            t = f.get_tensor(key)
            _set_tensor(model, key, t.to(dtype) if t.is_floating_point() else t)
    native.retie(model, manifest)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise LowbitError(f"{wfile}: no tensor for {left[:5]} ({len(left)} in all)")
    return native.loaded(model, path, manifest)
