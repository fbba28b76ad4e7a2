"""llama.cpp as a reference peer: perplexity, CPU speed, and llama.cpp's own quantizer.

Run with the peer venv made by bench/setup_peers.sh (never lowbit's .venv):

    bench/.venv-llamacpp/bin/python bench/peers/llamacpp_ref.py ppl   MODEL.gguf --text FILE --n-ctx 512 --max-windows 40
    bench/.venv-llamacpp/bin/python bench/peers/llamacpp_ref.py speed MODEL.gguf --threads 2
    bench/.venv-llamacpp/bin/python bench/peers/llamacpp_ref.py quantize IN.gguf OUT.gguf --ftype Q4_K_M [--imatrix F]

Each subcommand prints one JSON object on stdout (llama.cpp's own log goes to stderr and is
silenced unless --verbose). The same functions are importable: `perplexity`, `speed`, `quantize`.

Perplexity convention (matches lowbit.data.text.token_windows, so numbers are comparable):
the whole text is tokenised once with the GGUF's own tokenizer, no BOS (`--add-bos` to prepend
one per window, llama.cpp's `llama-perplexity` style), cut into non-overlapping windows of n_ctx
tokens from the start (ragged tail dropped); in each window every token after the first is
scored, ppl = exp(mean natural-log NLL). llama-perplexity itself scores only the second half of
each window, so its figures are lower than these; don't mix the two.

Speed convention (as llama-bench's pp/tg): prompt processing = one batch of `--pp` tokens into an
empty KV cache; decode = batch 1, greedy argmax, `--tg` tokens after a short prompt, EOS ignored.
One warm-up run of each is discarded; the median of `--runs` timed runs is reported.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# ggml's CPU backend runs each graph inside an OpenMP parallel region. libgomp's default is to
# spin between regions; on our shared 2-core box (load often > 2) that made 2-thread decode 5-15x
# slower than with passive waiting (measured: 2.5-6 vs 30-43 tok/s). Must be set before libgomp
# loads; an explicit OMP_WAIT_POLICY from the caller wins, and the value is reported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp  # noqa: E402
from llama_cpp._utils import suppress_stdout_stderr  # noqa: E402

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "src/lowbit/data/text/enwiki_evaluation.txt"


def load(model_path: str | os.PathLike, n_ctx: int = 512, threads: int = 2, n_batch: int | None = None,
         logits_all: bool = False, verbose: bool = False) -> llama_cpp.Llama:
    """Load a GGUF on the CPU with `threads` for both decode and batch (prompt) work."""
    if not Path(model_path).is_file():
        raise SystemExit(f"llamacpp_ref: GGUF not found: {model_path}")
    n_batch = n_batch or n_ctx
    return llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                           n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                           n_gpu_layers=0, verbose=verbose)


def tokenize_file(llm: llama_cpp.Llama, text_path: str | os.PathLike) -> np.ndarray:
    """Token ids (int32) of the whole file with the GGUF's tokenizer, no BOS, no special parsing."""
    text = Path(text_path).read_text(encoding="utf-8")
    return np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False), dtype=np.int32)


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """NLL (nats) of targets under float32 logits (n, vocab): max-shifted exp in float32, sums in float64."""
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0].astype(np.float64) + np.log(np.exp(logits - m).sum(axis=1, dtype=np.float64))
    return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


def perplexity(model_path, text_path=DEFAULT_TEXT, n_ctx: int = 512, max_windows: int | None = 40,
               threads: int = 2, add_bos: bool = False, verbose: bool = False, ids_path=None) -> dict:
    """Perplexity over non-overlapping n_ctx windows; see the module docstring for the convention.

    ids_path: a .npy of token ids to score instead of tokenising text_path (e.g. lowbit's own
    tokenisation), so both tools see exactly the same windows.
    """
    llm = load(model_path, n_ctx=n_ctx, threads=threads, logits_all=True, verbose=verbose)
    if ids_path is not None:
        ids = np.load(ids_path).astype(np.int32).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= llm.n_vocab()):
            raise SystemExit(f"llamacpp_ref: {ids_path} has ids outside [0, {llm.n_vocab()})")
        text_path = ids_path
    else:
        ids = tokenize_file(llm, text_path)
    body = n_ctx - 1 if add_bos else n_ctx
    n_win = len(ids) // body
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    if n_win < 1:
        raise SystemExit(f"llamacpp_ref: {text_path} has {len(ids)} tokens, fewer than one window of {body}")
    bos = llm.token_bos()
    nll_sum, scored = 0.0, 0
    t0 = time.perf_counter()
    for w in range(n_win):
        win = ids[w * body:(w + 1) * body]
        if add_bos:
            win = np.concatenate([[bos], win]).astype(np.int32)
        llm.reset()
        llm.eval(win.tolist())
        logits = llm.scores[:len(win) - 1]          # (n_ctx-1, vocab): position i predicts token i+1
        nll = _log_softmax_nll(logits, win[1:])
        if add_bos:
            nll = nll[1:]                            # BOS -> first text token is not a text prediction
        if not np.isfinite(nll).all():
            raise SystemExit(f"llamacpp_ref: non-finite NLL in window {w}")
        nll_sum += float(nll.sum())
        scored += len(nll)
    return {"tool": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "model": str(model_path),
            "text": str(text_path), "ppl": float(np.exp(nll_sum / scored)), "mean_nll": nll_sum / scored,
            "tokens_scored": scored, "n_ctx": n_ctx, "windows": n_win, "add_bos": add_bos,
            "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "seconds": round(time.perf_counter() - t0, 2)}


def _decode_greedy(llm: llama_cpp.Llama, prompt: list[int], n_tokens: int) -> float:
    """Seconds to decode n_tokens one at a time (greedy argmax) after evaluating `prompt`."""
    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        llm.eval([int(logits.argmax())])
    return time.perf_counter() - t0


def _prompt_once(llm: llama_cpp.Llama, prompt: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    return time.perf_counter() - t0


def speed(model_path, threads: int = 2, tg: int = 128, pp: int = 512, runs: int = 3,
          text_path=DEFAULT_TEXT, verbose: bool = False) -> dict:
    """Median tokens/s for prompt processing (pp tokens in one batch) and greedy decode (tg tokens)."""
    n_ctx = max(pp, 16 + tg)
    llm = load(model_path, n_ctx=n_ctx, threads=threads, n_batch=pp, verbose=verbose)
    ids = tokenize_file(llm, text_path)
    if len(ids) < pp:
        raise SystemExit(f"llamacpp_ref: {text_path} has {len(ids)} tokens, fewer than --pp {pp}")
    prompt_pp = ids[:pp].tolist()
    prompt_tg = ids[:16].tolist()
    _prompt_once(llm, prompt_pp)                     # warm-up: page in weights, build graphs
    pp_s = [_prompt_once(llm, prompt_pp) for _ in range(runs)]
    _decode_greedy(llm, prompt_tg, min(tg, 16))      # warm-up
    tg_s = [_decode_greedy(llm, prompt_tg, tg) for _ in range(runs)]
    return {"tool": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "model": str(model_path),
            "threads": threads, "runs": runs,
            "pp_tokens": pp, "pp_tok_per_s": pp / statistics.median(pp_s),
            "pp_tok_per_s_runs": [round(pp / s, 2) for s in pp_s],
            "tg_tokens": tg, "tg_tok_per_s": tg / statistics.median(tg_s),
            "tg_tok_per_s_runs": [round(tg / s, 2) for s in tg_s],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "system_info": llama_cpp.llama_print_system_info().decode().strip()}


# ---- quantize ---------------------------------------------------------------------------------

def _ftype(name: str) -> int:
    """'Q4_K_M' -> LLAMA_FTYPE_MOSTLY_Q4_K_M, 'F32' -> LLAMA_FTYPE_ALL_F32 (enum from llama.h)."""
    key = name.upper()
    for attr in (f"LLAMA_FTYPE_MOSTLY_{key}", f"LLAMA_FTYPE_ALL_{key}"):
        if hasattr(llama_cpp, attr):
            return int(getattr(llama_cpp, attr))
    known = sorted(a.replace("LLAMA_FTYPE_MOSTLY_", "").replace("LLAMA_FTYPE_ALL_", "")
                   for a in dir(llama_cpp) if a.startswith(("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_")))
    raise SystemExit(f"llamacpp_ref: unknown --ftype {name!r}; llama.cpp knows {', '.join(known)}")


def load_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Per-tensor importance vectors (mean of x^2 over tokens, one per input column).

    Accepts llama.cpp's GGUF imatrix (tensors '<name>.in_sum2' and '<name>.counts', F32; value =
    in_sum2 / count per expert, 1 where count is 0, as tools/quantize does) or an .npz mapping
    GGUF tensor names (e.g. 'blk.0.attn_q.weight') to already-averaged float vectors.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: np.ascontiguousarray(z[k], dtype=np.float32).ravel() for k in z.files}
    import gguf
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[:-len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise SystemExit(f"llamacpp_ref: imatrix {path} has {name} but no {base}.counts")
        sums = sums.reshape(counts.size, -1)
        c = counts.reshape(-1, 1)
        vals = np.where(c > 0, sums / np.where(c > 0, c, 1), 1.0)
        out[base] = np.ascontiguousarray(vals, dtype=np.float32).ravel()
    if not out:
        raise SystemExit(f"llamacpp_ref: no '*.in_sum2' tensors in imatrix {path} (legacy .dat is not supported)")
    return out


def tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """{ggml type name: tensor count} of a GGUF, to see what llama.cpp actually chose."""
    import gguf
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def quantize(src, dst, ftype: str = "Q4_K_M", imatrix: str | os.PathLike | dict | None = None,
             threads: int = 2, allow_requantize: bool = True, pure: bool = False,
             verbose: bool = False) -> dict:
    """Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize, = `llama-quantize`).

    A quantized input is dequantized to f32 by llama.cpp first (allow_requantize), so requantizing
    the bundled Q4_1 GGUF is the same as quantizing its dequantized weights, which is what lowbit
    loads as its float baseline. The output is written to a temp name and renamed.
    Note: k-quants need rows that are a multiple of 256; llama.cpp silently falls back (to Q5_0,
    Q8_0, ...) for other tensors (all 576-column ones in SmolLM2-135M), so check tensor_types.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise SystemExit(f"llamacpp_ref: GGUF not found: {src}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(ftype)
    params.nthread = threads
    params.allow_requantize = allow_requantize
    params.pure = pure
    keep = []                                        # arrays the C side reads during the call
    if imatrix is not None:
        data = imatrix if isinstance(imatrix, dict) else load_imatrix(imatrix)
        entries = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()   # NULL-name terminated
        for i, (name, vec) in enumerate(sorted(data.items())):
            vec = np.ascontiguousarray(vec, dtype=np.float32)
            if not np.isfinite(vec).all():
                raise SystemExit(f"llamacpp_ref: imatrix entry {name} has non-finite values")
            keep.append((name.encode(), vec))
            entries[i].name = keep[-1][0]
            entries[i].data = vec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = vec.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    t0 = time.perf_counter()
    try:
        with suppress_stdout_stderr(disable=verbose):   # its per-tensor log goes to stderr
            rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llamacpp_ref: llama_model_quantize({src} -> {ftype}) failed with {rc}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"tool": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "src": str(src), "dst": str(dst),
            "ftype": ftype.upper(), "imatrix": None if imatrix is None else
            (str(imatrix) if not isinstance(imatrix, dict) else f"{len(imatrix)} tensors"),
            "bytes": dst.stat().st_size, "tensor_types": tensor_types(dst), "pure": pure,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl", help="perplexity over non-overlapping windows")
    p.add_argument("model")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40, help="0 = all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--add-bos", action="store_true")
    p.add_argument("--ids", default=None, help=".npy of token ids to score instead of tokenising --text")
    s = sub.add_parser("speed", help="prompt-processing and decode tokens/s")
    s.add_argument("model")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--tg", type=int, default=128, help="decode tokens per run")
    s.add_argument("--pp", type=int, default=512, help="prompt tokens per run")
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--text", default=str(DEFAULT_TEXT))
    q = sub.add_parser("quantize", help="llama.cpp's own quantizer (llama_model_quantize)")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--ftype", default="Q4_K_M", help="Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K "
                   "TQ1_0 TQ2_0 IQ4_NL F16 F32 ...")
    q.add_argument("--imatrix", default=None, help="llama.cpp GGUF imatrix, or .npz name -> vector")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--pure", action="store_true", help="every quantizable tensor gets --ftype's base type")
    for x in (p, s, q):
        x.add_argument("--verbose", action="store_true", help="show llama.cpp's log on stderr")
    a = ap.parse_args(argv)
    if a.cmd == "ppl":
        out = perplexity(a.model, a.text, a.n_ctx, a.max_windows or None, a.threads, a.add_bos, a.verbose, a.ids)
    elif a.cmd == "speed":
        out = speed(a.model, a.threads, a.tg, a.pp, a.runs, a.text, a.verbose)
    else:
        out = quantize(a.src, a.dst, a.ftype, a.imatrix, a.threads, pure=a.pure, verbose=a.verbose)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
