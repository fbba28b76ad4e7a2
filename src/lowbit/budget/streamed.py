"""The budget's sensitivity pass on a model that is never held whole (`lowbit quantize --stream
--budget`): the same two passes as sensitivity.py, with one decoder block in memory at a time.

    gradients   forward, block by block: each block's inputs for the gradient windows kept on
                disk (a temporary directory), X_{b+1} = b(X_b) without gradients;
                the head (final norm, lm_head) on X_B: labels sampled from the model's own
                distribution, batch by batch with the same generator as output_grad_sq, the
                summed NLL's gradient dL/dX_B;
                backward, last block first: block b read again, each batch's X_b through it with
                gradients, backward from dL/dX_{b+1}: every linear's output gradient squared and
                summed (as output_grad_sq's tensor hooks do), dL/dX_b kept for block b - 1
    hessians    sensitivity()'s block pass with blocks_io: each block read before its forward,
                released after its candidates are scored

Each linear's sum gets the batches in the order output_grad_sq gives them, so the costs are the
in-memory pass's (tests/test_budget_stream.py). Peak memory: one block with one batch's autograd
graph, two batches' boundary gradients per block step, the embedding and lm_head.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from lowbit.errors import LowbitError


class StreamedBlocks:
    """blocks_io for sensitivity(): block b's tensors read from `files` (streaming.open_source's
    tensor source) into the skeleton `model` when asked, sent back to the meta device after."""

    def __init__(self, model: nn.Module, files, where: str, prefix: str, dtype: torch.dtype = torch.float32):
        self.model, self.files, self.where, self.prefix, self.dtype = model, files, where, prefix, dtype
        self.loaded: int | None = None

    def load(self, b: int, block: nn.Module) -> None:
        from lowbit.streaming import read_block
        if self.loaded == b:
            return
        read_block(self.model, self.files, f"{self.prefix}.{b}", block, self.dtype, self.where)
        block.requires_grad_(False)
        self.loaded = b

    def release(self, b: int, block: nn.Module) -> None:
        block.to("meta")
        self.loaded = None

    def output_grad_sq(self, model: nn.Module, tokens: torch.Tensor, names: list[str], *, batch_size: int = 2,
                       seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
        """sensitivity.output_grad_sq, block by block (module docstring)."""
        from safetensors.torch import load_file, save_file

        from lowbit.arch import get_blocks, get_module, spec_for
        from lowbit.budget.sensitivity import _accumulate, sampled_nll
        from lowbit.calibration.capture import capture_block_inputs, run_block
        from lowbit.calibration.paused import trim_heap
        arch = spec_for(model)
        blocks = get_blocks(model, arch)
        mods = {n: model.get_submodule(n) for n in names}
        acc = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in mods.items()}
        by_block: dict[int, list[str]] = {}
        for n in names:
            idx = n[len(self.prefix) + 1:].partition(".")[0] if n.startswith(self.prefix + ".") else ""
            if not idx.isdigit():
                raise LowbitError(f"sensitivity (streamed): {n} is outside the decoder blocks")
            by_block.setdefault(int(idx), []).append(n)
        gen = torch.Generator().manual_seed(seed)
        with tempfile.TemporaryDirectory(prefix="lowbit-grad-") as tmp:
            spool = Path(tmp)
            with torch.no_grad():
                acts = capture_block_inputs(model, blocks[0], tokens, batch_size)
                kwargs = [a.kwargs for a in acts]
                for b, block in enumerate(blocks):
                    save_file({f"batch.{i}": a.hidden.contiguous() for i, a in enumerate(acts)},
                              str(spool / f"x-{b:04d}.safetensors"))
                    self.load(b, block)
                    acts = [run_block(block, a) for a in acts]
                    self.release(b, block)
                    trim_heap()
            # the head: labels drawn from the model's own distribution, batch by batch
            grads, n_tok = [], 0
            with torch.enable_grad():
                for i, a in enumerate(acts):
                    x = a.hidden.detach().requires_grad_(True)
                    h = x
                    for path in arch.head:
                        mod = get_module(model, path)
                        if mod is not None:
                            h = mod(h)
                    logits = get_module(model, arch.lm_head)(h).float()
                    loss = sampled_nll(logits, gen)
                    loss.backward()
                    grads.append(x.grad)
                    n_tok += int(tokens[i * batch_size:(i + 1) * batch_size].numel())
                    del logits, loss, x, h
            del acts
            # backward, last block first
            for b in range(len(blocks) - 1, -1, -1):
                block = blocks[b]
                xs = load_file(str(spool / f"x-{b:04d}.safetensors"))
                self.load(b, block)
                handles = []
                for n in by_block.get(b, []):
                    def hook(_m, _args, out, _n=n):
                        if out.requires_grad:
                            out.register_hook(lambda g: _accumulate(acc[_n], g))
                    handles.append(mods[n].register_forward_hook(hook))
                try:
                    with torch.enable_grad():
                        for i in range(len(grads)):
                            x = xs[f"batch.{i}"].requires_grad_(True)
                            out = block(x, **kwargs[i])
                            out = out[0] if isinstance(out, (tuple, list)) else out
                            out.backward(grads[i])
                            grads[i] = x.grad
                            del out, x
                finally:
                    for hd in handles:
                        hd.remove()
                self.release(b, block)
                del xs
                trim_heap()
        for n, a in acc.items():
            if not torch.isfinite(a).all():
                raise LowbitError(f"sensitivity: non-finite output gradients at {n}")
        return {n: a / n_tok for n, a in acc.items()}, n_tok


def plan_budget_streaming(source, budget, *, tokens: torch.Tensor, fmt: str = "native", candidates=None,
                          tie: bool | None = None, calibration: dict | None = None, cache: bool = True,
                          dtype: torch.dtype = torch.float32, log=None):
    """api.plan_budget for a checkpoint streamed from disk (streaming.open_source: a safetensors
    directory or a GGUF): the model is a skeleton holding its embedding, final norm and lm_head;
    blocks are read one at a time. The cache is keyed by the source's sha256. -> (Plan, Sensitivity)."""
    from lowbit.budget import load_or_compute, parse_budget, solve
    from lowbit.budget.solver import TIED_FORMATS
    b = parse_budget(budget) if isinstance(budget, str) else budget

    from lowbit.arch import spec_for

    def skip(model, files, key):         # a tied lm_head has no tensor of its own: the embedding, tied
        arch_head = f"{spec_for(model).lm_head}.weight"
        return key == arch_head and bool(getattr(model.config, "tie_word_embeddings", False)) and key not in files
    model, io, src, sha = streamed_skeleton(source, dtype, skip)
    sens = load_or_compute(model, tokens, candidates=list(candidates) if candidates else None, fmt=fmt,
                           cache=cache, source_dir=src, log=log, fingerprint=f"source:{sha}", blocks_io=io)
    plan = solve(sens, b, tie=fmt in TIED_FORMATS if tie is None else tie, calibration=calibration)
    return plan, sens


def streamed_imatrix(source, tokens, dataset: str):
    """The imatrix of `tokens` over the checkpoint `source`, one decoder block read at a time
    (calibration.imatrix.collect_imatrix_streamed): what collect_imatrix gives on the loaded model."""
    from lowbit.calibration.imatrix import collect_imatrix_streamed, imatrix_targets

    def skip(model, _files, key):        # only the embedding: it feeds the blocks; no head (llama-imatrix)
        emb = model.get_input_embeddings()
        return key != next(f"{n}.weight" for n, m in model.named_modules() if m is emb)
    model, io, _, _ = streamed_skeleton(source, torch.float32, skip)
    return collect_imatrix_streamed(model, tokens, imatrix_targets(model), io, dataset=dataset)


def streamed_skeleton(source, dtype: torch.dtype, skip) -> tuple[nn.Module, StreamedBlocks, object, str | None]:
    """The checkpoint `source` (streaming.open_source) as a meta-device skeleton holding the tensors
    outside its decoder blocks that skip(model, files, key) keeps, and the StreamedBlocks that
    read each block into it. -> (model, blocks_io, config dir, source sha256)."""
    from lowbit.arch import spec_for
    from lowbit.export.common import empty_model, tie_by_config
    from lowbit.streaming import open_source, read_outside_blocks
    src, files, sha = open_source(source)
    model = empty_model(src, dtype)
    prefix = spec_for(model).blocks
    read_outside_blocks(model, files, prefix, dtype, str(src), skip=lambda key: skip(model, files, key))
    tie_by_config(model)
    model.eval()
    return model, StreamedBlocks(model, files, str(src), prefix, dtype), src, sha
