"""Hugging Face <-> llama.cpp (GGUF) tensor names and per-architecture facts, as data.

Tensor names come from gguf-py's TensorNameMap (the table llama.cpp's convert_hf_to_gguf.py uses):

    model.embed_tokens.weight                  token_embd.weight
    model.layers.{i}.self_attn.q_proj.weight   blk.{i}.attn_q.weight     (k, v, o -> attn_k/v/output)
    model.layers.{i}.mlp.gate_proj.weight      blk.{i}.ffn_gate.weight   (up, down -> ffn_up/down)
    model.layers.{i}.input_layernorm.weight    blk.{i}.attn_norm.weight  (post_attention_ -> ffn_norm)
    model.norm.weight / lm_head.weight         output_norm.weight / output.weight

LLaMA-family GGUFs store q/k rows in llama.cpp's rotary layout: HF interleaves each head's rotary
pairs as [first halves | second halves]; convert_hf_to_gguf.py permutes rows per head
(n_head, 2, head_dim/2) -> (n_head, head_dim/2, 2). `permute_qk` / `unpermute_qk` do that and its
inverse. Rows are whole quantization blocks, so permuting before or after quantizing is the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ArchSpec:
    hf_model_type: str       # config.model_type
    gguf_arch: str           # general.architecture (gguf.MODEL_ARCH_NAMES spelling)
    permute_qk: bool         # llama.cpp's LLAMA rope layout: q/k rows permuted per head
    write_vocab_size: bool   # convert_hf_to_gguf writes {arch}.vocab_size for this family
    write_rope_dim: bool     # ... and {arch}.rope.dimension_count


# dense decoder-only families whose GGUF tensors are exactly TensorNameMap's and whose llama.cpp
# graphs need no extra metadata beyond what writer.py writes
ARCHS: dict[str, ArchSpec] = {s.hf_model_type: s for s in (
    ArchSpec("llama", "llama", permute_qk=True, write_vocab_size=True, write_rope_dim=True),
    ArchSpec("mistral", "llama", permute_qk=True, write_vocab_size=True, write_rope_dim=True),
    ArchSpec("qwen2", "qwen2", permute_qk=False, write_vocab_size=False, write_rope_dim=False),
)}
GGUF_TO_HF_TYPE = {"llama": "llama", "qwen2": "qwen2"}


def arch_spec(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise LowbitError(f"GGUF export: model_type {model_type!r} is not supported yet; "
                          f"supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


def gguf_arch_enum(gguf_arch: str):
    import gguf
    for k, v in gguf.MODEL_ARCH_NAMES.items():
        if v == gguf_arch:
            return k
    raise LowbitError(f"gguf architecture {gguf_arch!r}: unknown to the gguf package")


class NameMap:
    """HF parameter name <-> GGUF tensor name for one architecture and layer count."""

    def __init__(self, gguf_arch: str, n_layers: int):
        import gguf
        self._map = gguf.get_tensor_name_map(gguf_arch_enum(gguf_arch), n_layers)
        self._rev: dict[str, str] = {}

    def to_gguf(self, hf_name: str) -> str:
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"GGUF export: no llama.cpp tensor name for {hf_name!r}")
        self._rev[name] = hf_name
        return name

    def to_hf(self, gguf_name: str, hf_names: list[str]) -> str:
        """Inverse map, given the HF model's own parameter names to choose from."""
        if not self._rev:
            for n in hf_names:
                g = self._map.get_name(n, try_suffixes=(".weight", ".bias"))
                if g is not None:
                    self._rev[g] = n
        if gguf_name not in self._rev:
            raise LowbitError(f"GGUF file: tensor {gguf_name!r} has no counterpart in the HF model")
        return self._rev[gguf_name]


def module_of(hf_param_name: str) -> str:
    """'model.layers.3.mlp.down_proj.weight' -> 'model.layers.3.mlp.down_proj' (Recipe targets)."""
    return hf_param_name.rsplit(".", 1)[0]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp rows: per head (2, hd/2) -> (hd/2, 2). w: (n_head*hd, ...)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(hf_name: str, n_head: int, n_head_kv: int) -> int | None:
    """Heads to permute over for a q/k projection (weight or bias), else None."""
    if ".self_attn.q_proj." in hf_name:
        return n_head
    if ".self_attn.k_proj." in hf_name:
        return n_head_kv
    return None
