"""Sensitivity: what each quantizable module costs, in KL to the original model, under each
candidate scheme. The predicted cost is a second-order (Fisher) estimate; measure.py measures the
real one (only that module quantized) and checks the ranking against it.

For a linear y = W x and a weight error dW = W - Q, the KL of the model's next-token distribution
from the original's is, to second order, 0.5 vec(dW)^T F vec(dW), with F the Fisher of the model's
own output distribution (labels sampled from it: the Hessian of the KL at dW = 0). F is taken as
Kronecker-factored per position (K-FAC, Martens & Grosse, arXiv:1503.05671) with a diagonal output
factor:

    KL ~= 0.5 * sum_j  G_j * (dW_j  A  dW_j^T)          per scored token, nats
          G_j = mean over tokens of (dL/dy_j)^2         L = sum_t -log p(y_t), y_t ~ p (sampled)
          A   = mean over tokens of x x^T               = H / 2 with GPTQ's H = 2/n sum x x^T

The unweighted 0.5 * sum_j dW_j A dW_j^T (the layer's output error, what GPTQ minimises) is kept
as the second proxy ("output_error"); it knows nothing of how much the rest of the model amplifies
the layer's error.

Two passes, both on the calibration windows:
  1. gradients: fisher_samples windows forward + backward (no weight gradients: only the output
     gradients of every linear are read, by tensor hooks), labels sampled from the model;
  2. block by block (calibration/capture.py, one block's activations held): each shared-input
     group's A from a float forward; every candidate's per-row error dW_j A dW_j^T and its bytes in
     the output format (sizing.py). RTN candidates are quantized; of the GPTQ candidates one anchor
     is solved for real (the group's linears as one row-stacked matrix, as the calibration loop
     does) and the others are estimated from the anchor (gptq_estimate.py), so the pass costs one
     GPTQ sweep per group whatever the number of candidates; the first `exact_blocks` blocks solve
     every candidate and fix a per-candidate correction of the estimate (real / estimated, geometric
     mean). exact_gptq=True solves every candidate everywhere (for validation: ~candidates x the
     solve time of one GPTQ run).

The result is cached per (model weights, calibration tokens, candidates, format, settings) under
cache_dir()/sensitivity/, written atomically.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.arch import linear_weight
from lowbit.errors import LowbitError

SENSITIVITY_VERSION = 1
# preset-grammar names (recipe.grammar_recipe). The native format stores 2-4 bit codes packed and
# 5-8 bit codes one byte each, so 5-7 bits cost what 8 bits cost there and are left out.
DEFAULT_CANDIDATES = (
    "w2g32-gptq-actorder-mse", "w2g64-gptq-actorder-mse",
    "w3-gptq-actorder-mse", "w3g128-gptq-actorder-mse", "w3g64-gptq-actorder-mse", "w3g32-gptq-actorder-mse",
    "w4-gptq-actorder-mse", "w4g128-gptq-actorder-mse", "w4g64-gptq-actorder-mse", "w4g32-gptq-actorder-mse",
    "w4g128-rtn", "w8-rtn",
)
# fmt="gguf": llama.cpp's own block encoders (method "ggml", weighted by the layer's imatrix, i.e.
# diag(A)), one candidate per GGUF tensor type. A type whose block does not divide a row takes
# llama.cpp's fallback (Q4_K -> Q5_0 on SmolLM2's 576 columns), so there several candidates are one.
GGUF_CANDIDATES = ("gguf-q2_k", "gguf-q3_k", "gguf-q4_0", "gguf-q4_1", "gguf-q4_k", "gguf-q5_0", "gguf-q5_1",
                   "gguf-q5_k", "gguf-q6_k", "gguf-q8_0")


@dataclass
class Sensitivity:
    """Per (module, candidate): predicted KL (`cost`), output error, bytes in `fmt`."""
    modules: list[dict]             # {name, shape [rows, cols], group: id of its shared-input group}
    candidates: list[str]
    cost: list[list[float]]         # [module][candidate] predicted KL, nats per token
    output_error: list[list[float]]  # [module][candidate] 0.5 sum_j dW_j A dW_j^T
    nbytes: list[list[int]]         # [module][candidate] bytes of the module's tensors in fmt
    fixed: dict                     # sizing.fixed_bytes
    fmt: str = "native"
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self.modules]

    def weights(self) -> int:
        return sum(m["shape"][0] * m["shape"][1] for m in self.modules)

    def to_dict(self) -> dict:
        return {"lowbit_sensitivity_version": SENSITIVITY_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        if d.get("lowbit_sensitivity_version") != SENSITIVITY_VERSION:
            raise LowbitError(f"sensitivity: expected lowbit_sensitivity_version {SENSITIVITY_VERSION}, "
                              f"got {d.get('lowbit_sensitivity_version')!r}")
        d = {k: v for k, v in d.items() if k != "lowbit_sensitivity_version"}
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from lowbit.io import atomic_file
        with atomic_file(Path(path), "w") as fh:
            json.dump(self.to_dict(), fh, sort_keys=True)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise LowbitError(f"sensitivity file {path}: unreadable ({e}); delete it to recompute") from e


def candidate_rule(name: str):
    """The Rule a candidate name stands for: recipe preset grammar (w3g64-gptq-actorder-mse), or
    gguf-<ggml type> (gguf-q4_k: llama.cpp's encoder for that type, method "ggml")."""
    from lowbit.recipe import Rule, grammar_recipe
    if name.lower().startswith("gguf-"):
        from lowbit.numerics.ggml.types import ggml_type
        from lowbit.presets.gguf_mixes import ggml_scheme
        t = name[5:]
        try:
            ggml_type(t)
        except LowbitError as e:
            raise LowbitError(f"budget candidate {name!r}: {e}") from None
        return Rule(r".*", ggml_scheme(t), "ggml")
    r = grammar_recipe(name)
    if r is None:
        raise LowbitError(f"budget candidate {name!r}: not a preset-grammar name "
                          "(w{bits}[g{group}][-sym]-{method}[-actorder[-static]][-mse], e.g. w3g64-gptq-actorder-mse) "
                          "or gguf-<ggml type> (e.g. gguf-q4_k)")
    return r.rules[0]


def check_candidates(fmt: str, candidates) -> None:
    """GGUF stores ggml types only, the other formats lowbit's own schemes only."""
    for c in candidates:
        ggml = candidate_rule(c).method == "ggml"
        if fmt == "gguf" and not ggml:
            raise LowbitError(f"budget candidate {c!r}: a GGUF file holds ggml types only; "
                              f"expected gguf-<type> (e.g. {', '.join(GGUF_CANDIDATES[:3])})")
        if fmt != "gguf" and ggml:
            raise LowbitError(f"budget candidate {c!r}: ggml types are for --format gguf, not {fmt!r}")


def default_candidates(fmt: str) -> tuple[str, ...]:
    return GGUF_CANDIDATES if fmt == "gguf" else DEFAULT_CANDIDATES


def target_names(model: nn.Module) -> list[str]:
    """Every linear the solver chooses for: those a uniform preset quantizes (lm_head stays float)."""
    from lowbit.api import quantize_targets
    from lowbit.recipe import get_recipe
    return [n for n, m, _ in quantize_targets(model, get_recipe("w4g128-rtn")) if not isinstance(m, nn.Embedding)]


def output_grad_sq(model: nn.Module, tokens: torch.Tensor, names: list[str], *, batch_size: int = 2,
                   seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """name -> mean over tokens of (dL/dy)^2 per output channel (float64), with L the summed
    negative log-likelihood of labels sampled from the model itself; and the token count."""
    mods = {n: model.get_submodule(n) for n in names}
    acc = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in mods.items()}
    handles = []

    def out_hook(name):
        def hook(_m, _args, out):
            if out.requires_grad:
                out.register_hook(lambda g: _accumulate(acc[name], g))
        return hook

    def embed_hook(_m, _args, out):
        return out.detach().requires_grad_(True)   # gradients flow to activations, never to weights

    for n, m in mods.items():
        handles.append(m.register_forward_hook(out_hook(n)))
    handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    n_tok = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for b0 in range(0, tokens.shape[0], batch_size):
                ids = tokens[b0:b0 + batch_size]
                logits = model(input_ids=ids, use_cache=False).logits.float()       # (b, s, V)
                loss = sampled_nll(logits, gen)
                loss.backward()
                n_tok += ids.numel()
                del logits, loss
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
    for n, a in acc.items():
        if not torch.isfinite(a).all():
            raise LowbitError(f"sensitivity: non-finite output gradients at {n}")
    return {n: a / n_tok for n, a in acc.items()}, n_tok


def sampled_nll(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The summed NLL of labels drawn from the model's own distribution (one draw per position,
    from `gen`): the loss whose output gradients give the Fisher."""
    with torch.no_grad():
        probs = torch.softmax(logits.detach(), dim=-1).reshape(-1, logits.shape[-1])
        labels = torch.multinomial(probs, 1, generator=gen).reshape(-1)
        del probs
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="sum")


def _accumulate(acc: torch.Tensor, g: torch.Tensor) -> None:
    acc.add_(g.detach().double().square().sum(dim=(0, 1)))     # (b, s, out) -> (out,); returns None:
    # a tensor hook that returns a value would replace the gradient


def _block_groups(model, arch, blocks, acts, names):
    """Per block index: list of groups, each a list of (qualified name, module)."""
    from lowbit.arch import probe_groups
    from lowbit.calibration.capture import run_block
    groups = arch.groups
    if arch.discovered or not groups:
        groups = probe_groups(blocks[0], lambda: run_block(blocks[0], acts[0]))
    wanted = set(names)
    out = {}
    for b, block in enumerate(blocks):
        gs = []
        for g in groups:
            members = [(f"{arch.blocks}.{b}.{rel}", block.get_submodule(rel)) for rel in g
                       if f"{arch.blocks}.{b}.{rel}" in wanted]
            if members:
                gs.append(members)
        out[b] = gs
    missing = wanted - {n for gs in out.values() for g in gs for n, _ in g}
    if missing:
        raise LowbitError(f"sensitivity: linears {sorted(missing)[:4]} are outside the decoder blocks' "
                          "linear groups; the cost model covers block linears only")
    return out


def _bytes_like_gptq(fmt: str, name: str, w: torch.Tensor, rule) -> int:
    """Bytes GPTQ's output would take for `rule`, without running it: the RTN weight of the same
    scheme has the same tensors (codes, fp16 scales, zero points), plus GPTQ's g_idx (int32 per
    input column) when act-order uses dynamic groups."""
    from lowbit.budget.sizing import layer_bytes
    from lowbit.methods import get_method
    rtn = get_method("rtn")
    n = layer_bytes(fmt, name, rtn.fn(w, rule.scheme, rtn.make_config({}), None))
    a = rule.method_args
    if a.get("act_order") and rule.scheme.granularity == "group" and not a.get("static_groups"):
        n += 4 * w.shape[1]
    return n


def _candidate_errors(members, A: torch.Tensor, H: torch.Tensor, rules, fmt: str, anchor: int | None,
                      exact_gptq: bool, correction: dict[int, float] | None = None):
    """For one shared-input group: per candidate, per member, (per-row error dW_j A dW_j^T (rows,),
    bytes). RTN candidates, the anchor and (exact_gptq) every GPTQ candidate are solved; the other
    GPTQ candidates are estimated (gptq_estimate.py), scaled per member by the anchor's kappa and
    per candidate by `correction` (real / estimate on the exactly solved blocks).
    -> (results, the kappa-scaled estimates of the non-anchor GPTQ candidates)"""
    correction = correction or {}
    from lowbit.budget.gptq_estimate import estimated_row_loss, inverse_diag
    from lowbit.budget.sizing import layer_bytes
    from lowbit.calibration.loop import _split_rows
    from lowbit.methods import get_method
    ws = [linear_weight(m).detach().float() for _, m in members]
    W = torch.cat(ws, 0)
    rows = [w.shape[0] for w in ws]
    out: list = [None] * len(rules)
    diag_cache: dict = {}

    def estimate(rule):
        key = (bool(rule.method_args.get("act_order")), float(rule.method_args.get("damp_percent", 0.01)))
        if key not in diag_cache:
            diag_cache[key] = inverse_diag(H, *key)
        d, perm = diag_cache[key]
        return torch.split(estimated_row_loss(W, d, perm, rule.scheme), rows)

    def solved(rule):
        spec = get_method(rule.method)
        cfg = spec.make_config(rule.method_args)
        stats = {"hessian": H} if spec.needs else None
        if rule.method == "ggml":        # llama.cpp's encoders, weighted as an imatrix would: diag(A)
            imp = torch.diagonal(A).clamp_min(0).double().numpy()
            parts = [spec.fn(w, rule.scheme, cfg, {"imatrix": imp}) for w in ws]
        elif getattr(spec.fn, "row_separable", False) or not spec.needs:
            qw = spec.fn(W, rule.scheme, cfg, stats)
            parts = _split_rows(qw, rows) if len(ws) > 1 else [qw]
        else:
            parts = [spec.fn(w, rule.scheme, cfg, stats) for w in ws]
        res = []
        for (name, _), w, qw in zip(members, ws, parts):
            dW = w - qw.dequantize(torch.float32)
            res.append((((dW @ A) * dW).sum(dim=1).double(), layer_bytes(fmt, name, qw)))
        return res

    is_gptq = [bool(get_method(r.method).needs) for r in rules]
    for k, rule in enumerate(rules):
        if not is_gptq[k] or exact_gptq or k == anchor:
            out[k] = solved(rule)
    estimates: dict[int, list[torch.Tensor]] = {}     # k -> per member, estimate * kappa (rows,)
    if anchor is not None:
        est_a = estimate(rules[anchor])
        kappa = [float(real.sum() / est.sum()) if float(est.sum()) > 0 else 1.0
                 for (real, _), est in zip(out[anchor], est_a)]
        for k, rule in enumerate(rules):
            if is_gptq[k] and k != anchor:
                estimates[k] = [e * kp for e, kp in zip(estimate(rule), kappa)]
                if out[k] is None:
                    f = correction.get(k, 1.0)
                    out[k] = [(e * f, _bytes_like_gptq(fmt, name, w, rule))
                              for (name, _), w, e in zip(members, ws, estimates[k])]
    return out, estimates


def default_anchor(candidates: list[str]) -> int | None:
    """The GPTQ candidate solved for real to scale the estimates: the first 3-bit grouped one (the
    middle of the range budgets land in), else the first 3-bit, else the first GPTQ one."""
    from lowbit.methods import get_method
    rules = [candidate_rule(c) for c in candidates]
    gptq = [i for i, r in enumerate(rules) if get_method(r.method).needs]
    three = [i for i in gptq if rules[i].scheme.bits == 3]
    grouped = [i for i in three if rules[i].scheme.granularity == "group"]
    return (grouped or three or gptq or [None])[0]


def sensitivity(model: nn.Module, tokens: torch.Tensor, *, candidates=None, fmt: str = "native",
                fisher_samples: int = 8, batch_size: int = 8, grad_batch_size: int = 2,
                source_dir: str | Path | None = None, exact_gptq: bool = False, anchor: str | None = None,
                exact_blocks: int = 1, log: Callable[[str], None] | None = None, blocks_io=None,
                shard: tuple[int, int] | None = None) -> Sensitivity:
    """The cost table of every block linear of `model` under every candidate (module docstring).
    blocks_io (budget/streamed.py): load(b, block) / release(b, block) around each block's use,
    for a model whose blocks are read one at a time; the gradients then come from
    blocks_io.output_grad_sq (the same sums, block by block). shard (rank, world): score only
    the blocks b with b % world == rank (and the first exact_blocks, which fix the estimate's
    correction, on every rank), then gather every rank's rows over the initialised
    torch.distributed group (budget/distributed.py); every number is the single process's."""
    from lowbit.arch import get_blocks, spec_for
    from lowbit.budget.sizing import check_format, fixed_bytes
    from lowbit.calibration.capture import capture_block_inputs, run_block
    from lowbit.calibration.stats import StatSet
    log = log or (lambda _m: None)
    check_format(fmt)
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise LowbitError(f"sensitivity tokens: expected a (n, seq) LongTensor, got {tuple(tokens.shape)} {tokens.dtype}")
    candidates = list(default_candidates(fmt) if candidates is None else candidates)
    if not candidates:
        raise LowbitError("sensitivity: no candidate schemes given")
    check_candidates(fmt, candidates)
    rules = [candidate_rule(c) for c in candidates]
    if anchor is not None and anchor not in candidates:
        raise LowbitError(f"sensitivity anchor {anchor!r}: not among the candidates {candidates}")
    anchor_i = candidates.index(anchor) if anchor is not None else default_anchor(candidates)
    names = target_names(model)
    timing = {}
    t0 = time.perf_counter()
    grads = output_grad_sq if blocks_io is None else blocks_io.output_grad_sq
    gsq, n_grad = grads(model, tokens[:fisher_samples], names, batch_size=grad_batch_size)
    timing["gradients_s"] = time.perf_counter() - t0
    log(f"output gradients: {n_grad} tokens, {timing['gradients_s']:.1f} s")

    arch = spec_for(model)
    blocks = get_blocks(model, arch)
    t0 = time.perf_counter()
    cost: dict[str, list[float]] = {}
    oerr: dict[str, list[float]] = {}
    nbytes: dict[str, list[int]] = {}
    group_of: dict[str, int] = {}
    ratios: dict[int, list[float]] = {}
    correction: dict[int, float] = {}
    with torch.no_grad():
        acts = capture_block_inputs(model, blocks[0], tokens, batch_size)
        if blocks_io is not None:
            blocks_io.load(0, blocks[0])           # _block_groups may probe block 0
        per_block = _block_groups(model, arch, blocks, acts, names)
        gid = 0
        for b, block in enumerate(blocks):
            tb = time.perf_counter()
            if blocks_io is not None and b:
                blocks_io.load(b, block)
            groups = per_block[b]
            if shard is not None and b >= exact_blocks and b % shard[1] != shard[0]:
                acts = [run_block(block, a) for a in acts]        # another rank scores this block
                gid += len(groups)
                if blocks_io is not None:
                    blocks_io.release(b, block)
                continue
            sets = [StatSet({"hessian"}, linear_weight(g[0][1]).shape[1]) for g in groups]
            handles = [g[0][1].register_forward_pre_hook(lambda _m, args, _s=s: _s.update(args[0]))
                       for g, s in zip(groups, sets)]
            try:
                acts = [run_block(block, a) for a in acts]
            finally:
                for h in handles:
                    h.remove()
            for g, s in zip(groups, sets):
                H = s.results()["hessian"].float()
                A = H / 2
                exact = exact_gptq or b < exact_blocks
                per_cand, est = _candidate_errors(g, A, H, rules, fmt, anchor_i, exact, correction)
                if exact and not exact_gptq:
                    for k, e in est.items():
                        for (real, _), ek in zip(per_cand[k], e):
                            ratios.setdefault(k, []).append(float(real.sum()) / max(float(ek.sum()), 1e-30))
                for k, (name, _) in enumerate(g):
                    G = gsq[name]
                    group_of[name] = gid
                    cost[name] = [float(0.5 * (G * pc[k][0]).sum()) for pc in per_cand]
                    oerr[name] = [float(0.5 * pc[k][0].sum()) for pc in per_cand]
                    nbytes[name] = [int(pc[k][1]) for pc in per_cand]
                gid += 1
            if blocks_io is not None:
                blocks_io.release(b, block)
            if b == exact_blocks - 1 and ratios:   # geometric mean of real / estimate per candidate
                correction = {k: float(torch.tensor(r, dtype=torch.float64).log().mean().exp())
                              for k, r in ratios.items()}
            log(f"block {b + 1}/{len(blocks)}: {len(candidates)} candidates, {time.perf_counter() - tb:.1f} s")
    timing["blocks_s"] = time.perf_counter() - t0
    if shard is not None:
        import torch.distributed as dist
        parts = [None] * shard[1]
        dist.all_gather_object(parts, (cost, oerr, nbytes, group_of))
        for part in parts:
            for mine, theirs in zip((cost, oerr, nbytes, group_of), part):
                mine.update(theirs)
        timing["world_size"] = shard[1]
    for n in names:
        bad = [c for c, v in zip(candidates, cost[n]) if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            raise LowbitError(f"sensitivity: non-finite cost for {n} under {bad}")
    mods = [{"name": n, "shape": list(model.get_submodule(n).weight.shape), "group": group_of[n]} for n in names]
    return Sensitivity(modules=mods, candidates=candidates, cost=[cost[n] for n in names],
                       output_error=[oerr[n] for n in names], nbytes=[nbytes[n] for n in names],
                       fixed=fixed_bytes(fmt, model, names, source_dir), fmt=fmt,
                       meta={"tokens": list(tokens.shape), "gradient_tokens": n_grad, "timing": timing,
                             "fisher_samples": fisher_samples, "exact_gptq": exact_gptq,
                             "anchor": None if anchor_i is None else candidates[anchor_i],
                             "exact_blocks": exact_blocks,
                             "correction": {candidates[k]: v for k, v in sorted(correction.items())}})


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().to(torch.int64).numpy().tobytes()).hexdigest()


def cache_key(fingerprint: str, tokens: torch.Tensor, candidates, fmt: str, fisher_samples: int,
              exact_gptq: bool = False, anchor: str | None = None) -> str:
    spec = {"v": SENSITIVITY_VERSION, "model": fingerprint, "tokens": tokens_digest(tokens),
            "shape": list(tokens.shape), "candidates": list(candidates), "fmt": fmt, "fisher": fisher_samples,
            "exact_gptq": exact_gptq, "anchor": anchor}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def cache_path(fingerprint: str, tokens: torch.Tensor, candidates, fmt: str, fisher_samples: int,
               exact_gptq: bool, anchor: str | None, exact_blocks: int, cache_root=None) -> tuple[str, Path]:
    """(key, file) of a sensitivity table in the cache."""
    from lowbit.io import cache_dir
    key = cache_key(fingerprint, tokens, candidates, fmt, fisher_samples, exact_gptq, anchor) + f"-x{exact_blocks}"
    return key, Path(cache_root or cache_dir()) / "sensitivity" / f"{key[:32]}.json"


def load_or_compute(model: nn.Module, tokens: torch.Tensor, *, candidates=None, fmt: str = "native",
                    fisher_samples: int = 8, cache: bool = True, cache_root: str | Path | None = None,
                    exact_gptq: bool = False, anchor: str | None = None,
                    log: Callable[[str], None] | None = None, fingerprint: str | None = None,
                    **kw) -> Sensitivity:
    """`sensitivity`, cached under cache_dir()/sensitivity/<key>.json (key: model weights' sha256,
    or `fingerprint` for a streamed model (its source's sha256), the calibration tokens,
    candidates, format, gradient windows)."""
    from lowbit.eval.kl import model_fingerprint
    fp = fingerprint or model_fingerprint(model)
    candidates = list(default_candidates(fmt) if candidates is None else candidates)
    key, path = cache_path(fp, tokens, candidates, fmt, fisher_samples, exact_gptq, anchor,
                           kw.get("exact_blocks", 1), cache_root)
    if cache and path.is_file():
        s = Sensitivity.load(path)
        if s.meta.get("key") == key:
            if log:
                log(f"sensitivity: cached ({path})")
            s.meta["cached"] = str(path)
            return s
    s = sensitivity(model, tokens, candidates=candidates, fmt=fmt, fisher_samples=fisher_samples,
                    exact_gptq=exact_gptq, anchor=anchor, log=log, **kw)
    s.meta.update(key=key, model_sha256=fp, tokens_sha256=tokens_digest(tokens))
    if cache:
        s.save(path)
    return s
