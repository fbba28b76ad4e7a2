"""ggml: llama.cpp's own block encoders as a lowbit method (the "RTN" of GGUF files).

    Rule(r".*", ggml_scheme("q4_k"), "ggml")      ->  GGMLWeight (Q4_K blocks, or its fallback)

Each weight is encoded exactly as llama-quantize would (numerics.ggml: without an imatrix
quantize_row_<t>_ref, with one quantize_row_<t>_impl), so a file of these blocks is byte-identical
to llama.cpp's for the same mix and imatrix. A row its block does not divide takes llama.cpp's
fallback type (presets.gguf_mixes.fallback_type: Q4_K -> Q5_0 on SmolLM2's 576 columns); the
weight's info says wanted and used. stats["imatrix"] (cols,), when given, is the per-column mean
x^2 llama-quantize reads from an imatrix file. refine: lowbit's block refinement on top
(methods/ggml_refine.py; lower imatrix-weighted error, bytes then differ from llama.cpp's).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError, check_float_tensor
from lowbit.methods import register_method
from lowbit.numerics.scheme import GGUF_FORMATS, Scheme


@dataclass
class GGMLConfig:
    refine: bool = False     # where an imatrix is given; see methods/ggml_refine.py


def resolve_type(scheme: Scheme, cols: int, name: str = "weight") -> tuple[str, str]:
    """(wanted, used) ggml type names for rows of `cols` values."""
    from lowbit.numerics.ggml.types import ggml_type
    from lowbit.presets.gguf_mixes import fallback_type
    if scheme.format not in GGUF_FORMATS + ("fp16", "fp32", "bf16"):
        raise LowbitError(f"{name}: method 'ggml' needs a ggml scheme format ({', '.join(GGUF_FORMATS)}), "
                          f"got {scheme.format!r}")
    wanted = ggml_type({"fp16": "F16", "fp32": "F32", "bf16": "BF16"}.get(scheme.format, scheme.format)).name
    return wanted, fallback_type(wanted, cols)


@register_method("ggml", GGMLConfig)
def ggml(weight: torch.Tensor, scheme: Scheme, config: GGMLConfig, stats: dict | None = None):
    from lowbit.numerics.ggml import quantize
    from lowbit.numerics.ggml.weight import GGMLWeight
    check_float_tensor(weight, "weight")
    w = weight.detach().float()
    if w.dim() != 2:
        raise LowbitError(f"ggml: expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    wanted, used = resolve_type(scheme, cols)
    imp = None if not stats else stats.get("imatrix")
    a = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    data = quantize(a, used, imatrix=imp)
    info = {"ggml_type": used, "ggml_wanted": wanted, "imatrix": imp is not None}
    if config.refine and imp is not None:      # tensors without imatrix entries keep llama.cpp's bytes
        from lowbit.methods.ggml_refine import refine
        data = refine(used, a, np.asarray(imp, dtype=np.float32), data)
        info["refined"] = True
    return GGMLWeight(torch.from_numpy(np.ascontiguousarray(data)), used, (rows, cols), wanted, info)
