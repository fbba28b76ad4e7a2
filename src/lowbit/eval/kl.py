"""KL divergence of a model's next-token distribution from a reference's, and top-1 agreement.

The statistic is llama.cpp's KLD mode (tools/perplexity, `--kl-divergence-base` /
`--kl-divergence`): for every scored position t,

    KL_t = sum_v P(v) (log P(v) - log Q(v))        P = reference (original), Q = evaluated model

reported as mean (+- standard error), median, 90th/99th percentile and max over the scored
positions, and top-1 agreement = fraction of positions where argmax P == argmax Q ("Same top p").
The scored positions are those of perplexity (perplexity.py, same windows and `score` mode), on
the first `kl_max_tokens // seq_len` windows.

Storage choice. Full-vocabulary log-probs are large (SmolLM2: vocab 49152 -> 96 KiB per token in
fp16, ~400 MB for 4k tokens), so:
  * the reference is held as float16 log-probs, (n_windows, T, V), for a KL token budget
    (DEFAULT_KL_MAX_TOKENS) smaller than the perplexity budget;
  * it is computed once: in the same process it rides on the reference's own perplexity pass
    (`ReferenceCollector`), and across runs it is cached on disk under
    cache_dir()/kl-reference/<key>.safetensors, keyed by a sha256 of the reference weights, the
    window tokens and the score mode, and written atomically;
  * the evaluated model's log-probs are rounded through float16 as well and both sides are
    renormalised (log-softmax again) before the sum, so identical models give exactly 0 and the
    rounding noise of the two sides does not bias the comparison.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError

DEFAULT_KL_MAX_TOKENS = 4096
REFERENCE_FORMAT_VERSION = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Keys the reference cache by what the weights *are*, whatever file they came from; ~1 s for
    the bundled model.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.contiguous().to(torch.int64).numpy().tobytes()).hexdigest()


def _renormalised(lp16: torch.Tensor) -> torch.Tensor:
    """float16 log-probs -> float32 log-probs that sum to 1 exactly as far as float32 allows."""
    lp = lp16.float()
    return lp - torch.logsumexp(lp, dim=-1, keepdim=True)


@dataclass
class ReferenceLogprobs:
    """The reference model's scored log-probs on fixed windows (see module docstring)."""
    logprobs: torch.Tensor     # (n_windows, T, V) float16, T = seq_len - 1 - score_start
    windows: torch.Tensor      # (n_windows, seq_len) int64: the tokens they were computed on
    score: str
    fingerprint: str           # model_fingerprint of the reference

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.logprobs.shape[0] * self.logprobs.shape[1])

    def cache_key(self) -> str:
        return reference_cache_key(self.fingerprint, self.windows, self.score)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save
        from lowbit.io import atomic_file
        meta = {"lowbit_kl_reference_version": str(REFERENCE_FORMAT_VERSION), "score": self.score,
                "fingerprint": self.fingerprint}
        blob = save({"logprobs": self.logprobs.contiguous(), "windows": self.windows.contiguous()},
                    metadata=meta)
        with atomic_file(Path(path)) as fh:
            fh.write(blob)

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceLogprobs":
        from safetensors import safe_open
        p = Path(path)
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise LowbitError(f"KL reference file {p}: unreadable ({type(e).__name__}: {e}); "
                              "delete it and it will be recomputed") from e
        if meta.get("lowbit_kl_reference_version") != str(REFERENCE_FORMAT_VERSION):
            raise LowbitError(f"KL reference file {p}: expected lowbit_kl_reference_version "
                              f"{REFERENCE_FORMAT_VERSION}, got {meta.get('lowbit_kl_reference_version')!r}")
        if set(t) != {"logprobs", "windows"}:
            raise LowbitError(f"KL reference file {p}: expected tensors logprobs, windows; got {sorted(t)}")
        return cls(t["logprobs"], t["windows"], meta.get("score", "all"), meta.get("fingerprint", ""))


def reference_cache_key(fingerprint: str, windows: torch.Tensor, score: str) -> str:
    spec = {"v": REFERENCE_FORMAT_VERSION, "model": fingerprint, "windows": _windows_digest(windows),
            "shape": list(windows.shape), "score": score, "dtype": "float16"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def reference_cache_path(key: str, root: str | os.PathLike | None = None) -> Path:
    from lowbit.io import cache_dir
    base = Path(root) if root is not None else cache_dir()
    return base / "kl-reference" / f"{key[:32]}.safetensors"


class ReferenceCollector:
    """A perplexity-pass consumer that keeps the first `n_windows` windows' log-probs (fp16)."""

    def __init__(self, windows: torch.Tensor, score: str, fingerprint: str):
        self.windows = windows
        self.score = score
        self.fingerprint = fingerprint
        self.parts: list[torch.Tensor] = []

    def __call__(self, i: int, logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        if i < self.windows.shape[0]:
            self.parts.append(logprobs.to(torch.float16))

    def result(self) -> ReferenceLogprobs:
        if len(self.parts) != self.windows.shape[0]:
            raise LowbitError(f"KL reference: collected {len(self.parts)} of {self.windows.shape[0]} windows")
        return ReferenceLogprobs(torch.stack(self.parts), self.windows.clone(), self.score, self.fingerprint)


def reference_logprobs(ref_model: torch.nn.Module, windows: torch.Tensor, *, score: str = "all",
                       cache: bool = True, cache_root: str | os.PathLike | None = None,
                       progress: bool = True) -> ReferenceLogprobs:
    """The reference's log-probs on `windows`: from the disk cache when present, else computed
    (one forward per window) and, with cache=True, stored for the next run."""
    from lowbit.eval.perplexity import score_windows
    fp = model_fingerprint(ref_model)
    key = reference_cache_key(fp, windows, score)
    path = reference_cache_path(key, cache_root)
    if cache and path.is_file():
        ref = ReferenceLogprobs.load(path)
        if ref.fingerprint == fp and ref.score == score and torch.equal(ref.windows, windows):
            return ref
    col = ReferenceCollector(windows, score, fp)
    score_windows(ref_model, windows, score=score, consumers=[col], progress=progress, desc="KL reference")
    ref = col.result()
    if cache:
        ref.save(path)
    return ref


@dataclass
class KLResult:
    mean: float
    mean_stderr: float
    median: float
    p90: float
    p99: float
    max: float
    top1_agreement: float      # fraction in [0, 1]
    tokens: int
    windows: int
    reference: str             # fingerprint of the reference model
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


class KLAccumulator:
    """A perplexity-pass consumer: KL(P_ref || Q) and top-1 agreement on the reference's windows."""

    def __init__(self, reference: ReferenceLogprobs):
        self.ref = reference
        self.kl: list[torch.Tensor] = []
        self.same_top1: list[torch.Tensor] = []

    def __call__(self, i: int, logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        if i >= self.ref.n_windows:
            return
        r16 = self.ref.logprobs[i]
        if r16.shape != logprobs.shape or not torch.equal(self.ref.windows[i, -targets.numel():], targets):
            raise LowbitError(f"KL reference: window {i} does not match (reference computed on other "
                              "tokens, seq_len or score mode); recompute the reference with the same "
                              "text, seq_len and score")
        p_log = _renormalised(r16)                        # (T, V)
        q_log = _renormalised(logprobs.to(torch.float16))  # same rounding as the reference side
        kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1)    # (T,)
        self.kl.append(kl.double())
        self.same_top1.append(p_log.argmax(dim=-1) == q_log.argmax(dim=-1))

    def result(self) -> KLResult:
        if not self.kl:
            raise LowbitError("KL: no window was scored against the reference")
        kl = torch.cat(self.kl)
        n = kl.numel()
        q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
        std = float(kl.std()) if n > 1 else 0.0
        seq_len = self.ref.windows.shape[1]
        return KLResult(
            mean=float(kl.mean()), mean_stderr=std / math.sqrt(n), median=float(q[0]), p90=float(q[1]),
            p99=float(q[2]), max=float(kl.max()),
            top1_agreement=float(torch.cat(self.same_top1).double().mean()), tokens=n,
            windows=len(self.kl), reference=self.ref.fingerprint,
            method=(f"KL(P_ref || Q) in nats per token over {n} scored positions of {len(self.kl)} windows "
                    f"of {seq_len} (score={self.ref.score}); both sides' log-probs rounded to float16 and "
                    "renormalised; percentiles linearly interpolated; top-1 = argmax agreement"))


def kl_divergence(model: torch.nn.Module, reference: ReferenceLogprobs, *, progress: bool = True) -> KLResult:
    """KL of `model` from a reference (see `reference_logprobs`) on the reference's windows."""
    from lowbit.eval.perplexity import score_windows
    acc = KLAccumulator(reference)
    score_windows(model, reference.windows, score=reference.score, consumers=[acc], progress=progress, desc="KL")
    return acc.result()
