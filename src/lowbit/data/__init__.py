"""Real text for calibration and evaluation (see data/text/ATTRIBUTION.md)."""
from lowbit.data.text import calibration_batches, load_text, token_windows, tokenize_text

__all__ = ["calibration_batches", "load_text", "token_windows", "tokenize_text"]
