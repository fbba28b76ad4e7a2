"""The sequential block-by-block calibration loop that every calibrated method runs through.

    tokens (n, seq) ─ embed ─> X_0 = inputs of block 0       (capture.capture_block_inputs)
    for each block b:
        for each linear group G of b, in execution order     (arch spec: q/k/v | o | gate/up | down)
            every batch of X_b runs through b up to G's input (hooks feed StatSets: "hessian", ...)
            and pauses there                                  (paused.py; or stops and re-runs)
            quantize G's linears with their methods           (methods/*: pure tensor math)
            write the dequantized weights into b              (later groups see quantized inputs)
        the batches resume to the end: X_{b+1} = b(X_b) with  (errors propagate as in GPTQ's
            every weight quantized                            sequential mode, arXiv:2210.17323)
        swap b's linears for QuantLinear modules
    lm_head, when a calibrated rule targets it: the arch spec's head (final norm) on X_B, then as above

Only one block's activations are held: X_b, then X_{b+1}. Statistics are accumulated per shared
input and dropped once their group is quantized. pause_forward=False re-runs the block from its
start for each group (stopping at the group's input) and once more for X_{b+1}: same bytes, ~2.5x
the forward compute, less memory. true_sequential=False takes a block's statistics from one float
pass.

Methods marked `row_separable` (GPTQ: every output row is solved independently given H) quantize
the linears of one group (which share H) as one row-concatenated matrix: one Hessian factorisation
and one column sweep for q/k/v instead of three.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from lowbit.arch import ArchSpec, get_blocks, get_module, is_linear_like, linear_weight, probe_groups, spec_for
from lowbit.calibration.capture import BlockInput, CalibrationConfig, _StopForward, capture_block_inputs, run_block
from lowbit.calibration.paused import run_paused, trim_heap
from lowbit.calibration.stats import StatSet
from lowbit.errors import LowbitError
from lowbit.methods import MethodSpec, get_method
from lowbit.nn.qlinear import make_quant_module, set_submodule
from lowbit.numerics.qweight import QuantizedWeight
from lowbit.numerics.scheme import GGUF_FORMATS
from lowbit.recipe import Recipe, Rule


@dataclass
class Target:
    name: str                 # qualified module name in the model
    module: nn.Module
    rule: Rule
    method: MethodSpec
    config: object
    rel: str = ""             # name relative to its decoder block ("" outside the blocks)
    extra: dict = field(default_factory=dict)   # statistics given from outside (imatrix means)

    @property
    def calibrated(self) -> bool:
        return bool(self.method.needs)

    def key(self) -> tuple:
        """Targets with equal keys (same method, options and scheme) can be solved together."""
        return (self.rule.method, repr(sorted(self.rule.method_args.items())), self.rule.scheme)


@dataclass
class LoopResult:
    layers: list[tuple[str, QuantizedWeight, str]] = field(default_factory=list)  # (name, qw, method)
    timing: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    activation_bytes: int = 0
    transforms: list[dict] = field(default_factory=list)   # one row per (transform, smoothing pair)


def make_targets(triples: list[tuple[str, nn.Module, Rule]]) -> list[Target]:
    """Validate every rule before any work: methods exist, options parse, schemes fit."""
    out = []
    for name, mod, rule in triples:
        spec = get_method(rule.method)
        cfg = spec.make_config(rule.method_args)
        check = getattr(spec.fn, "check_scheme", None)
        if check is not None:
            check(rule.scheme, name)
        out.append(Target(name, mod, rule, spec, cfg))
    return out


def _block_of(name: str, prefix: str) -> tuple[int, str] | None:
    if not name.startswith(prefix + "."):
        return None
    idx, _, rel = name[len(prefix) + 1:].partition(".")
    return (int(idx), rel) if idx.isdigit() and rel else None


def _log_nothing(_msg: str) -> None:
    pass


def quantize_calibrated(model: nn.Module, recipe: Recipe, triples: list[tuple[str, nn.Module, Rule]],
                        tokens: torch.Tensor, cfg: CalibrationConfig,
                        log: Callable[[str], None] | None = None, extra_stats: dict | None = None,
                        checkpoint=None, blocks_io=None) -> LoopResult:
    """Quantize `triples` (name, module, rule) of `model` in place, block by block.
    extra_stats: name -> statistics given from outside (an imatrix file's means), merged into
    what calibration collects for that module. checkpoint: a calibration.resume.Checkpoint that
    saves the state after each block and resumes from it. blocks_io (streaming.calibrated): an
    object whose load(b, block) fills block b's weights just before it is worked on and whose
    release(b, block) drops them once it is done (after the checkpoint), so that only one block
    of the model is ever in memory."""
    log = log or _log_nothing
    targets = make_targets(triples)
    for t in targets:
        t.extra = dict((extra_stats or {}).get(t.name, {}))
    arch = spec_for(model)                     # errors here for a model with no block list
    blocks = get_blocks(model, arch)
    per_block: dict[int, dict[str, Target]] = {}
    outside: list[Target] = []
    for t in targets:
        where = _block_of(t.name, arch.blocks)
        if where is None:
            outside.append(t)
        else:
            t.rel = where[1]
            per_block.setdefault(where[0], {})[where[1]] = t
    for t in outside:
        if not t.calibrated:
            continue
        if isinstance(t.module, nn.Embedding):
            raise LowbitError(f"{t.name}: an embedding has no input activations; method "
                              f"{t.rule.method!r} needs calibration. Use a data-free method (rtn) for it.")
        if t.name != arch.lm_head or not arch.head:
            raise LowbitError(f"{t.name}: outside the decoder blocks of architecture {arch.name!r} and "
                              f"not its known lm_head with a head path; method {t.rule.method!r} needs "
                              "calibration inputs there. Use a data-free method for it or extend the ArchSpec.")

    transforms = _make_transforms(recipe)
    res = LoopResult()
    t_all = time.perf_counter()
    with torch.no_grad():
        # data-free layers outside the blocks first (a quantized embedding feeds the calibration)
        for t in outside:
            if not t.calibrated:
                res.layers.append(_apply(model, t, _solve([t], None)[0]))
        t0 = time.perf_counter()
        acts = capture_block_inputs(model, blocks[0], tokens, cfg.batch_size)
        res.timing["capture_s"] = time.perf_counter() - t0
        res.activation_bytes = sum(a.nbytes for a in acts)
        groups = arch.groups
        if arch.discovered or any(rel not in arch.linears for bt in per_block.values() for rel in bt):
            if blocks_io is not None:
                blocks_io.load(0, blocks[0])
            groups = probe_groups(blocks[0], lambda: run_block(blocks[0], acts[0]))
            res.notes.append(f"linear groups discovered by probing block 0: {[list(g) for g in groups]}")
        covered = {rel for g in groups for rel in g}
        for b, bt in sorted(per_block.items()):
            if set(bt) - covered:
                raise LowbitError(f"block {b}: targeted linears {sorted(set(bt) - covered)} are not on the "
                                  f"block's forward path (groups: {[list(g) for g in groups]})")
        res.timing.update(stats_s=0.0, solve_s=0.0, forward_s=0.0)
        head_targets = [t for t in outside if t.calibrated]
        if blocks_io is not None and hasattr(blocks_io, "inputs_captured"):
            blocks_io.inputs_captured(bool(head_targets))    # streaming: the embedding may go
        # blocks after the last targeted one only matter when lm_head needs their outputs
        last = len(blocks) - 1 if head_targets else max(per_block, default=-1)
        # block-level methods (signround, vq with block_steps) also carry the float model's block
        # inputs (the same tensors at block 0; separate objects, so a resume can restore each)
        fp_acts = [BlockInput(a.hidden, a.kwargs) for a in acts] if any(_block_level(t) for t in targets) else None
        start = 0
        if checkpoint is not None:
            start, acts = checkpoint.restore(model, acts, res, _swap, fp_acts=fp_acts)
            if start:
                log(f"resuming after block {start}/{last + 1} ({checkpoint.path})")
        for b, block in enumerate(blocks):
            if b > last:
                break
            if b < start:
                continue
            tb = time.perf_counter()
            if blocks_io is not None:
                blocks_io.load(b, block)
            bt = per_block.get(b, {})
            plan = [[bt[rel] for rel in g if rel in bt] for g in groups]
            plan = [p for p in plan if p]
            done: list[tuple[str, QuantizedWeight, str]] = []
            if transforms and bt:                  # equivalent rewrites of the float block first
                res.transforms += _transform_block(model, arch, block, bt, acts, transforms)
            if fp_acts is not None:            # block-level methods: float targets, float inputs kept
                refine = _BlockRefine(block, bt, acts, fp_acts, res.timing)
            if cfg.true_sequential and cfg.pause_forward:
                acts = _quantize_paused(block, plan, acts, res.timing, done)
            else:
                if cfg.true_sequential:
                    for p in plan:
                        done += _quantize_groups(block, [p], acts, res.timing, stop_early=True)
                elif plan:
                    done += _quantize_groups(block, plan, acts, res.timing, stop_early=False)
                t0 = time.perf_counter()
                for i, a in enumerate(acts):       # replace batch by batch: one block of activations
                    acts[i] = run_block(block, a)
                res.timing["forward_s"] += time.perf_counter() - t0
            if fp_acts is not None:
                acts, fp_acts = refine.finish(done, acts, log)
            for name, qw, method in done:
                res.layers.append(_swap(model, f"{arch.blocks}.{b}.{name}", qw, method))
                _note_numerics(f"{arch.blocks}.{b}.{name}", qw, res.notes, log)
            if checkpoint is not None:
                checkpoint.save(b, res, acts, fp_acts)
            if blocks_io is not None:
                blocks_io.release(b, block)
            trim_heap()                            # the block's temporaries and float weights
            loss = sum(qw.info.get("loss", 0.0) for _, qw, _ in done)
            log(f"block {b + 1}/{last + 1}: {len(done)} layer(s), {time.perf_counter() - tb:.1f} s"
                + (f", loss {loss:.4g}" if loss else ""))
        if head_targets:
            for path in arch.head:
                mod = get_module(model, path)
                if mod is not None:
                    acts = [BlockInput(mod(a.hidden), a.kwargs) for a in acts]
            stats = _stats_from(head_targets, acts)
            for t, qw in zip(head_targets, _solve(head_targets, stats)):
                res.layers.append(_swap(model, t.name, qw, t.rule.method))
                _note_numerics(t.name, qw, res.notes, log)
            log(f"{arch.lm_head}: quantized")
    res.timing["total_s"] = time.perf_counter() - t_all
    if res.transforms:
        from lowbit.transforms.block import summarize
        res.notes += summarize(res.transforms)
    return res


def _make_transforms(recipe: Recipe) -> list:
    if not getattr(recipe, "transforms", None):
        return []
    from lowbit.transforms.block import make_transforms
    return make_transforms(recipe.transforms)


def _transform_block(model, arch, block, bt: dict[str, Target], acts, transforms) -> list[dict]:
    from lowbit.transforms.block import transform_model_block
    return transform_model_block(model, arch, block, {rel: t.rule.scheme for rel, t in bt.items()},
                                 acts, transforms)


def _block_level(t: Target) -> bool:
    """Whether a target's method tunes whole blocks (signround; vq with block_steps): the
    method's `block_level` attribute, a bool or a function of the target's config."""
    bl = getattr(t.method.fn, "block_level", False)
    return bool(bl(t.config)) if callable(bl) else bool(bl)


class _BlockRefine:
    """The block-level hook (calibration/blockwise.py, methods marked `block_level` such as
    signround): before a block is quantized, its float outputs on the float model's inputs (the
    target) and its targets' float weights are kept; once the loop has quantized its groups
    (the starting point), the block's rounding is tuned and its outputs recomputed."""

    def __init__(self, block: nn.Module, bt: dict[str, Target], acts: list[BlockInput],
                 fp_acts: list[BlockInput], timing: dict):
        t0 = time.perf_counter()
        self.block, self.timing, self.inputs = block, timing, list(acts)
        self.targets = {rel: t for rel, t in bt.items() if _block_level(t)}
        self.floats = {rel: linear_weight(t.module).detach().clone() for rel, t in self.targets.items()}
        self.fp_out = [run_block(block, a) for a in fp_acts]
        timing["forward_s"] = timing.get("forward_s", 0.0) + time.perf_counter() - t0

    def finish(self, done: list, acts: list[BlockInput], log) -> tuple[list[BlockInput], list[BlockInput]]:
        from lowbit.calibration.blockwise import refine_block
        idx = [i for i, (rel, _, _) in enumerate(done) if rel in self.targets]
        if not idx:
            return acts, self.fp_out
        t0 = time.perf_counter()
        tuned = [(done[i][0], self.floats[done[i][0]], done[i][1], self.targets[done[i][0]].config) for i in idx]
        refine = getattr(self.targets[done[idx[0]][0]].method.fn, "refine_block", refine_block)
        qws, info = refine(self.block, tuned, self.inputs, [y.hidden for y in self.fp_out])
        for i, qw in zip(idx, qws):
            _write_dequantized(self.targets[done[i][0]].module, qw)
            done[i] = (done[i][0], qw, done[i][2])
        self.timing["refine_s"] = self.timing.get("refine_s", 0.0) + time.perf_counter() - t0
        if "vq_block_loss_init" in info:
            log(f"vq: block loss {info['vq_block_loss_init']:.4g} -> {info['vq_block_loss_best']:.4g} "
                f"({info['vq_block_s']:.1f} s)")
        else:
            log(f"signround: block loss {info['signround_loss_init']:.4g} -> {info['signround_loss_best']:.4g} "
                f"({info['signround_s']:.1f} s)")
        t0 = time.perf_counter()
        acts = [run_block(self.block, a) for a in self.inputs]
        self.timing["forward_s"] += time.perf_counter() - t0
        return acts, self.fp_out


def _note_numerics(name: str, qw: QuantizedWeight, notes: list[str], log: Callable[[str], None]) -> None:
    """Say so when a layer needed more damping or had inputs calibration never activated."""
    if qw.info.get("damp_retries"):
        notes.append(f"{name}: Cholesky failed at the requested damping; retried "
                     f"{qw.info['damp_retries']}x, succeeded with damp_percent={qw.info['damp_percent']:g}")
        log(notes[-1])
    if qw.info.get("n_dead_inputs"):
        notes.append(f"{name}: {qw.info['n_dead_inputs']} input column(s) were zero on every calibration "
                     "token; their weights were set to 0")
        log(notes[-1])


def _label(group: list[Target]) -> str:
    return ", ".join(t.name for t in group)


def _stats_from(group: list[Target], acts: list[BlockInput]) -> dict | None:
    needs = set().union(*(t.method.needs for t in group))
    if not needs:
        return None
    ss = StatSet(needs, linear_weight(group[0].module).shape[1], label=_label(group))
    for a in acts:
        ss.update(a.hidden)
    return ss.results()


def _quantize_paused(block: nn.Module, plan: list[list[Target]], acts: list[BlockInput], timing: dict,
                     done: list) -> list[BlockInput]:
    """True-sequential groups in one block forward (calibration/paused.py). Data-free groups are
    quantized first (they need no inputs); returns the block's outputs, all groups quantized."""
    calibrated = []
    for group in plan:
        if any(t.method.needs for t in group):
            calibrated.append(group)
        else:
            for t, qw in zip(group, _solve(group, None)):
                _write_dequantized(t.module, qw)
                done.append((t.rel, qw, t.rule.method))
    sets = [StatSet(set().union(*(t.method.needs for t in g)), linear_weight(g[0].module).shape[1], label=_label(g))
            for g in calibrated]
    t_stats = [0.0]
    t_solve = [0.0]

    def feed(k: int, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        sets[k].update(x)
        t_stats[0] += time.perf_counter() - t0

    def quantize_group(k: int) -> None:
        t0 = time.perf_counter()
        group = calibrated[k]
        stats = sets[k].results()
        sets[k] = None                       # free the statistics as soon as they are used
        for t, qw in zip(group, _solve(group, stats)):
            _write_dequantized(t.module, qw)
            done.append((t.rel, qw, t.rule.method))
        t_solve[0] += time.perf_counter() - t0

    t0 = time.perf_counter()
    out = run_paused(block, acts, [[t.module for t in g] for g in calibrated], feed, quantize_group)
    timing["stats_s"] += t_stats[0]
    timing["solve_s"] += t_solve[0]
    timing["forward_s"] += time.perf_counter() - t0 - t_stats[0] - t_solve[0]
    return out


def _quantize_groups(block: nn.Module, plan: list[list[Target]], acts: list[BlockInput], timing: dict,
                     stop_early: bool) -> list[tuple[str, QuantizedWeight, str]]:
    """Collect the statistics of the groups in `plan` in one pass over `acts`, then quantize them.
    Names in the result are relative to the block."""
    t0 = time.perf_counter()
    sets: list[StatSet | None] = []
    handles = []
    seen: set[int] = set()
    wanted = set()
    for k, group in enumerate(plan):
        needs = set().union(*(t.method.needs for t in group))
        sets.append(StatSet(needs, linear_weight(group[0].module).shape[1], label=_label(group)) if needs else None)
        if not needs:
            continue
        wanted.add(k)

        def hook(_m, args, _k=k):
            if _k in seen:
                return                        # a group mate already fed this shared input
            seen.add(_k)
            sets[_k].update(args[0])
            if stop_early and seen >= wanted:
                raise _StopForward
        for t in group:
            handles.append(t.module.register_forward_pre_hook(hook))
    try:
        if wanted:
            for a in acts:
                seen.clear()
                try:
                    block(a.hidden, **a.kwargs)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    timing["stats_s"] += time.perf_counter() - t0
    out = []
    for group, ss in zip(plan, sets):
        stats = ss.results() if ss is not None else None
        t0 = time.perf_counter()
        qws = _solve(group, stats)
        timing["solve_s"] += time.perf_counter() - t0
        for t, qw in zip(group, qws):
            _write_dequantized(t.module, qw)
            out.append((t.rel, qw, t.rule.method))
    return out


def _solve(group: list[Target], stats: dict | None) -> list[QuantizedWeight]:
    """Quantize the targets of one shared-input group; row-separable methods with equal settings
    are solved as one row-concatenated matrix."""
    out: dict[int, QuantizedWeight] = {}
    by_key: dict[tuple, list[int]] = {}
    for i, t in enumerate(group):
        by_key.setdefault(t.key(), []).append(i)
    for idx in by_key.values():
        t0 = group[idx[0]]
        fuse = (len(idx) > 1 and getattr(t0.method.fn, "row_separable", False)
                and t0.rule.scheme.granularity in ("channel", "group")
                and t0.rule.scheme.format not in GGUF_FORMATS)   # ggml blocks: one matrix each
        chunks = [idx] if fuse else [[i] for i in idx]
        for chunk in chunks:
            ws = [(linear_weight(group[i].module) if is_linear_like(group[i].module)
                   else group[i].module.weight).detach().float() for i in chunk]
            W = torch.cat(ws, 0) if len(ws) > 1 else ws[0]
            name = "+".join(group[i].name for i in chunk)
            st = stats
            if len(chunk) == 1 and getattr(group[chunk[0]], "extra", None):
                st = {**(stats or {}), **group[chunk[0]].extra}
            try:
                qw = t0.method.fn(W, t0.rule.scheme, t0.config, st)
            except LowbitError as e:
                raise LowbitError(f"{name}: {e}") from None
            rows = [w.shape[0] for w in ws]
            for i, part in zip(chunk, _split_rows(qw, rows)):
                out[i] = part
    return [out[i] for i in range(len(group))]


def _split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    info = {k: v for k, v in qw.info.items() if k != "loss_per_row"}
    per_row = qw.info.get("loss_per_row")
    if not isinstance(qw, QuantizedWeight):   # a GGMLWeight (never fused): drop the per-row tensor
        qw.info = info
        return [qw]
    if len(rows) == 1:
        return [QuantizedWeight(qw.qdata, qw.scale, qw.zero_point, qw.scheme, qw.g_idx, info)]
    parts, r0 = [], 0
    for r in rows:
        sl = slice(r0, r0 + r)
        inf = dict(info)
        if per_row is not None:
            inf["loss"] = float(per_row[sl].double().sum())
        parts.append(QuantizedWeight(qw.qdata[sl].contiguous(), qw.scale[sl].contiguous(),
                                     None if qw.zero_point is None else qw.zero_point[sl].contiguous(),
                                     qw.scheme, None if qw.g_idx is None else qw.g_idx.clone(), inf))
        r0 += r
    return parts


def _write_dequantized(mod: nn.Module, qw: QuantizedWeight) -> None:
    """Give the float module its quantized values until the block ends (then it becomes a
    QuantLinear). A new tensor, not an in-place copy: the loaded weights are often a copy-on-write
    memory map of the checkpoint, and writing into them would duplicate every page (measured:
    +425 MiB of RSS over a whole SmolLM2 run)."""
    w = qw.dequantize(mod.weight.dtype)
    w = w if isinstance(mod, nn.Linear) else w.t().contiguous()
    mod.weight = nn.Parameter(w, requires_grad=False)


def _apply(model: nn.Module, t: Target, qw: QuantizedWeight) -> tuple[str, QuantizedWeight, str]:
    if isinstance(t.module, nn.Embedding):   # a lookup table: stored quantized, served dequantized
        t.module.weight.data = qw.dequantize(t.module.weight.dtype)
        return (t.name, qw, t.rule.method)
    return _swap(model, t.name, qw, t.rule.method)


def _swap(model: nn.Module, name: str, qw: QuantizedWeight, method: str) -> tuple[str, QuantizedWeight, str]:
    mod = model.get_submodule(name)
    if not is_linear_like(mod):
        raise LowbitError(f"{name}: expected a linear module to replace, found {type(mod).__name__}")
    set_submodule(model, name, make_quant_module(qw, getattr(mod, "bias", None)))
    # The float module is out of the model but still referenced by its Target until the run ends:
    # drop its weight (by then a dequantized copy, see _write_dequantized) so finished blocks do
    # not keep 4 bytes per weight alive (measured: ~0.4 GiB on SmolLM2 at the end of a run).
    mod.weight = None
    return (name, qw, method)
