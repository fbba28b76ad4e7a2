"""True-sequential statistics in one block forward: every batch's forward pauses at each group.

GPTQ's true-sequential mode needs the input of linear group k computed with groups 0..k-1
already quantized. Re-running the block from its start for every group costs ~2.5 block forwards
on a Llama block (q/k/v | o | gate/up | down). Instead, each batch's block forward runs as a
coroutine, and a forward pre-hook on group k's linears feeds that batch's input to the group's
statistics and *pauses* the forward there:

    batch 0:  norm ─ [pause @ qkv] ─ q,k,v ─ attn ─ [pause @ o] ─ o ─ ... ─ [pause @ down] ─ down ─ out
    batch 1:  norm ─ [pause @ qkv] ─ ...
    scheduler: run every batch to its qkv pause -> quantize q,k,v -> run every batch to its o pause
               -> quantize o -> ... -> run every batch to the end -> next block's inputs

When a batch resumes, group k's linears already hold their quantized weights, so what reaches
group k+1 is exactly what the quantized block computes. Cost: one block forward plus the
statistics; memory: each batch's intermediate activations are held while it is paused (about
3-5x the block's input activations on a Llama block).

The coroutines are threads, but never two at once: the scheduler hands the single turn to one
batch at a time, in batch order, and waits for it to pause, so statistics are summed in the same
order on every run (same bytes out) and no two forwards compete for the cores.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

import torch
import torch.nn as nn

from lowbit.calibration.capture import BlockInput, _StopForward, run_block
from lowbit.errors import LowbitError

DONE = -1


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Each coroutine thread allocates from its own malloc arena, and an arena keeps what its thread
    freed: without trimming, every paused batch's transient attention / MLP buffers stay resident
    and the process's RSS grows by their sum (measured +400-600 MiB on SmolLM2 at 2 batches).
    Trimming while every batch is paused returns them."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_ARENA_MAX = -8   # glibc mallopt parameter


def _set_arena_max(n: int) -> bool:
    """glibc's mallopt(M_ARENA_MAX, n), n > 0; False where there is no glibc."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError):
        return False


class _BatchForward(threading.Thread):
    """One batch's block forward, run in turns handed out by `step()`."""

    def __init__(self, block: nn.Module, x: BlockInput):
        super().__init__(daemon=True)
        self.block, self.x = block, x
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self.at: int | None = None          # group index where it is paused, DONE at the end
        self.fed: set[int] = set()
        self.result: BlockInput | None = None
        self.error: BaseException | None = None
        self.abort = False

    def run(self) -> None:
        self._go.acquire()
        if self.abort:                      # cancelled before its first turn
            self.at = DONE
            self._back.release()
            return
        try:
            with torch.no_grad():           # grad mode is per thread
                self.result = run_block(self.block, self.x)
            self.at = DONE
        except _StopForward:
            self.at = DONE
        except BaseException as e:          # handed to the scheduler's thread
            self.error = e
        finally:
            self._back.release()

    def pause(self, group: int) -> None:
        """Called from a hook, in this thread: give the turn back and wait for the next one."""
        self.at = group
        self._back.release()
        self._go.acquire()
        if self.abort:
            raise _StopForward

    def step(self) -> None:
        """Scheduler side: let this batch run until it pauses or ends."""
        self._go.release()
        self._back.acquire()
        if self.error is not None:
            raise self.error


def run_paused(block: nn.Module, acts: list[BlockInput], groups: list[list[nn.Module]],
               feed: Callable[[int, torch.Tensor], None], quantize_group: Callable[[int], None]
               ) -> list[BlockInput]:
    """Run `block` on every batch, pausing at each group's input.

    groups[k]: the linears of group k (they share one input); feed(k, x): add batch input x to
    group k's statistics; quantize_group(k): called once every batch is paused at group k (and
    before any of them runs group k's linears). Returns the block's outputs per batch.
    """
    workers = [_BatchForward(block, a) for a in acts]
    by_thread: dict[int, _BatchForward] = {}
    handles = []

    def make_hook(k: int):
        def hook(_mod, args):
            w = by_thread.get(threading.get_ident())
            if w is None or k in w.fed:
                return                      # not a paused run, or a group mate already paused
            w.fed.add(k)
            feed(k, args[0])
            w.pause(k)
        return hook

    for k, mods in enumerate(groups):
        for m in mods:
            handles.append(m.register_forward_pre_hook(make_hook(k)))
    # The batch threads share the main malloc arena while they exist: with an arena per
    # thread, each keeps the block-forward buffers it freed (measured on SmolLM2, 16 batches:
    # +0.4-0.5 GiB peak RSS). They run one at a time, so the shared arena's lock is free.
    shared_arena = _set_arena_max(1)
    try:
        for w in workers:
            w.start()
            by_thread[w.ident] = w
        for k in range(len(groups)):
            for i, w in enumerate(workers):
                w.step()
                if w.at != k:
                    raise LowbitError(f"calibration: batch {i} reached linear group {w.at} where group {k} "
                                      "was expected; the block does not call its linears in the order "
                                      "of the architecture spec (or skips some)")
            quantize_group(k)
            trim_heap()
        for w in workers:
            w.step()
            if w.at != DONE:
                raise LowbitError(f"calibration: batch paused at group {w.at} after the last group")
        trim_heap()
        return [w.result for w in workers]
    except BaseException:
        for w in workers:                   # unwind paused forwards so their threads end
            if w.is_alive() and w.at not in (None, DONE):
                w.abort = True
                w._go.release()
        raise
    finally:
        for h in handles:
            h.remove()
        for w in workers:
            if w.ident is not None and w.at is None:   # never got a turn: let it end
                w.abort = True
                w._go.release()
            if w.ident is not None:
                w.join()
        if shared_arena:   # back to glibc's default limit (8 per core on 64-bit; mallopt refuses 0)
            _set_arena_max(8 * (os.cpu_count() or 1))
