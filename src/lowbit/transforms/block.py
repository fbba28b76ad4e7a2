"""Apply the recipe's equivalent transforms to one float decoder block, before its groups are quantized.

    for each transform of the recipe (recipe.transforms, in order):
        one float pass of the block over the calibration batches: the statistics the transform
            needs, per smoothing pair, at the pair's consumer input (arch spec's smooth_pairs)
        per pair: the scale s (smooth.py / awq.py), folded into producer and consumers (fold.py)
        awq: then each quantized consumer's clipping search (on the input Hessian seen through s)

Why per block and not per group: in true-sequential order the producers of v -> o and up -> down
(v_proj, up_proj) are quantized before their consumers' inputs exist, so the scales of a block
are searched on the float block, as the reference AWQ and SmoothQuant code do; the block's groups
are then quantized (and their GPTQ statistics collected) on the transformed block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lowbit.calibration.capture import BlockInput
from lowbit.calibration.stats import StatSet
from lowbit.errors import LowbitError
from lowbit.numerics.scheme import Scheme
from lowbit.transforms.awq import AWQConfig, awq_clip, awq_scales
from lowbit.transforms.fold import expand_heads, fold_scales, n_rep_of, producer_channels, reduce_heads
from lowbit.transforms.smooth import SmoothQuantConfig, smooth_scales

# name -> (config class, statistics at each pair's consumer input)
TRANSFORMS: dict[str, tuple[type, tuple[str, ...]]] = {
    "smoothquant": (SmoothQuantConfig, ("act_abs_max",)),
    "awq": (AWQConfig, ("act_abs_mean", "hessian")),
}


@dataclass
class Pair:
    producer_name: str
    consumer_names: tuple[str, ...]
    producer: nn.Module
    consumers: list[nn.Module]
    n_rep: int

    @property
    def label(self) -> str:
        return f"{self.producer_name} -> {', '.join(self.consumer_names)}"


def make_transforms(specs: list[dict]) -> list[tuple[str, object]]:
    """Validate recipe.transforms' block-level entries ([{"name": "awq", **options}, ...]) before any work."""
    from lowbit.transforms import _registry, transform_config, unknown_transform
    model_level = set(_registry())
    out = []
    for spec in specs:
        name = spec.get("name")
        if name in model_level:               # applied to the whole model by api.quantize
            continue
        if name not in TRANSFORMS:
            raise unknown_transform(name)
        out.append((name, transform_config(spec, TRANSFORMS[name][0])))
    return out


def block_pairs(block: nn.Module, smooth_pairs, which: str) -> list[Pair]:
    pairs = []
    for prod_name, cons_names in smooth_pairs:
        try:
            prod = block.get_submodule(prod_name)
            cons = [block.get_submodule(c) for c in cons_names]
        except AttributeError:
            continue                                    # an optional module this model lacks
        if which == "norms" and isinstance(prod, nn.Linear):
            continue
        if not all(isinstance(c, nn.Linear) for c in cons):
            continue                                    # already quantized, or not a plain linear
        n_rep = n_rep_of(producer_channels(prod), cons[0].in_features, f"{prod_name} -> {cons_names}")
        pairs.append(Pair(prod_name, tuple(cons_names), prod, cons, n_rep))
    return pairs


def _collect(block: nn.Module, pairs: list[Pair], needs: tuple[str, ...], acts: list[BlockInput]) -> list[dict]:
    """One float pass of the block: the statistics at each pair's consumer input."""
    sets = [StatSet(needs, p.consumers[0].in_features, label=p.label) for p in pairs]
    handles = [p.consumers[0].register_forward_pre_hook(lambda _m, args, _s=ss: _s.update(args[0]))
               for p, ss in zip(pairs, sets)]
    try:
        for a in acts:
            block(a.hidden, **a.kwargs)
    finally:
        for h in handles:
            h.remove()
    return [ss.results() for ss in sets]


def transform_block(block: nn.Module, smooth_pairs, acts: list[BlockInput], schemes: dict[str, Scheme | None],
                    transforms: list[tuple[str, object]], *, head_dim: int = 1,
                    norm_offset: float = 0.0) -> list[dict]:
    """Apply `transforms` to `block` in place. schemes: block-relative linear name -> its weight
    scheme (None or absent: not quantized). Returns one info row per (transform, pair)."""
    rows = []
    with torch.no_grad():
        for name, cfg in transforms:
            pairs = [p for p in block_pairs(block, smooth_pairs, cfg.pairs)
                     if any(schemes.get(c) is not None for c in p.consumer_names)]
            if not pairs:
                continue
            stats = _collect(block, pairs, TRANSFORMS[name][1], acts)
            for p, st in zip(pairs, stats):
                row = {"transform": name, "pair": p.label}
                rows.append(row)
                if name == "smoothquant":
                    w_max = torch.stack([c.weight.detach().abs().amax(0) for c in p.consumers]).amax(0)
                    s = smooth_scales(reduce_heads(st["act_abs_max"], p.n_rep, head_dim, "max"),
                                      reduce_heads(w_max, p.n_rep, head_dim, "max"), cfg.alpha)
                    fold_scales(p.producer, p.consumers, s, n_rep=p.n_rep, head_dim=head_dim,
                                norm_offset=norm_offset)
                    continue
                quantized = [(c, schemes[n]) for c, n in zip(p.consumers, p.consumer_names)
                             if schemes.get(n) is not None]

                def expand(v, _n=p.n_rep):
                    return expand_heads(v, _n, head_dim)
                s, info = awq_scales([c.weight.detach() for c, _ in quantized], [sc for _, sc in quantized],
                                     reduce_heads(st["act_abs_mean"], p.n_rep, head_dim, "mean"),
                                     st["hessian"], cfg, expand)
                row.update(info)
                fold_scales(p.producer, p.consumers, s, n_rep=p.n_rep, head_dim=head_dim, norm_offset=norm_offset)
                if cfg.clip:
                    full = expand(s.double())
                    H = (st["hessian"] / full[:, None] / full[None, :]).float()   # the input is now x / s
                    ratios = []
                    for c, sc in quantized:
                        w, ci = awq_clip(c.weight.detach(), H, sc, cfg)
                        c.weight = nn.Parameter(w.to(c.weight.dtype), requires_grad=False)
                        ratios.append(ci["clip_ratio_mean"])
                    row["clip_ratio_mean"] = sum(ratios) / len(ratios)
    return rows


def transform_model_block(model: nn.Module, arch, block: nn.Module, schemes: dict[str, Scheme | None],
                          acts: list[BlockInput], transforms: list[tuple[str, object]]) -> list[dict]:
    """transform_block with the model's architecture data: its smoothing pairs, head size, norm offset."""
    from lowbit.arch.specs import NORM_WEIGHT_OFFSET
    if not arch.smooth_pairs:
        raise LowbitError(f"architecture {arch.name!r}: no smoothing pairs in its ArchSpec; the recipe's "
                          f"transforms {[n for n, _ in transforms]} need them (lowbit/arch/specs.py)")
    c = getattr(model, "config", None)
    head_dim = getattr(c, "head_dim", None) or (
        getattr(c, "hidden_size", 0) // max(getattr(c, "num_attention_heads", 1) or 1, 1))
    return transform_block(block, arch.smooth_pairs, acts, schemes, transforms, head_dim=max(int(head_dim), 1),
                           norm_offset=NORM_WEIGHT_OFFSET.get(getattr(c, "model_type", None), 0.0))


def summarize(rows: list[dict]) -> list[str]:
    """One note per transform: pairs folded, and for awq the mean alpha and error reduction."""
    notes = []
    for name in sorted({r["transform"] for r in rows}):
        rs = [r for r in rows if r["transform"] == name]
        msg = f"{name}: {len(rs)} smoothing pair(s) folded"
        if name == "awq":
            a = sum(r["alpha"] for r in rs) / len(rs)
            ratio = sum(r["loss"] for r in rs) / max(sum(r["loss_unscaled"] for r in rs), 1e-30)
            msg += f", mean alpha {a:.2f}, consumer output error {ratio:.3f}x of unscaled RTN"
        notes.append(msg)
    return notes
