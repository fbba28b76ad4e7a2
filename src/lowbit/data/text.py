"""Text sources and deterministic token windows.

Named sources: "wiki-calibration" and "wiki-evaluation" (bundled, disjoint by article);
otherwise a path to a UTF-8 text file or a directory of *.txt / *.md files (sorted by name).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lowbit.errors import LowbitError

TEXT_DIR = Path(__file__).resolve().parent / "text"
NAMED_TEXTS = {
    "wiki-calibration": TEXT_DIR / "enwiki_calibration.txt",
    "wiki-evaluation": TEXT_DIR / "enwiki_evaluation.txt",
}


def load_text(source: str | os.PathLike = "wiki-evaluation") -> str:
    s = str(source)
    if s in NAMED_TEXTS:
        return NAMED_TEXTS[s].read_text(encoding="utf-8")
    p = Path(s).expanduser()
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LowbitError(f"text file {p}: not UTF-8 text ({e})") from e
    if p.is_dir():
        files = sorted([*p.glob("*.txt"), *p.glob("*.md")])
        if not files:
            raise LowbitError(f"text directory {p}: holds no *.txt or *.md files")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    raise LowbitError(f"text {s!r}: not a named text ({', '.join(NAMED_TEXTS)}), file or directory")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) from the start of `ids`; the ragged tail is dropped."""
    if seq_len <= 0:
        raise LowbitError(f"seq_len: expected a positive integer, got {seq_len}")
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise LowbitError(f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def calibration_batches(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                        text: str | os.PathLike = "wiki-calibration") -> torch.Tensor:
    """(n_samples, seq_len) token windows drawn without overlap from the calibration text.

    The text is cut into non-overlapping windows, and `n_samples` of them are chosen by a seeded
    permutation: the same seed gives the same batch on every machine.
    """
    ids = tokenize_text(tokenizer, load_text(text))
    available = ids.numel() // seq_len
    if n_samples > available:
        raise LowbitError(f"calibration text {str(text)!r} has {ids.numel()} tokens = {available} windows "
                          f"of {seq_len}; {n_samples} samples were requested. Use fewer/shorter samples "
                          "or a longer text.")
    windows = token_windows(ids, seq_len)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows.shape[0], generator=g)[:n_samples].sort().values
    return windows[pick].clone()
