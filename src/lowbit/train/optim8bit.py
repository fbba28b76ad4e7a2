"""Adam / AdamW with 8-bit block-wise quantized state (Dettmers et al. 2021, "8-bit Optimizers via
Block-wise Quantization", arXiv:2110.02861).

Each moment tensor (exp_avg m, exp_avg_sq v) of a parameter with at least `min_8bit_size` values
is stored between steps as one uint8 code per value plus one fp32 absmax per block of
`block_size` (2048) values:

    blocks   x.reshape(-1) padded with zeros to (n_blocks, block_size)
    absmax   max |x| per block                                   fp32 (n_blocks,)
    code     index of the map entry nearest x / absmax            uint8 (n_blocks * block_size,)
    x_hat    map[code] * absmax

A step dequantizes m and v to fp32, runs the ordinary Adam(W) update (Kingma & Ba 2015;
decoupled weight decay of Loshchilov & Hutter 2019) and re-quantizes them. Bytes per parameter:
2 (codes) + 8 / block_size (absmaxes) ~= 2.004 vs 8 for fp32 Adam's two moments: 0.25x.
Smaller tensors (norm weights, biases) keep fp32 moments, as bitsandbytes does (its
min_8bit_size is 4096 too); they are a rounding error of the total.

Maps (`state_format`), each ascending and exact at 0 and at +-1 (so each block's largest value
is stored without error):

    "dynamic"  dynamic tree quantization (paper, section 2.2 and figure 2): after the sign bit, the
               count E of leading zero bits is a base-10 exponent, the first 1 bit an indicator,
               and the remaining f = (7 - E) - 1 bits (signed) a linear fraction, so the values
               10^-E * (0.1 + 0.9 * k / 2^f), k = 1..2^f, tile (10^-(E+1), 10^-E] for E = 0..6.
               m uses the signed map (255 entries: +-127 and 0); v >= 0 the unsigned one (no sign
               bit: E = 0..7, 255 positive values and 0, all 256 codes).
    "linear"   uniform int8: k / 127 for k = -127..127 (m), k / 255 for k = 0..255 (v). Small
               second moments in a block with a large one round to 0 and their update is then
               m / eps: the failure the dynamic map exists to avoid; kept as the baseline option.

Written from the paper's description; bitsandbytes' `create_dynamic_map` builds a similar map
(midpoints of each fraction bin rather than the bin tops used here).
"""
from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError

STATE_FORMATS = ("dynamic", "linear")
BLOCK_SIZE = 2048
MIN_8BIT_SIZE = 4096
_STATE_KEYS = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------------------------------
# Maps and block-wise quantization (pure tensor math)
# ---------------------------------------------------------------------------------------------
def dynamic_map(signed: bool) -> torch.Tensor:
    """The dynamic tree map: ascending float32 values in [-1, 1] (signed, 255) or [0, 1] (256)."""
    bits = 7 if signed else 8               # bits after the sign bit
    pos = []
    for e in range(bits):                   # e leading zeros, then the indicator bit
        f = bits - e - 1                    # fraction bits left
        k = torch.arange(1, 2 ** f + 1, dtype=torch.float64)
        pos.append(10.0 ** -e * (0.1 + 0.9 * k / 2 ** f))
    pos = torch.cat(pos)
    vals = torch.cat([-pos, torch.zeros(1, dtype=torch.float64), pos]) if signed else \
        torch.cat([torch.zeros(1, dtype=torch.float64), pos])
    return vals.sort().values.float()


def linear_map(signed: bool) -> torch.Tensor:
    """Uniform int8 map: k / 127 (k = -127..127) signed, k / 255 (k = 0..255) unsigned."""
    return (torch.arange(-127, 128) / 127.0 if signed else torch.arange(0, 256) / 255.0).float()


def state_map(state_format: str, signed: bool) -> torch.Tensor:
    if state_format == "dynamic":
        return dynamic_map(signed)
    if state_format == "linear":
        return linear_map(signed)
    raise LowbitError(f"state_format: expected one of {STATE_FORMATS}, got {state_format!r}")


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, block_size: int = BLOCK_SIZE
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (codes uint8 (n_blocks * block_size,), absmax fp32 (n_blocks,))."""
    flat = x.detach().reshape(-1).float()
    n_blocks = -(-flat.numel() // block_size)
    blocks = torch.zeros(n_blocks * block_size, dtype=torch.float32, device=flat.device)
    blocks[: flat.numel()] = flat
    blocks = blocks.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    mids = (qmap[1:] + qmap[:-1]) / 2
    codes = torch.bucketize(normed.clamp(float(qmap[0]), float(qmap[-1])), mids.to(normed.device))
    return codes.to(torch.uint8).reshape(-1), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor,
                         shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of quantize_blockwise: fp32 tensor of `shape`."""
    n = math.prod(shape)
    blocks = qmap.to(absmax.device)[codes.long()].view(absmax.shape[0], -1) * absmax[:, None]
    return blocks.reshape(-1)[:n].reshape(shape)


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------
class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments live in 8 bits between steps (see the module docstring).

    decoupled_weight_decay=True is AdamW (p -= lr * wd * p); False adds wd * p to the gradient
    (Adam's L2 penalty). `Adam8bit` is this class with weight_decay 0 and coupled decay.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, state_format: str = "dynamic", block_size: int = BLOCK_SIZE,
                 min_8bit_size: int = MIN_8BIT_SIZE, decoupled_weight_decay: bool = True):
        _check_options(lr, betas, eps, weight_decay, state_format, block_size, min_8bit_size)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        state_format=state_format, block_size=block_size, min_8bit_size=min_8bit_size,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)
        self._maps: dict[tuple[str, bool], torch.Tensor] = {}

    def _map(self, fmt: str, signed: bool) -> torch.Tensor:
        key = (fmt, signed)
        if key not in self._maps:
            self._maps[key] = state_map(fmt, signed)
        return self._maps[key]

    def _is_8bit(self, p: torch.Tensor, group: dict) -> bool:
        return p.numel() >= group["min_8bit_size"]

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        st = {"step": torch.tensor(0.0)}
        if self._is_8bit(p, group):
            nb = -(-p.numel() // group["block_size"])
            for key in _STATE_KEYS:
                zero_code = int(torch.argmin(self._map(group["state_format"], key == "exp_avg").abs()))
                st[f"{key}_codes"] = torch.full((nb * group["block_size"],), zero_code, dtype=torch.uint8,
                                                device=p.device)
                st[f"{key}_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        else:
            for key in _STATE_KEYS:
                st[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return st

    def _moments(self, st: dict, p: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" in st:
            return st["exp_avg"], st["exp_avg_sq"]
        fmt = group["state_format"]
        return tuple(dequantize_blockwise(st[f"{k}_codes"], st[f"{k}_absmax"], self._map(fmt, k == "exp_avg"),
                                          tuple(p.shape)) for k in _STATE_KEYS)

    def _store(self, st: dict, m: torch.Tensor, v: torch.Tensor, group: dict) -> None:
        if "exp_avg" in st:
            return                              # fp32 moments were updated in place
        fmt, bs = group["state_format"], group["block_size"]
        for key, x in zip(_STATE_KEYS, (m, v)):
            st[f"{key}_codes"], st[f"{key}_absmax"] = quantize_blockwise(x, self._map(fmt, key == "exp_avg"), bs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise LowbitError("AdamW8bit: sparse gradients are not supported")
                if not p.is_floating_point():
                    raise LowbitError(f"AdamW8bit: parameters must be real floating point, got {p.dtype}")
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p, group))
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                pf = p.float()
                if wd and not group["decoupled_weight_decay"]:
                    g = g.add(pf, alpha=wd)
                m, v = self._moments(st, p, group)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if wd and group["decoupled_weight_decay"]:
                    pf = pf.mul(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                pf = pf.addcdiv(m, denom, value=-lr / (1 - b1 ** t))
                p.copy_(pf.to(p.dtype))
                self._store(st, m, v, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        for i, st in state_dict.get("state", {}).items():
            for key, v in st.items():
                if key.endswith("_codes") and (not torch.is_tensor(v) or v.dtype != torch.uint8):
                    raise LowbitError(f"AdamW8bit.load_state_dict: state of parameter {i}: expected {key} "
                                      f"uint8, got {getattr(v, 'dtype', type(v).__name__)}")
        # torch casts every state tensor to its parameter's float dtype; codes (0..255) survive
        # that exactly (fp32/fp16/bf16 hold integers to 256) and go back to uint8 here
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st:
                    continue
                for key in list(st):
                    if key.endswith("_codes"):
                        st[key] = st[key].to(torch.uint8)
                    elif key.endswith("_absmax"):
                        st[key] = st[key].float()
                _check_loaded_state(st, p, group, i)

    def state_bytes(self) -> int:
        """Bytes the optimizer state holds now (codes, absmaxes, fp32 moments, step counters)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if torch.is_tensor(v))


class Adam8bit(AdamW8bit):
    """Adam (L2 weight decay added to the gradient, default 0) with 8-bit block-wise state."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **options):
        options.setdefault("decoupled_weight_decay", False)
        super().__init__(params, lr, betas, eps, weight_decay, **options)


def fp32_adam_state_bytes(params) -> int:
    """What torch.optim.Adam(W) holds for `params`: two fp32 moments per value plus a step each."""
    ps = list(params)
    return sum(8 * p.numel() + 4 for p in ps)


def _check_options(lr, betas, eps, weight_decay, state_format, block_size, min_8bit_size) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise LowbitError(f"AdamW8bit lr: expected a finite number >= 0, got {lr!r}")
    if len(tuple(betas)) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise LowbitError(f"AdamW8bit betas: expected two numbers in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise LowbitError(f"AdamW8bit eps: expected a number > 0, got {eps!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise LowbitError(f"AdamW8bit weight_decay: expected a number >= 0, got {weight_decay!r}")
    if state_format not in STATE_FORMATS:
        raise LowbitError(f"AdamW8bit state_format: expected one of {STATE_FORMATS}, got {state_format!r}")
    if not (isinstance(block_size, int) and block_size > 0):
        raise LowbitError(f"AdamW8bit block_size: expected a positive integer, got {block_size!r}")
    if not (isinstance(min_8bit_size, int) and min_8bit_size >= 0):
        raise LowbitError(f"AdamW8bit min_8bit_size: expected an integer >= 0, got {min_8bit_size!r}")


def _check_loaded_state(st: dict, p: torch.Tensor, group: dict, i: int) -> None:
    """A loaded state must fit its parameter: the same 8-bit layout, block size and length."""
    where = f"AdamW8bit.load_state_dict: state of parameter {i} (shape {tuple(p.shape)})"
    if p.numel() >= group["min_8bit_size"]:
        nb = -(-p.numel() // group["block_size"])
        for key in _STATE_KEYS:
            codes, absmax = st.get(f"{key}_codes"), st.get(f"{key}_absmax")
            if codes is None or absmax is None:
                raise LowbitError(f"{where}: expected 8-bit {key}_codes / {key}_absmax, got keys {sorted(st)}")
            if codes.dtype != torch.uint8 or codes.numel() != nb * group["block_size"] or absmax.numel() != nb:
                raise LowbitError(f"{where}: expected {key}_codes uint8 ({nb * group['block_size']},) and "
                                  f"{key}_absmax ({nb},) for block_size {group['block_size']}, got "
                                  f"{codes.dtype} {tuple(codes.shape)} and {tuple(absmax.shape)}")
            if not torch.isfinite(absmax).all():
                raise LowbitError(f"{where}: {key}_absmax has NaN/inf values")
    else:
        for key in _STATE_KEYS:
            if key not in st or tuple(st[key].shape) != tuple(p.shape):
                raise LowbitError(f"{where}: expected fp32 {key} of shape {tuple(p.shape)}, got keys {sorted(st)}")
