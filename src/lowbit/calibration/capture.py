"""Calibration settings, and the activations that flow from one decoder block to the next.

    tokens = calibration_tokens(tokenizer, CalibrationConfig(n_samples=128, seq_len=512))
    acts   = capture_block_inputs(model, blocks[0], tokens, batch_size=8)
    # acts: list over batches of BlockInput(hidden (b, seq, d) float32, kwargs for the block)
    acts   = [run_block(block, a) for a in acts]      # next block's inputs

Capturing runs the model's embedding front end (embed_tokens, rotary tables, masks) and stops at
the first block's forward pre-hook, so whatever the architecture prepares for its blocks
(position_embeddings, attention_mask, position_ids) is recorded as it is, per batch, and
replayed for every block: no per-model code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from lowbit.errors import LowbitError


@dataclass
class CalibrationConfig:
    """n_samples token windows of seq_len from `text` (seeded, non-overlapping), run through the
    model `batch_size` windows at a time. true_sequential: each linear group's statistics are
    collected after the groups before it in the block are quantized (GPTQ paper's sequential
    mode); False collects a whole block's statistics from one float pass.
    pause_forward (true_sequential only): each batch's block forward pauses at every group's
    input while the group is quantized (calibration/paused.py): one block forward per block,
    holding every batch's intermediate activations meanwhile; False re-runs the block from its
    start for each group instead (~2.5x the forward compute, least memory).
    """
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text: str = "wiki-calibration"
    batch_size: int = 8
    true_sequential: bool = True
    pause_forward: bool = True

    def __post_init__(self) -> None:
        for k in ("n_samples", "seq_len", "batch_size"):
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise LowbitError(f"calibration {k}: expected a positive integer, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "CalibrationConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LowbitError(f"calibration: unknown option(s) {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_tokens(tokenizer, cfg: CalibrationConfig) -> torch.Tensor:
    """(n_samples, seq_len) token ids; a clear error when the text is too short."""
    from lowbit.data.text import calibration_batches
    return calibration_batches(tokenizer, cfg.n_samples, cfg.seq_len, cfg.seed, cfg.text)


@dataclass
class BlockInput:
    hidden: torch.Tensor      # (batch, seq, hidden) float32
    kwargs: dict              # everything else the model passed to its blocks

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed input has been seen."""


def capture_block_inputs(model: nn.Module, first_block: nn.Module, tokens: torch.Tensor,
                         batch_size: int) -> list[BlockInput]:
    """Inputs of `first_block` for every batch of `tokens` (n, seq)."""
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise LowbitError(f"calibration tokens: expected a (n_samples, seq_len) LongTensor, "
                          f"got {tuple(tokens.shape)} {tokens.dtype}")
    captured: list[BlockInput] = []

    def hook(_mod, args, kwargs):
        kw = dict(kwargs)
        hidden = args[0] if args else kw.pop("hidden_states")
        # The block must not grow a KV cache while we replay it many times.
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        if "use_cache" in kw:
            kw["use_cache"] = False
        captured.append(BlockInput(hidden.detach().float(), kw))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b0 in range(0, tokens.shape[0], batch_size):
                try:
                    model(input_ids=tokens[b0:b0 + batch_size], use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != -(-tokens.shape[0] // batch_size):
        raise LowbitError(f"calibration: the first decoder block ({type(first_block).__name__}) was "
                          f"reached {len(captured)} times for {tokens.shape[0]} samples; is it on the "
                          "model's forward path?")
    return captured


def forward_batches(model: nn.Module, tokens: torch.Tensor, batch_size: int, hooks=()) -> None:
    """Run `model` over `tokens` in batches without gradients, for the statistics its forward hooks
    collect; `hooks` (handles) are removed afterwards, whatever happens."""
    try:
        with torch.no_grad():
            for b0 in range(0, tokens.shape[0], batch_size):
                model(input_ids=tokens[b0:b0 + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def block_hidden(out):
    """A decoder block's hidden-state output (blocks that return a tuple give it first)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, x: BlockInput) -> BlockInput:
    """The block's output for one batch, as the next block's input (kwargs carried over)."""
    return BlockInput(block_hidden(block(x.hidden, **x.kwargs)).detach(), x.kwargs)
