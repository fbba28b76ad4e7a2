"""Evaluation: perplexity, KL to the original, top-1 agreement, size, speed, memory; reports."""
