"""Randomised Hadamard rotations of any width used by transformers (576, 1536, 8960, ...).

A rotation Q (n x n, orthogonal) spreads every weight row's outliers over all its columns
("incoherence processing", QuIP# arXiv:2402.04396, QuaRot arXiv:2404.00456): a group of a
rotated weight has a range set by its typical entry, not by one outlier channel.

Construction, for n = h * 2^k:

    Q = diag(s) . (H_h (x) H_{2^k}) / sqrt(n)        s: seeded random signs (+-1), one per column

    H_{2^k}  Sylvester's Hadamard matrix ([[1, 1], [1, -1]] Kronecker-powered)
    H_h      a Paley Hadamard matrix of order h (h - 1 a prime = 3 mod 4: Paley I; h / 2 - 1 a
             prime = 1 mod 4: Paley II), chosen so that 2^k is as large as possible. QuaRot uses
             tabulated matrices of orders 12, 20, 28, 36, 40, ... the same way (its hadamard_utils);
             Paley's constructions give those orders without a table. Widths met in practice:
                 576  = 36 * 16   (Paley II, q = 17)    SmolLM2 hidden
                 1536 = 12 * 128  (Paley I,  q = 11)    SmolLM2 intermediate, Qwen2.5-1.5B hidden
                 8960 = 140 * 64  (Paley I,  q = 139)   Qwen2.5-1.5B intermediate
                 4096, 11008 = 172 * 64, 14336 = 28 * 512, ...
             When no Paley order <= 256 divides n (11008 = 43 * 256: 172 is not a Paley order)
             H_h is replaced by a seeded random orthogonal matrix (QR of a Gaussian): still exactly
             orthogonal, less incoherent (entries of R are not all +-1/sqrt(h)).

Applying it to activations (the online rotation, x -> x Q) never builds Q:
x (A (x) B) = vec(A^T X B) for X = x reshaped (h, 2^k), so the cost per row is h^2 2^k + h 4^k
multiply-adds with two small matmuls (for 1536 = 12 * 128: 215 k, a quarter of a 1536 x 576 linear).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from lowbit.errors import LowbitError


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) Jacobsthal matrix Q_ij = chi(j - i), chi the quadratic character mod the prime q."""
    squares = torch.zeros(q, dtype=torch.float64)
    squares[(torch.arange(1, q) ** 2) % q] = 1.0
    chi = 2 * squares - 1
    chi[0] = 0
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


@lru_cache(maxsize=None)
def _paley(h: int) -> torch.Tensor | None:
    """A Hadamard matrix of order h (entries +-1, H H^T = h I) by Paley's constructions, or None."""
    if h == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if h == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    H = None
    q = h - 1
    if _is_prime(q) and q % 4 == 3:                    # Paley I
        S = torch.zeros(h, h, dtype=torch.float64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = _jacobsthal(q)
        H = torch.eye(h, dtype=torch.float64) + S
    elif h % 2 == 0 and _is_prime(h // 2 - 1) and (h // 2 - 1) % 4 == 1:   # Paley II
        q = h // 2 - 1
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:] = 1
        C[1:, 0] = 1
        C[1:, 1:] = _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        H = torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    if H is None or not torch.equal(H @ H.T, h * torch.eye(h, dtype=torch.float64)):
        return None
    return H


def sylvester(p: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order p (a power of two), entries +-1, float64."""
    if p < 1 or p & (p - 1):
        raise LowbitError(f"sylvester: order must be a power of two, got {p}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < p:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


MAX_PALEY = 256      # larger Paley factors make A (h x h) and the online rotation's cost large


def _split(n: int) -> tuple[int, int]:
    """n = h * p with p a power of two as large as possible such that a Paley matrix of order h
    exists; (odd part, its power of two) when none does (h then gets a random orthogonal)."""
    p = n & -n
    while p >= 1:
        if n // p <= MAX_PALEY and _paley(n // p) is not None:
            return n // p, p
        p //= 2
    return n // (n & -n), n & -n


@dataclass(frozen=True)
class Rotation:
    """Q = diag(signs) (A (x) B) with A (h, h), B (p, p) orthogonal (already divided by sqrt)."""
    n: int
    signs: torch.Tensor      # (n,) +-1, float64
    A: torch.Tensor          # (h, h) float64
    B: torch.Tensor          # (p, p) float64
    kind: str                # "hadamard" (A a Paley / Sylvester matrix) or "hadamard x random"

    def matrix(self) -> torch.Tensor:
        """(n, n) float64."""
        return self.signs[:, None] * torch.kron(self.A, self.B)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x Q over the last dimension, without building Q (x reshaped (.., h, p): A^T X B)."""
        if x.shape[-1] != self.n:
            raise LowbitError(f"rotation of width {self.n}: input has last dimension {x.shape[-1]}")
        dt = x.dtype
        A, B, s = (t.to(dt) for t in (self.A, self.B, self.signs))
        h, p = self.A.shape[0], self.B.shape[0]
        XB = ((x * s).reshape(-1, p) @ B).reshape(-1, h, p)            # rows of X times B
        # A^T (XB) as one flat matmul: (XB)^T A, (rows * p, h) @ (h, h)
        Y = (XB.transpose(1, 2).reshape(-1, h) @ A).reshape(-1, p, h).transpose(1, 2)
        return Y.reshape(x.shape)

    def describe(self) -> str:
        return f"{self.kind} {self.A.shape[0]}x{self.B.shape[0]} = {self.n}"


def random_hadamard(n: int, seed: int) -> Rotation:
    """The seeded randomised Hadamard rotation of width n (module docstring)."""
    if n < 1:
        raise LowbitError(f"random_hadamard: width must be positive, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    h, p = _split(n)
    H = _paley(h)
    kind = "hadamard"
    if H is None:
        G = torch.randn(h, h, generator=g, dtype=torch.float64)
        Qr, Rr = torch.linalg.qr(G)
        A = Qr * torch.sign(torch.diagonal(Rr))[None, :]
        kind = "random orthogonal x hadamard"
    else:
        A = H / h ** 0.5
    B = sylvester(p) / p ** 0.5
    return Rotation(n, signs, A, B, kind)
