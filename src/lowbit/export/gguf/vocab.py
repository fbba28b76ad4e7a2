"""Tokenizer metadata for GGUF files (tokenizer.ggml.* keys llama.cpp's llama-vocab.cpp reads).

Two sources, in order of preference:
  1. the GGUF the model was loaded from: its tokenizer.* keys are copied verbatim (they are what
     llama.cpp's own converter wrote, including the pre-tokenizer name);
  2. a Hugging Face tokenizer directory (tokenizer.json, byte-level BPE): tokens by id, token
     types (NORMAL, CONTROL for special added tokens, USER_DEFINED for other added tokens,
     UNUSED for holes), merges / special ids / add_bos / chat template via gguf.SpecialVocab, and
     the pre-tokenizer name from the tokenizer.json pre_tokenizer (PRE_TOKENIZERS below), which
     selects llama.cpp's regex set.
"""
from __future__ import annotations

import json
from pathlib import Path

from lowbit.errors import LowbitError

# tokenizer.json pre_tokenizer signature -> llama.cpp tokenizer.ggml.pre (llama-vocab.cpp)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits:individual", "ByteLevel"): "smollm",
    ("Split:" + QWEN2_SPLIT, "ByteLevel"): "qwen2",
    ("Split:" + LLAMA3_SPLIT, "ByteLevel"): "llama-bpe",
}


def _pre_signature(pre: dict | None) -> tuple[str, ...]:
    if not pre:
        return ()
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    sig = []
    for s in steps:
        t = s.get("type")
        if t == "Digits":
            sig.append("Digits:individual" if s.get("individual_digits") else "Digits")
        elif t == "Split":
            pat = s.get("pattern", {})
            sig.append("Split:" + str(pat.get("Regex", pat.get("String", ""))))
        else:
            sig.append(str(t))
    return tuple(sig)


def detect_pre(tokenizer_json: dict) -> str:
    sig = _pre_signature(tokenizer_json.get("pre_tokenizer"))
    if sig in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[sig]
    raise LowbitError(f"tokenizer: cannot tell llama.cpp's pre-tokenizer for {sig!r}; pass "
                      "tokenizer_pre= (one of llama.cpp's names, e.g. gpt-2, llama-bpe, qwen2, smollm)")


def kv_from_gguf(path: str | Path) -> list[tuple]:
    """(key, value, GGUFValueType, sub_type) for every tokenizer.* key of an existing GGUF."""
    import gguf

    from lowbit.export.gguf.header import open_reader
    r = open_reader(path)
    out = []
    for key, f in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    if not out:
        raise LowbitError(f"GGUF {path}: has no tokenizer.* metadata to copy")
    return out


def add_hf_tokenizer(writer, hf_dir: str | Path, vocab_size: int, pre: str | None = None) -> None:
    """Write tokenizer.ggml.* from a Hugging Face byte-level BPE tokenizer directory."""
    import gguf
    from transformers import AutoTokenizer
    hf_dir = Path(hf_dir)
    tj_path = hf_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise LowbitError(f"tokenizer: {hf_dir} has no tokenizer.json (only byte-level BPE is supported)")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if tj.get("model", {}).get("type") != "BPE" or tj["model"].get("byte_fallback"):
        raise LowbitError(f"tokenizer: {tj_path} is not a byte-level BPE tokenizer; export it from its GGUF")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or detect_pre(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
