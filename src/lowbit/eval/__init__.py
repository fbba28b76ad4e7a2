"""Evaluation: perplexity, KL to the original, top-1 agreement, size, speed, memory; reports.

    from lowbit.eval import evaluate, evaluate_reference
    base, ref = evaluate_reference(fp32_model, tok)             # fp32 record + its log-probs
    rec = evaluate(quant_model, tok, reference=ref)             # ppl, KL, top-1, size, speed, memory
    print(format_table([base, rec], ["fp32", "w4g128"]))

Every metric is also a function of its own: perplexity(), reference_logprobs() + kl_divergence(),
size_report(), measure_speed(), memory_report(). Each result states its exact method.
"""
from lowbit.eval.harness import ALL_METRICS, evaluate, evaluate_reference, parse_metrics, reference_for
from lowbit.eval.kl import (DEFAULT_KL_MAX_TOKENS, KLResult, ReferenceLogprobs, kl_divergence,
                            model_fingerprint, reference_logprobs)
from lowbit.eval.memory import memory_report, model_memory_bytes, peak_rss_bytes
from lowbit.eval.perplexity import (DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, SCORE_MODES, PerplexityResult,
                                    eval_windows, perplexity, score_windows)
from lowbit.eval.report import format_methods, format_table, markdown_table, write_json
from lowbit.eval.size import size_report
from lowbit.eval.speed import SpeedResult, greedy_generate, measure_speed, prepare_for_inference

__all__ = [
    "ALL_METRICS", "DEFAULT_KL_MAX_TOKENS", "DEFAULT_MAX_TOKENS", "DEFAULT_SEQ_LEN", "SCORE_MODES",
    "KLResult", "PerplexityResult", "ReferenceLogprobs", "SpeedResult",
    "evaluate", "evaluate_reference", "eval_windows", "format_methods", "format_table", "greedy_generate",
    "kl_divergence", "markdown_table", "measure_speed", "memory_report", "model_fingerprint",
    "model_memory_bytes", "parse_metrics", "peak_rss_bytes", "perplexity", "prepare_for_inference",
    "reference_for", "reference_logprobs", "score_windows", "size_report", "write_json",
]
