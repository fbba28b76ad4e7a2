"""Record which ggml type llama.cpp's own quantizer gives every tensor, per mix (golden data for
tests/test_gguf_mixes.py). Runs in the peer venv; uses llama_model_quantize with dry_run=true
(llama.cpp decides every tensor's type, logs it, and writes nothing):

    bench/.venv-llamacpp/bin/python bench/peers/llamacpp_mix_types.py --out tests/golden/llama_cpp_mix_types.json \
        smollm2=PATH/SmolLM2-135M-Instruct.Q4_1.gguf [qwen2.5-coder-1.5b=PATH/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf]

The input's own types do not matter (allow_requantize); the decision depends on tensor names,
shapes and the model's hyperparameters, which are stored alongside.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import tempfile

import llama_cpp

MIXES = ("Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "TQ1_0", "F16")
_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\S+), size =\s+[\d.]+ MiB"
                   r"(?: ->\s+[\d.]+ MiB \((\S+)\))?")


def dry_run_types(path: str, ftype: str) -> dict[str, str]:
    log: list[str] = []
    cb = llama_cpp.llama_log_callback(lambda level, text, user: log.append(text.decode("utf-8", "replace")))
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"))
    params.allow_requantize = True
    params.dry_run = True
    params.nthread = 1
    with tempfile.TemporaryDirectory() as td:
        rc = llama_cpp.llama_model_quantize(path.encode(), os.path.join(td, "x.gguf").encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llamacpp_mix_types: dry run of {ftype} on {path} failed ({rc})")
    out = {}
    for m in _LINE.finditer("".join(log)):
        name, cur, new = m.groups()
        out[name] = (new or cur).upper()
    return out


def hparams(path: str) -> dict:
    import gguf
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    keys = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "context_length")
    hp = {"architecture": arch, **{k: r.fields[f"{arch}.{k}"].contents() for k in keys}}
    hp["vocab_size"] = len(r.fields["tokenizer.ggml.tokens"].data)
    hp["tied"] = not any(t.name == "output.weight" for t in r.tensors)
    return hp


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="label=path.gguf")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = {"llama_cpp_python": llama_cpp.__version__, "models": {}}
    for spec in a.models:
        label, path = spec.split("=", 1)
        res["models"][label] = {"hparams": hparams(path), "types": {m: dry_run_types(path, m) for m in MIXES}}
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=0, sort_keys=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
