"""Load a causal LM and its tokenizer from a built-in name, a GGUF file or a local HF directory.

    load_model("smollm2-135m")              built-in (models/registry.py), no hub access ever
    load_model("path/to/model.gguf")        dequantized to fp32 by transformers, cached once
    load_model("path/to/hf_dir")            config.json + safetensors (sharded or not)
    load_model("path/to/quantized_dir")     any quantized directory a format of lowbit.export
                                            recognises (lowbit native, GPTQ, AWQ, compressed-
                                            tensors): read by that format's reader, with its
                                            QuantLinear modules (PackedLinear with backend=)

A GGUF is dequantized once and cached as an ordinary safetensors directory under
cache_dir()/models/<stem>-<sha256[:16]>, written atomically, so later loads take about a second.
The entry records the sha256 of every file it holds (lowbit_cache.json); a later load checks
them and dequantizes again when anything differs (a corrupted or edited cache is never trusted).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io import atomic_dir, cache_dir
from lowbit.models.base import LoadedModel, dtype_kw as _dtype_kw  # noqa: F401 (re-exported)
from lowbit.models.registry import BUILTIN_MODELS, sha256_file

log = logging.getLogger(__name__)
DEFAULT_MODEL = "smollm2-135m"


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """-> ("gguf" | "hf", path). Clear error naming what was looked for."""
    s = str(source)
    if s in BUILTIN_MODELS:
        return "gguf", BUILTIN_MODELS[s].gguf_path()
    p = Path(s).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise LowbitError(f"model {s!r}: a file must be a .gguf; for a Hugging Face checkpoint "
                              "pass its directory (the one holding config.json)")
        return "gguf", p
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LowbitError(f"model {s!r}: directory has no config.json; expected a Hugging Face "
                              "causal-LM directory (config.json + *.safetensors)")
        return "hf", p
    raise LowbitError(f"model {s!r}: no such built-in name, file or directory. Built-in names: "
                      f"{', '.join(sorted(BUILTIN_MODELS))} (e.g. {BUILTIN_MODELS[DEFAULT_MODEL].install_hint}); "
                      "or pass a local .gguf file or Hugging Face directory. lowbit never downloads weights.")


def gguf_to_hf_dir(gguf: Path) -> tuple[Path, str]:
    """Dequantize a GGUF into a cached HF directory (once per file content). -> (dir, sha256)."""
    digest = sha256_file(gguf)
    out = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if out.exists():
        from lowbit.models.cache_check import cache_entry_ok, discard_entry
        why = cache_entry_ok(out, digest)
        if why is None:
            return out, digest
        log.warning("cached copy %s is not trusted (%s); dequantizing %s again", out, why, gguf)
        discard_entry(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.export.gguf.header import check_header
    try:
        check_header(gguf)              # before transformers' loader (gguf-py) reads it
    except LowbitError as e:
        raise LowbitError(f"model file {gguf}: could not be read as a GGUF causal LM ({e}). "
                          f"sha256={digest}") from None
    log.info("dequantizing %s to fp32 (once; cached at %s)", gguf, out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         **_dtype_kw(torch.float32))
    except Exception as e:  # transformers raises many types for a truncated / foreign file
        raise LowbitError(f"model file {gguf}: could not be read as a GGUF causal LM "
                          f"({type(e).__name__}: {e}). Is the file complete? "
                          f"sha256={digest}") from e
    # The weights are now plain fp32: drop the GGUF "quantizer" marker so the copy saves and
    # reloads as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from lowbit.models.cache_check import cache_entry_ok, write_record
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
            # transformers writes checkpoints on torch.distributed rank 0 only, silently
            raise LowbitError(f"model file {gguf}: transformers wrote no weights for its fp32 copy (under "
                              "torch.distributed it saves on rank 0 only): load the model on rank 0 first, "
                              f"then on the other ranks (the copy at {out} is shared)")
        (tmp / "lowbit_source.txt").write_text(f"{gguf.name}\nsha256 {digest}\n")
        write_record(tmp, gguf.name, digest)
    why = cache_entry_ok(out, digest)       # another process may have won the race: check its copy
    if why is not None:
        raise LowbitError(f"model file {gguf}: the cached fp32 copy {out} is not usable ({why}); delete it "
                          "and load again")
    return out, digest


def load_tokenizer(source: str | os.PathLike = DEFAULT_MODEL):
    from transformers import AutoTokenizer
    kind, path = resolve_source(source)
    if kind == "gguf":
        path, _ = gguf_to_hf_dir(path)
    return AutoTokenizer.from_pretrained(path)


def load_model(source: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               backend: str | None = None) -> LoadedModel:
    """Load a causal LM for evaluation or quantization (eval mode, no grad).

    A quantized directory is read by its format (lowbit.export registry); backend= then puts its
    quantized linears on packed CPU kernels as they are read (lowbit.nn.kernels), else they are
    QuantLinear modules with the exact reference forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kind, path = resolve_source(source)
    digest = None
    if kind == "hf":
        from lowbit.export import detect_format
        fmt = detect_format(path)
        if fmt is not None:
            lm = fmt.read(path, dtype=dtype, backend=backend)
            lm.source = str(source)
            return lm
        other = detect_format(path, readable=False)
        if other is not None:
            raise LowbitError(f"model {path}: a {other.name} export ({other.description}); lowbit writes "
                              f"it but does not read it back as a torch model"
                              + (": run it with lowbit.export.onnx.OnnxRunner(DIR)" if other.name == "onnx" else ""))
    if kind == "gguf":
        path, digest = gguf_to_hf_dir(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path, **_dtype_kw(dtype))
            tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise LowbitError(f"model directory {path}: could not be loaded "
                          f"({type(e).__name__}: {e})") from e
    model.eval()
    model.requires_grad_(False)
    from lowbit.export.common import check_vocab
    check_vocab(model, tok, path)
    return LoadedModel(model=model, tokenizer=tok, path=Path(path), source=str(source), source_sha256=digest)
