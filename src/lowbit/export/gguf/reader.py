"""Read a GGUF file (ours or anyone's) back into a transformers model, with lowbit's decoders.

    model, tokenizer, meta = load_gguf("model.Q4_K_M.gguf")

Config and tokenizer come from transformers' GGUF support (it maps {arch}.* keys and the
tokenizer.ggml.* vocabulary to an HF config / fast tokenizer); the weights are decoded here, bit
for bit as ggml's to_float, for every type lowbit has a codec for, so files transformers cannot
dequantize (TQ1_0 / TQ2_0 at the time of writing) load too. Rows permuted by the llama
converter are un-permuted (names.unpermute_qk); a file without output.weight is tied.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.export.gguf.header import open_reader, read_tensor, tensor_table
from lowbit.arch.gguf_names import GGUF_TO_HF_TYPE, NameMap, arch_spec, qk_heads, unpermute_qk


def gguf_metadata(path: str | Path) -> dict:
    """All scalar / short metadata as Python values (long arrays summarised by length)."""
    import gguf
    r = open_reader(path)
    out = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) > 64:
            out[key] = f"[{len(f.data)} items]"
        else:
            out[key] = f.contents()
    return out


def tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name."""
    return {t.name: t.tensor_type.name for t in open_reader(path).tensors}


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in numpy order (rows, n_per_row) / (n,), decoded by lowbit."""
    return {name: read_tensor(path, e) for name, e in tensor_table(path).items()}


def _materialise_buffers(model, config) -> None:
    """The model was built on the meta device (no weight init); its computed buffers (rotary
    inv_freq) are rebuilt on the CPU by constructing their module again from the config."""
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            try:
                fresh = type(mod)(config=config)
            except TypeError as e:
                raise LowbitError(f"GGUF load: cannot rebuild buffers of {name} ({type(mod).__name__}): {e}") from e
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fresh)


def load_gguf(path: str | Path, dtype=None):
    """-> (model, tokenizer, meta) for a GGUF of a supported architecture (names.ARCHS)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_TO_HF_TYPE:
        raise LowbitError(f"GGUF {path}: architecture {arch!r} not supported; supported: "
                          f"{', '.join(sorted(GGUF_TO_HF_TYPE))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    spec = arch_spec(config.model_type)
    tensors = read_tensors(path)
    config.tie_word_embeddings = "output.weight" not in tensors
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hf_names = list(dict(model.named_parameters()))
    names = NameMap(spec.gguf_arch, int(config.num_hidden_layers))
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    state = {}
    for gname, a in tensors.items():
        hf = names.to_hf(gname, hf_names)
        heads = qk_heads(hf, n_head, n_kv) if spec.permute_qk else None
        if heads is not None:
            a = unpermute_qk(a, heads)
        state[hf] = torch.from_numpy(np.ascontiguousarray(a))
    missing = set(hf_names) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise LowbitError(f"GGUF {path}: no tensors for {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    _materialise_buffers(model, config)
    model = model.to(dtype or torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model, tok, meta
