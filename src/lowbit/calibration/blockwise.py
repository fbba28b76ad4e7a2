"""Block-level refinement for methods marked `block_level` (methods/signround.py): after the
sequential loop has given every linear of a block its starting point, train their rounding on
the block's output error, one block in memory.

    inputs   X_q  (the quantized model's inputs of this block, as the loop holds them)
    target   Y_fp = block_float(X_fp)   (X_fp: the float model's inputs, carried beside X_q)
    step t   W_hat = fake_quant(W; V, a, dz) for every tuned linear (torch.func.functional_call,
             the module's own weights untouched), loss = mean((block_{W_hat}(X_q[b]) - Y_fp[b])^2)
             on batch b = t mod n_batches, backward, signed step; the lowest-loss step is kept

Only the rounding parameters get gradients (the block's other weights, norms, and the inputs
are constants), so memory is one batch's activations and their autograd graph.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch.func import functional_call

from lowbit.calibration.capture import BlockInput
from lowbit.methods.signround import RoundingParams
from lowbit.numerics.qweight import QuantizedWeight


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _batches(inputs: list[BlockInput], targets: list[torch.Tensor], size: int):
    """(input, target) pairs of `size` windows (0: the loop's batches as they are)."""
    if size <= 0:
        return list(zip(inputs, targets))
    out = []
    for a, y in zip(inputs, targets):
        n = a.hidden.shape[0]
        for i in range(0, n, size):
            kw = {k: (v[i:i + size] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n and n > 1
                      else v) for k, v in a.kwargs.items()}
            out.append((BlockInput(a.hidden[i:i + size], kw), y[i:i + size]))
    return out


def refine_block(block: nn.Module, tuned: list[tuple[str, torch.Tensor, QuantizedWeight, object]],
                 inputs: list[BlockInput], targets: list[torch.Tensor]) -> tuple[list[QuantizedWeight], dict]:
    """tuned: (name relative to the block, float weight (out, in), starting QuantizedWeight,
    SignRoundConfig) per linear. Returns the tuned QuantizedWeights (same order) and figures."""
    cfg = tuned[0][3]
    params = {name: RoundingParams(w, qw, c) for name, w, qw, c in tuned}
    pairs = _batches(inputs, targets, cfg.batch_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        first = [float(torch.mean((_out(block(a.hidden, **a.kwargs)) - y) ** 2)) for a, y in pairs]
    best, losses = float("inf"), []
    lr0 = cfg.step_lr
    with torch.enable_grad():
        for t in range(cfg.iters):
            a, y = pairs[t % len(pairs)]
            weights = {f"{n}.weight": p.fake_quant() for n, p in params.items()}
            loss = torch.mean((_out(functional_call(block, weights, (a.hidden,), a.kwargs)) - y) ** 2)
            loss.backward()
            lv = float(loss.detach())
            losses.append(lv)
            if lv < best:            # the parameters that gave this loss, before the step
                best = lv
                for p in params.values():
                    p.keep()
            lr = lr0 * (1 - t / cfg.iters)
            for p in params.values():
                p.step(lr)
    init = sum(first) / len(first)
    improved = bool(losses) and best < min(first)
    info = {"signround_iters": cfg.iters, "signround_loss_init": init,
            "signround_loss_best": best if improved else init, "signround_kept_init": not improved,
            "signround_s": time.perf_counter() - t0}
    kept = _untimed(info)    # a layer's info goes into the file: same inputs, same bytes
    if not improved:         # never worse than the starting point on the calibration batches
        return [QuantizedWeight(qw.qdata, qw.scale, qw.zero_point, qw.scheme, qw.g_idx, qw.info | kept)
                for _, _, qw, _ in tuned], info
    return [params[n].result(qw.info | kept) for n, _, qw, _ in tuned], info


def _untimed(info: dict) -> dict:
    """The figures without their wall times (`*_s`), which differ from run to run."""
    return {k: v for k, v in info.items() if not k.endswith("_s")}


def refine_block_vq(block: nn.Module, tuned: list, inputs: list[BlockInput],
                    targets: list[torch.Tensor]) -> tuple[list, dict]:
    """Vector codebooks (methods/vq.py, option block_steps): with every index fixed, the block's
    codebooks and scales are tuned together by Adam on the block's output error (the same loss
    as SignRound's), rounded to fp16 after; the lowest-loss step is kept, and the starting point
    when no step beats it. tuned: (name, float weight, VQWeight, VQConfig) per linear."""
    from lowbit.numerics.vq import VQWeight, decode
    cfg = tuned[0][3]
    pairs = _batches(inputs, targets, cfg.block_batch)
    t0 = time.perf_counter()
    geo = {name: (vw.flat_indices(), vw.group_size, vw.shape[1]) for name, _, vw, _ in tuned}
    cbs = {n: vw.codebook.clone().requires_grad_(True) for n, _, vw, _ in tuned}
    # scales tuned relative to their start (s = s0 (1 + u)), so one rate suits every layer
    s0 = {n: vw.scale.clone() for n, _, vw, _ in tuned}
    us = {n: torch.zeros_like(vw.scale, requires_grad=True) for n, _, vw, _ in tuned}

    def scales(u: dict) -> dict:
        return {n: s0[n] * (1 + u[n]) for n in u}

    def weights(cb: dict, sc: dict) -> dict:
        return {f"{n}.weight": decode(cb[n], idx, sc[n], g, cols) for n, (idx, g, cols) in geo.items()}

    def loss_on(w: dict, a: BlockInput, y: torch.Tensor) -> torch.Tensor:
        return torch.mean((_out(functional_call(block, w, (a.hidden,), a.kwargs)) - y) ** 2)

    with torch.no_grad():
        w0 = weights(cbs, s0)
        first = [float(loss_on(w0, a, y)) for a, y in pairs]
    opt = torch.optim.Adam(list(cbs.values()) + list(us.values()), lr=cfg.block_lr)
    best, keep = float("inf"), None
    with torch.enable_grad():
        for t in range(cfg.block_steps):
            a, y = pairs[t % len(pairs)]
            opt.zero_grad()
            loss = loss_on(weights(cbs, scales(us)), a, y)
            loss.backward()
            lv = float(loss.detach())
            if lv < best:            # the parameters that gave this loss, before the step
                best = lv
                keep = ({n: c.detach().clone() for n, c in cbs.items()},
                        {n: c.detach().clone() for n, c in scales(us).items()})
            opt.step()
    init = sum(first) / len(first)
    info = {"vq_block_steps": cfg.block_steps, "vq_block_loss_init": init, "vq_block_loss_best": init,
            "vq_block_kept_init": True}
    out = [vw for _, _, vw, _ in tuned]
    if keep is not None and best < min(first):
        cand_cb = {n: c.to(torch.float16).float() for n, c in keep[0].items()}
        cand_sc = {n: s.clamp_min(2.0 ** -24).to(torch.float16).float() for n, s in keep[1].items()}
        ok = all(bool(torch.isfinite(c).all()) for c in list(cand_cb.values()) + list(cand_sc.values()))
        with torch.no_grad():
            after = [float(loss_on(weights(cand_cb, cand_sc), a, y)) for a, y in pairs] if ok else []
        if ok and sum(after) < sum(first):      # judged after the fp16 rounding the file holds
            info.update(vq_block_loss_best=sum(after) / len(after), vq_block_kept_init=False)
            out = [VQWeight(cand_cb[n], vw.indices, cand_sc[n], vw.shape, vw.group_size, vw.info)
                   for n, _, vw, _ in tuned]
    for vw in out:
        vw.info = {**vw.info, **info}
    info["vq_block_s"] = time.perf_counter() - t0
    return out, info
