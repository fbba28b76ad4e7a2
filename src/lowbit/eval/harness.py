"""evaluate(): run the selected metrics on one model and return one JSON-able record.

Quality metrics share one forward pass per window (perplexity.score_windows): perplexity always
comes out of it, KL/top-1 against a reference ride on it, and `evaluate_reference` keeps the
reference's own log-probs from its perplexity pass so they never cost a second pass.
"""
from __future__ import annotations

import os
import time
from collections import Counter

import torch

from lowbit.data import load_text, token_windows, tokenize_text
from lowbit.errors import LowbitError
from lowbit.eval.kl import (DEFAULT_KL_MAX_TOKENS, KLAccumulator, ReferenceCollector, ReferenceLogprobs,
                            model_fingerprint, reference_logprobs)
from lowbit.eval.memory import memory_report
from lowbit.eval.perplexity import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, score_start, score_windows
from lowbit.eval.report import EVAL_RECORD_VERSION, env_info
from lowbit.eval.size import size_report
from lowbit.eval.speed import measure_speed, prepare_for_inference

ALL_METRICS = ("ppl", "kl", "size", "speed", "memory")
DEFAULT_SPEED = {"prompt_len": 128, "new_tokens": 32, "runs": 3, "warmup": 1}


def parse_metrics(metrics) -> tuple[str, ...]:
    if metrics is None:
        return ALL_METRICS
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in ALL_METRICS]
    if bad or not metrics:
        raise LowbitError(f"metrics: expected a comma-separated subset of {','.join(ALL_METRICS)}, got {metrics!r}")
    return tuple(m for m in ALL_METRICS if m in metrics)


def _model_info(model: torch.nn.Module) -> dict:
    from lowbit.nn.qlinear import QuantLinear
    schemes = Counter(m.scheme.short_name() for m in model.modules() if isinstance(m, QuantLinear))
    cfg = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(cfg, "model_type", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "quant_linears": sum(schemes.values()), "schemes": dict(schemes),
            "dtype": str(next(model.parameters()).dtype)}


def _run(model, tokenizer, *, metrics, reference, collect: bool, text, seq_len, max_tokens, score,
         kl_max_tokens, speed, label, path, source_path, cache, cache_root, progress, consumers=()):
    metrics = parse_metrics(metrics)
    score_start(seq_len, score)
    speed = {**DEFAULT_SPEED, **(speed or {})}
    if "kl" in metrics and reference is None and not collect:
        raise LowbitError("metric 'kl' needs a reference: pass reference= (the original model or "
                          "its ReferenceLogprobs), or leave 'kl' out of metrics")
    t_start = time.perf_counter()
    ids = tokenize_text(tokenizer, load_text(text))
    windows = _windows(ids, seq_len, max_tokens)
    n_kl = _n_kl_windows(windows, seq_len, kl_max_tokens)
    record: dict = {"lowbit_eval_version": EVAL_RECORD_VERSION, "label": label,
                    "model": _model_info(model),
                    "settings": {"text": str(text), "seq_len": seq_len, "max_tokens": max_tokens,
                                 "score": score, "kl_max_tokens": kl_max_tokens, "metrics": list(metrics),
                                 "speed": speed},
                    "inference": prepare_for_inference(model)}

    ref = None
    if "kl" in metrics and reference is not None:
        if isinstance(reference, ReferenceLogprobs):
            ref = reference
        elif isinstance(reference, torch.nn.Module):
            ref = reference_logprobs(reference, windows[:n_kl], score=score, cache=cache,
                                     cache_root=cache_root, progress=progress)
        else:
            raise LowbitError(f"reference: expected a model or ReferenceLogprobs, got {type(reference).__name__}")
        if ref.score != score:
            raise LowbitError(f"reference: computed with score={ref.score!r}, this run uses score={score!r}")

    collector = None
    if collect:
        collector = ReferenceCollector(windows[:n_kl], score, model_fingerprint(model))
    if "ppl" in metrics or collector is not None:
        consumers = list(consumers)
        kl_acc = None
        # KL rides on the perplexity pass when the reference's windows are this run's first windows
        rides = ref is not None and ref.n_windows <= windows.shape[0] and torch.equal(ref.windows, windows[:ref.n_windows])
        if rides:
            kl_acc = KLAccumulator(ref)
            consumers.append(kl_acc)
        if collector is not None:
            consumers.append(collector)
        # collecting only (no perplexity): the reference windows are all that need a pass
        pass_windows = windows if "ppl" in metrics else windows[:n_kl]
        res = score_windows(model, pass_windows, score=score, consumers=consumers, progress=progress,
                            desc=f"perplexity{' + KL' if kl_acc else ''}{f' [{label}]' if label else ''}")
        if "ppl" in metrics:
            record["ppl"] = res.to_dict()
        if kl_acc is not None:
            record["kl"] = kl_acc.result().to_dict()
    if ref is not None and "kl" not in record:
        kl_acc = KLAccumulator(ref)
        score_windows(model, ref.windows, score=score, consumers=[kl_acc], progress=progress, desc="KL")
        record["kl"] = kl_acc.result().to_dict()
    if collector is not None and "kl" in metrics:
        # a model evaluated as the reference: KL against itself is exactly 0, top-1 exactly 1
        own = collector.result()
        record["kl"] = _self_kl(own).to_dict()

    if "size" in metrics:
        record["size"] = size_report(model, path=path, source_path=source_path)
    if "speed" in metrics:
        plen = int(speed["prompt_len"])
        if ids.numel() < plen:
            raise LowbitError(f"speed: text has {ids.numel()} tokens, fewer than prompt_len={plen}")
        s = measure_speed(model, ids[:plen], new_tokens=int(speed["new_tokens"]), runs=int(speed["runs"]),
                          warmup=int(speed["warmup"]), progress=progress).to_dict()
        s["prompt_text"] = tokenizer.decode(ids[:plen])
        s["completion_text"] = tokenizer.decode(s["completion"])
        record["speed"] = s
    if "memory" in metrics:
        record["memory"] = memory_report(model)
    record["seconds"] = time.perf_counter() - t_start
    record["env"] = env_info()
    if collect:
        return record, collector.result()
    return record


def _windows(ids: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    if not isinstance(max_tokens, int) or max_tokens < seq_len:
        raise LowbitError(f"max_tokens: expected an integer >= seq_len ({seq_len}), got {max_tokens!r}")
    return token_windows(ids, seq_len, max_windows=max_tokens // seq_len)


def _n_kl_windows(windows: torch.Tensor, seq_len: int, kl_max_tokens: int) -> int:
    if not isinstance(kl_max_tokens, int) or kl_max_tokens < seq_len:
        raise LowbitError(f"kl_max_tokens: expected an integer >= seq_len ({seq_len}), got {kl_max_tokens!r}")
    return min(kl_max_tokens // seq_len, windows.shape[0])


def reference_for(ref_model: torch.nn.Module, tokenizer, *, text="wiki-evaluation", seq_len: int = DEFAULT_SEQ_LEN,
                  max_tokens: int = DEFAULT_MAX_TOKENS, kl_max_tokens: int = DEFAULT_KL_MAX_TOKENS,
                  score: str = "all", cache: bool = True, cache_root=None, progress: bool = True) -> ReferenceLogprobs:
    """The reference log-probs `evaluate` would compute for these settings (cached on disk), so a
    caller can free the reference model, or quantize it in place, before evaluating."""
    score_start(seq_len, score)
    windows = _windows(tokenize_text(tokenizer, load_text(text)), seq_len, max_tokens)
    n_kl = _n_kl_windows(windows, seq_len, kl_max_tokens)
    return reference_logprobs(ref_model, windows[:n_kl], score=score, cache=cache, cache_root=cache_root,
                              progress=progress)


def _self_kl(ref: ReferenceLogprobs):
    acc = KLAccumulator(ref)
    T = ref.logprobs.shape[1]
    for i in range(ref.n_windows):
        acc(i, ref.logprobs[i].float(), ref.windows[i, -T:])
    return acc.result()


def evaluate(model: torch.nn.Module, tokenizer, *, metrics=None, reference=None,
             text: str | os.PathLike = "wiki-evaluation", seq_len: int = DEFAULT_SEQ_LEN,
             max_tokens: int = DEFAULT_MAX_TOKENS, score: str = "all",
             kl_max_tokens: int = DEFAULT_KL_MAX_TOKENS, speed: dict | None = None, label: str | None = None,
             path=None, source_path=None, cache: bool = True, cache_root=None, progress: bool = True,
             consumers=()) -> dict:
    """Evaluate `model` on `text`; returns a record (see lowbit.eval.report).

    metrics    subset of ppl,kl,size,speed,memory (default: all; 'kl' needs `reference`)
    reference  the original model (its log-probs are computed once and cached on disk) or a
               ReferenceLogprobs from `evaluate_reference` / `reference_logprobs`
    speed      overrides of {"prompt_len": 128, "new_tokens": 32, "runs": 3, "warmup": 1}
    path / source_path   checkpoint directory / source file, for the on-disk size
    consumers  extra callbacks (window_index, logprobs (T, V), targets (T,)) on the perplexity pass
    """
    if metrics is None:
        metrics = [m for m in ALL_METRICS if m != "kl" or reference is not None]
    return _run(model, tokenizer, metrics=metrics, reference=reference, collect=False, text=text,
                seq_len=seq_len, max_tokens=max_tokens, score=score, kl_max_tokens=kl_max_tokens,
                speed=speed, label=label, path=path, source_path=source_path, cache=cache,
                cache_root=cache_root, progress=progress, consumers=consumers)


def evaluate_reference(model: torch.nn.Module, tokenizer, *, metrics=None, text="wiki-evaluation",
                       seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int = DEFAULT_MAX_TOKENS, score: str = "all",
                       kl_max_tokens: int = DEFAULT_KL_MAX_TOKENS, speed: dict | None = None,
                       label: str | None = None, path=None, source_path=None,
                       progress: bool = True, consumers=()) -> tuple[dict, ReferenceLogprobs]:
    """Evaluate the original model and keep its log-probs on the first kl_max_tokens // seq_len
    windows (from the same pass) as the reference for the models quantized from it."""
    if metrics is None:
        metrics = [m for m in ALL_METRICS if m != "kl"]
    return _run(model, tokenizer, metrics=metrics, reference=None, collect=True, text=text, seq_len=seq_len,
                max_tokens=max_tokens, score=score, kl_max_tokens=kl_max_tokens, speed=speed, label=label,
                path=path, source_path=source_path, cache=False, cache_root=None, progress=progress,
                consumers=consumers)
