"""End-to-end fine-tuning of a quantized model with every code fixed: scales, codebooks and norms
trained on the KL divergence to the float model's next-token distribution.

After a calibrated method has chosen every code (GPTQ's integers, a vector codebook's indices),
the float numbers around the codes are still free: the per-group scales, the vector codebooks
and the float parameters beside the quantized linears (RMSNorm weights, biases). Block-wise
methods tune them on each block's own output error; this pass tunes them all together on the
model's output, so errors that compound across blocks are seen. It is the global fine-tuning
step of AQLM (Egiazarian et al. 2024, arXiv:2401.06118, sec. 3.4: codebooks, scales and norms
by Adam on the teacher's KL) and the continuous half of PV-tuning (Malinovskii et al. 2024,
arXiv:2405.14852). No rounding happens while training, so the gradients are exact:

    int / codebook formats   W_hat = V * expand(s0 * (1 + u))        V = decode(codes, 1, z) fixed
    vector codebooks         W_hat = codebook[idx] * expand(s0 * (1 + u))

u starts at 0 (one rate suits every layer: the step is relative). Loss per token:
KL(P_fp32 || P_quantized). The float model is run once on the windows before it is quantized
(`teacher_of`), keeping only its output head's input (n, seq, hidden) and the head's weight: the
teacher's logits of a batch are then one matmul, and the float model is not kept. Afterwards
scales and codebooks are rounded to fp16 (what the files hold) and the modules are ordinary
QuantLinear / VQLinear again, holding the same codes, so every exporter writes the result. The
pass keeps the tuned numbers only when their loss, measured after the fp16 rounding, is below the
starting loss on the same windows.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.train.loop import cosine_decay

FP16_TINY = 2.0 ** -24


@dataclass
class TuneConfig:
    """epochs: passes over the calibration windows; batch_size: windows per step. lr: Adam's rate
    for the relative scale steps u and the codebooks; norm_lr for norm weights and biases (0:
    kept). Cosine decay to lr * min_lr_ratio over all steps; grad_clip on the global norm."""
    epochs: int = 4
    batch_size: int = 2
    lr: float = 1e-3
    norm_lr: float = 1e-3
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("epochs", "batch_size"):
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise LowbitError(f"finetune option {k}: expected a positive integer, got {v!r}")
        for k in ("lr", "norm_lr", "min_lr_ratio"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise LowbitError(f"finetune option {k}: expected a finite number >= 0, got {v!r}")
        if not self.lr > 0:
            raise LowbitError(f"finetune option lr: expected a positive number, got {self.lr!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise LowbitError(f"finetune option grad_clip: expected None or a positive number, got {self.grad_clip!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TuneConfig":
        if not isinstance(d, dict):
            raise LowbitError(f"recipe finetune: expected an object of options, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise LowbitError(f"recipe finetune: unknown option(s) {bad}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class TuneResult:
    loss_init: float              # mean KL on the windows before tuning
    loss_final: float             # after, with the fp16-rounded numbers (the file's)
    kept: bool                    # False: loss_final was not below loss_init, the start was kept
    epoch_losses: list[float]     # mean training KL per epoch
    layers: int
    norms: int
    seconds: float
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _TunedLinear(nn.Module):
    """A quantized linear with its codes fixed and its scale (and codebook) trainable."""

    def __init__(self, qweight, bias: torch.Tensor | None):
        super().__init__()
        from lowbit.numerics.qweight import QuantizedWeight
        from lowbit.numerics.vq import VQWeight
        self.vq = isinstance(qweight, VQWeight)
        if not self.vq and not isinstance(qweight, QuantizedWeight):
            raise LowbitError(f"finetune: {type(qweight).__name__} weights are not tuned (ggml blocks keep "
                              "their scales inside each block)")
        s0 = qweight.scale.detach().float()
        self.register_buffer("s0", s0.clone())
        # lowbit's methods store fp16 numbers (the files hold fp16): the tuned ones are rounded so too
        self.fp16 = bool(torch.equal(s0.half().float(), s0))
        self.u = nn.Parameter(torch.zeros_like(s0))
        self.bias = bias
        if self.vq:
            self.codebook = nn.Parameter(qweight.codebook.detach().float().clone())
        self.attach(qweight)

    def attach(self, qweight) -> None:
        """Hold `qweight` (the codes) and what the forward decodes from it: the unit-scale values
        (int) or the flat indices (vq). A streamed run attaches a block's layers while it runs and
        detaches them after, so only the small trained numbers stay in memory."""
        self.qweight0 = qweight
        if self.vq:
            self.register_buffer("flat_idx", qweight.flat_indices())
            return
        from lowbit.numerics.affine import codec_for, expand_qparams
        shape, scheme, g_idx = tuple(qweight.shape), qweight.scheme, qweight.g_idx
        z = None if qweight.zero_point is None else expand_qparams(qweight.zero_point.float(), shape, scheme, g_idx)
        ones = expand_qparams(torch.ones_like(self.s0), shape, scheme, g_idx)
        v = codec_for(scheme).decode(qweight.qdata, ones, z, scheme)       # the unit-scale values
        # integer grid values are exact in bf16 (|v| <= 256): half the memory of fp32
        exact16 = qweight.scheme.format == "int" and qweight.scheme.bits <= 8
        self.register_buffer("v", v.to(torch.bfloat16 if exact16 else torch.float32))

    def detach_codes(self) -> None:
        """Drop what attach() holds (the trained numbers stay)."""
        self.qweight0 = None
        for k in ("v", "flat_idx"):
            self._buffers.pop(k, None)

    def scale(self) -> torch.Tensor:
        return self.s0 * (1 + self.u)

    def weight(self) -> torch.Tensor:
        from lowbit.numerics.affine import expand_qparams
        from lowbit.numerics.vq import decode
        qw = self.qweight0
        if self.vq:
            return decode(self.codebook, self.flat_idx, self.scale(), qw.group_size, qw.shape[1])
        return self.v.float() * expand_qparams(self.scale(), tuple(qw.shape), qw.scheme, qw.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def result(self):
        """The QuantizedWeight / VQWeight with the trained numbers (rounded to fp16 where the start's were fp16)."""
        from lowbit.numerics.qweight import QuantizedWeight
        from lowbit.numerics.vq import VQWeight
        qw = self.qweight0
        sc = self.scale().detach().float()
        if self.fp16:
            sc = torch.where(sc.abs() < FP16_TINY, torch.full_like(sc, FP16_TINY), sc).half().float()
        if self.vq:
            cb = self.codebook.detach().float()
            cb = cb.half().float() if self.fp16 else cb
            return VQWeight(cb, qw.indices, sc, qw.shape, qw.group_size, dict(qw.info))
        return QuantizedWeight(qw.qdata, sc, qw.zero_point, qw.scheme, qw.g_idx, dict(qw.info))


def _tunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from lowbit.nn.qlinear import QuantLinear
    from lowbit.nn.vq import VQLinear
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, VQLinear)):
            if getattr(mod, "act_quant", None) is not None:
                raise LowbitError(f"finetune {name}: input-activation quantization is not tuned through; "
                                  "use a weight-only recipe")
            out.append((name, mod))
    return out


def _norm_params(model: nn.Module, tuned: set[str]) -> list[tuple[str, nn.Parameter]]:
    """Norm weights / biases and the quantized linears' biases: the float numbers beside the codes."""
    out = []
    for mname, mod in model.named_modules():
        is_norm = "norm" in type(mod).__name__.lower() or isinstance(mod, nn.LayerNorm)
        for pname, p in mod.named_parameters(recurse=False):
            if (is_norm and pname in ("weight", "bias")) or (mname in tuned and pname == "bias"):
                out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


@dataclass
class Teacher:
    """The float model's view of the calibration windows, kept small: the input of its output
    head (n, seq, hidden) and the head's weight, so the logits of any window are one matmul away
    (vocab x hidden per token) instead of n x seq x vocab numbers held."""
    hidden: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None

    def log_probs(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lg = F.linear(self.hidden[idx], self.head_weight, self.head_bias)
            return F.log_softmax(lg.reshape(-1, lg.shape[-1]).float(), dim=-1)


def teacher_of(model: nn.Module, windows: torch.Tensor, batch_size: int = 2) -> Teacher:
    """Run the float `model` on `windows` (n, seq) once, before it is quantized, and keep what
    distillation needs. Checked on the first batch: the head's input times its weight gives the model's own logits
    (an architecture that reshapes logits after the head, e.g. soft-capping, is refused)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise LowbitError(f"finetune: the output head is {type(head).__name__}, expected an nn.Linear to distil through")
    seen = []
    hook = head.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().float()))
    hidden = []
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                seen.clear()
                lg = model(input_ids=windows[i:i + batch_size], use_cache=False).logits.float()
                if len(seen) != 1:
                    raise LowbitError(f"finetune: the output head ran {len(seen)} times in one forward, expected once")
                if i == 0:       # once: the architecture either post-processes logits or not
                    again = F.linear(seen[0], head.weight.float(), None if head.bias is None else head.bias.float())
                    if again.shape != lg.shape or \
                            float((again - lg).abs().max()) > 1e-4 * float(lg.abs().max()) + 1e-5:
                        raise LowbitError("finetune: the model's logits are not its output head applied to the "
                                          "head's input (logits post-processed after the head); not distilled")
                hidden.append(seen[0])
    finally:
        hook.remove()
    w = head.weight.detach().float().clone()
    b = None if head.bias is None else head.bias.detach().float().clone()
    return Teacher(torch.cat(hidden, 0), w, b)


def kl_of_logits(logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(P_teacher || Q) per token (batchmean over the flattened positions), logits (..., vocab)."""
    s = logits.float()
    log_q = F.log_softmax(s.reshape(-1, s.shape[-1]), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def batches(n: int, bs: int) -> list[torch.Tensor]:
    """The windows of an evaluation pass, in order, bs at a time."""
    return [torch.arange(i, min(n, i + bs)) for i in range(0, n, bs)]


class InMemory:
    """The runner of finetune() for a model held whole: its own forward, autograd through it all.
    A runner installs the tuned modules, names the norm parameters, gives the training loss with
    its backward, the mean KL of the windows, and installs the fp16 results (or the start again);
    streaming_finetune.Streamed is the block-by-block one."""

    def __init__(self, model: nn.Module):
        self.model = model

    def begin(self) -> dict:
        from lowbit.nn.qlinear import set_submodule
        targets = _tunable(self.model)
        if not targets:
            raise LowbitError("finetune: the model has no quantized linear (QuantLinear / VQLinear) to tune")
        self.grads = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.was_training = self.model.training
        self.model.train(False)            # no dropout: the file's forward is what is fitted
        mods = {}
        for name, mod in targets:
            mods[name] = _TunedLinear(mod.qweight, mod.bias)
            set_submodule(self.model, name, mods[name])
        return mods

    def norm_params(self, tuned: set[str]) -> list[tuple[str, nn.Parameter]]:
        return _norm_params(self.model, tuned)

    def loss(self, ids: torch.Tensor, log_p: torch.Tensor):
        loss = kl_of_logits(self.model(input_ids=ids, use_cache=False).logits, log_p)
        return loss, loss.backward

    def mean_kl(self, windows: torch.Tensor, teacher: "Teacher", bs: int) -> float:
        tot = 0.0
        with torch.no_grad():
            for idx in batches(windows.shape[0], bs):
                tot += float(kl_of_logits(self.model(input_ids=windows[idx], use_cache=False).logits,
                                          teacher.log_probs(idx))) * len(idx)
        return tot / windows.shape[0]

    def install_results(self, mods: dict) -> tuple[dict, bool]:
        """The fp16-rounded results in place of the tuned modules -> (name -> weight, all finite)."""
        from lowbit.nn.qlinear import make_quant_module, set_submodule
        results = {name: m.result() for name, m in mods.items()}
        ok = all(_finite(r) for r in results.values())
        for name, r in results.items():
            set_submodule(self.model, name, make_quant_module(r, mods[name].bias))
        return results, ok

    def restore(self, mods: dict) -> None:
        from lowbit.nn.qlinear import make_quant_module, set_submodule
        for name, m in mods.items():
            set_submodule(self.model, name, make_quant_module(m.qweight0, m.bias))

    def keep(self, results: dict, qweights: dict | None) -> None:
        if qweights is not None:
            qweights.update(results)

    def end(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.grads.get(name, False))
        self.model.train(self.was_training)


def _finite(r) -> bool:
    from lowbit.numerics.vq import VQWeight
    return bool(torch.isfinite(r.scale).all()) and (not isinstance(r, VQWeight) or bool(torch.isfinite(r.codebook).all()))


def finetune(model: nn.Module, windows: torch.Tensor, teacher: Teacher, cfg: TuneConfig | None = None,
             qweights: dict | None = None, log=None, runner=None) -> TuneResult:
    """Tune `model` (quantized in place: QuantLinear / VQLinear modules) on `windows` (n, seq)
    against `teacher` (teacher_of the float model on the same windows, taken before it was
    quantized). The modules are replaced by ones holding the tuned weights (same codes);
    `qweights` (a report's name -> weight dict), when given, is updated to them. Norm weights
    and biases are tuned in place. On any failure the model is its quantized start again.
    runner: how the model is run (default InMemory(model); streaming_finetune.Streamed runs a
    streamed model's blocks one at a time, the same numbers)."""
    cfg = cfg or TuneConfig()
    if windows.dim() != 2 or tuple(teacher.hidden.shape[:2]) != tuple(windows.shape):
        raise LowbitError(f"finetune: the teacher's states {tuple(teacher.hidden.shape)} do not match the windows "
                          f"{tuple(windows.shape)} (expected (n, seq, hidden) for (n, seq))")
    runner = runner or InMemory(model)
    t0 = time.perf_counter()
    say = log or (lambda m: None)
    mods = runner.begin()
    norms, norm0 = [], {}
    try:
        norms = runner.norm_params(set(mods)) if cfg.norm_lr > 0 else []
        norm0 = {n: p.detach().clone() for n, p in norms}
        groups = [{"params": [m.u for m in mods.values()] + [m.codebook for m in mods.values() if m.vq],
                   "lr": cfg.lr, "base": cfg.lr}]
        if norms:
            for _, p in norms:
                p.requires_grad_(True)
            groups.append({"params": [p for _, p in norms], "lr": cfg.norm_lr, "base": cfg.norm_lr})
        opt = torch.optim.Adam(groups)
        bs = min(cfg.batch_size, windows.shape[0])
        n = windows.shape[0]
        steps = cfg.epochs * math.ceil(n / bs)
        gen = torch.Generator().manual_seed(cfg.seed)
        epoch_losses, t = [], 0
        init = runner.mean_kl(windows, teacher, bs)
        say(f"finetune: {len(mods)} linears, {len(norms)} norm tensors, {steps} steps; KL start {init:.4f}")
        for ep in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            tot = 0.0
            for i in range(0, n, bs):
                idx = order[i:i + bs]
                factor = cosine_decay(t / max(1, steps - 1), cfg.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = g["base"] * factor
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss, backward = runner.loss(windows[idx], teacher.log_probs(idx))
                    if not torch.isfinite(loss):
                        raise LowbitError(f"finetune: the KL became {float(loss)} at step {t}; lower lr "
                                          f"(now {cfg.lr})")
                    backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
                opt.step()
                tot += float(loss.detach()) * len(idx)
                t += 1
            epoch_losses.append(tot / n)
            say(f"finetune epoch {ep + 1}/{cfg.epochs}: KL {epoch_losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
        # the file's numbers: fp16 scales and codebooks, then the loss they give
        with torch.no_grad():
            results, ok = runner.install_results(mods)
            ok = ok and all(bool(torch.isfinite(p).all()) for _, p in norms)
        final = runner.mean_kl(windows, teacher, bs) if ok else float("inf")
        kept = ok and final < init
        if kept:
            runner.keep(results, qweights)
        else:
            _restore(runner, mods, norms, norm0)
            say(f"finetune: KL {final:.4f} after rounding is not below the start {init:.4f}; the start is kept")
    except BaseException:
        _restore(runner, mods, norms, norm0)     # never half-tuned: the model is the quantized start again
        raise
    finally:
        runner.end()
    return TuneResult(init, final, kept, epoch_losses, len(mods), len(norms), time.perf_counter() - t0, asdict(cfg))


def _restore(runner, mods: dict, norms: list, norm0: dict) -> None:
    with torch.no_grad():
        for name, p in norms:          # first: the linears' biases are among them, and are copied below
            p.copy_(norm0[name])
        runner.restore(mods)
