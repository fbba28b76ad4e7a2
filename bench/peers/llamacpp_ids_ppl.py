"""llama.cpp perplexity of a GGUF on *given* token windows, so it is compared on exactly the tokens
lowbit scores (bench/bench_gguf.py). Runs in the peer venv (llama-cpp-python, numpy only):

    bench/.venv-llamacpp/bin/python bench/peers/llamacpp_ids_ppl.py MODEL.gguf WINDOWS.npy [--text FILE]
    bench/.venv-llamacpp/bin/python bench/peers/llamacpp_ids_ppl.py MODEL.gguf --tokenize FILE   (ids only)

WINDOWS.npy: int (n, n_ctx) token ids. For each window: reset the KV cache, evaluate all n_ctx
tokens in one batch (logits for every position), NLL of tokens 1..n_ctx-1 under the logits of the
previous position (float64 log-softmax). Prints one JSON object: ppl = exp(mean NLL), the
per-window mean NLLs, and, with --text, how llama.cpp's own tokenizer cuts that text (to compare
with the tokenizer that made WINDOWS.npy).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

import llama_cpp


def _quiet() -> None:
    cb = llama_cpp.llama_log_callback(lambda level, text, user: None)
    _quiet.keep = cb
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))


def nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return lse - z[np.arange(len(targets)), targets]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("windows", nargs="?")
    ap.add_argument("--tokenize", default=None, help="only tokenize this text file (vocab-only load)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=None)
    a = ap.parse_args(argv)
    _quiet()
    if a.tokenize:
        llm = llama_cpp.Llama(model_path=a.model, vocab_only=True, verbose=False)
        ids = llm.tokenize(Path(a.tokenize).read_text(encoding="utf-8").encode(), add_bos=False, special=False)
        json.dump({"tool": "llama.cpp", "model": a.model, "text_tokens": ids}, sys.stdout)
        print()
        return
    wins = np.load(a.windows).astype(np.int64)
    n_ctx = int(wins.shape[1])
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=a.threads,
                          n_threads_batch=a.threads, logits_all=True, n_gpu_layers=0, verbose=False)
    t0 = time.perf_counter()
    per_window = []
    for w in wins:
        llm.reset()
        llm.eval(w.tolist())
        nll = nll_rows(np.asarray(llm.scores[:n_ctx - 1]), w[1:])
        if not np.isfinite(nll).all():
            raise SystemExit(f"llamacpp_ids_ppl: non-finite NLL for {a.model}")
        per_window.append(float(nll.mean()))
    mean = float(np.mean(per_window))
    out = {"tool": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "model": a.model,
           "windows": int(wins.shape[0]), "n_ctx": n_ctx, "ppl": float(np.exp(mean)), "mean_nll": mean,
           "window_mean_nll": per_window, "seconds": round(time.perf_counter() - t0, 1)}
    if a.text:
        ids = llm.tokenize(Path(a.text).read_text(encoding="utf-8").encode(), add_bos=False, special=False)
        out["text_tokens"] = ids
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
