"""4-bit (NF4 / FP4) and 8-bit linears as bitsandbytes users know them, and the explicit call that
puts them in a model (`quantize_model`, which api.load(quantization=...) uses).

    cfg = BnbConfig("nf4", double_quant=True, compute_dtype=torch.float32, block_size=64)
    report = quantize_model(model, cfg)          # every nn.Linear but lm_head -> Linear4bit, in place
    memory_footprint(model)                      # bytes of every parameter and buffer

Linear4bit holds exactly bitsandbytes' tensors (numerics/bnb4.py): packed codes, the absmax
constants (float32, or uint8 + nested_absmax + nested_quant_map + offset with double quant) and
the code table. Its forward dequantizes the weight to compute_dtype and runs F.linear; the weight
is frozen (no gradient), but gradients flow to the input, so LoRA adapters (train/lora.py) train
on top of it. The backward dequantizes again instead of keeping the float weight alive between
forward and backward (bitsandbytes' MatMul4Bit does the same), so a frozen 4-bit base costs its
packed bytes, not a float copy per layer, during training.

Linear8bit is bitsandbytes' LLM.int8() weight layout (Dettmers et al. 2022, arXiv:2208.07339):
int8 codes per output row, CB = round(W * 127 / SCB), SCB = max |W| over the row (float32). Our
forward dequantizes the weight (CB * SCB / 127) and multiplies in float; bitsandbytes' forward also
quantizes the activations (int8 per token, outlier columns above threshold 6.0 kept in fp16).

Nothing here quantizes as a side effect: .to(dtype) / .half() move these modules' buffers between
devices but never change their dtypes (the absmax constants stay float32, codes stay uint8/int8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.numerics import bnb4 as nb

QUANTIZATIONS = ("nf4", "fp4", "int8")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def as_dtype(d, what: str = "compute_dtype") -> torch.dtype:
    if isinstance(d, torch.dtype) and d in _DTYPES.values():
        return d
    if isinstance(d, str) and d in _DTYPES:
        return _DTYPES[d]
    raise LowbitError(f"{what} {d!r}: expected one of {', '.join(_DTYPES)}")


@dataclass(frozen=True)
class BnbConfig:
    """What transformers' BitsAndBytesConfig holds, by the names bitsandbytes users know:
    quantization nf4 | fp4 (load_in_4bit, bnb_4bit_quant_type) or int8 (load_in_8bit);
    double_quant (bnb_4bit_use_double_quant); compute_dtype (bnb_4bit_compute_dtype);
    block_size (bitsandbytes' blocksize, 64); skip (module names kept in float; lm_head always)."""
    quantization: str = "nf4"
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    block_size: int = 64
    skip: tuple[str, ...] = ()

    def check(self) -> "BnbConfig":
        if self.quantization not in QUANTIZATIONS:
            raise LowbitError(f"quantization {self.quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
        as_dtype(self.compute_dtype)
        if not isinstance(self.block_size, int) or self.block_size < 2 or self.block_size & (self.block_size - 1):
            raise LowbitError(f"block_size {self.block_size!r}: expected a power of two >= 2 (bitsandbytes: 64)")
        if self.quantization == "int8" and self.double_quant:
            raise LowbitError("double_quant: applies to 4-bit quantization (nf4/fp4), not int8")
        return self


class _KeepDtypes(nn.Module):
    """Quantized buffers follow device moves, never dtype casts (GUIDE rule 4)."""
    _quant_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        held = {k: self._buffers.pop(k) for k in self._quant_buffers if k in self._buffers}
        super()._apply(fn, recurse)
        dev = fn(torch.empty(0, dtype=torch.uint8)).device
        for k, v in held.items():
            self._buffers[k] = v if v is None else v.to(dev)
        return self


class _DequantMatmul(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly; grad_x = g W (W dequantized again), no grad_W."""

    @staticmethod
    def forward(ctx, x, mod):
        ctx.mod = mod
        return F.linear(x, mod.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.mod.dequantize(g.dtype), None


class Linear4bit(_KeepDtypes):
    """bitsandbytes' Linear4bit tensors with a dequantize-then-matmul forward."""
    _quant_buffers = ("weight_packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")

    def __init__(self, in_features: int, out_features: int, *, quant_type: str, block_size: int,
                 packed: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None = None,
                 nested: dict | None = None, compute_dtype: torch.dtype = torch.float32,
                 weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.quant_type, self.block_size = quant_type, int(block_size)
        self.compute_dtype, self.weight_dtype = as_dtype(compute_dtype), as_dtype(weight_dtype, "weight dtype")
        n = self.in_features * self.out_features
        if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
            raise LowbitError(f"weight: expected {(n + 1) // 2} uint8 bytes of packed 4-bit codes for "
                              f"({self.out_features}, {self.in_features}), got {packed.dtype} with {packed.numel()}")
        nblocks = (n + self.block_size - 1) // self.block_size
        if absmax.numel() != nblocks or absmax.dtype not in (torch.float32, torch.uint8):
            raise LowbitError(f"absmax: expected {nblocks} float32 (or uint8 double-quantized) values, "
                              f"got {absmax.dtype} with {absmax.numel()}")
        if (absmax.dtype == torch.uint8) != (nested is not None):
            raise LowbitError("absmax: uint8 codes need the nested_absmax / nested_quant_map / offset of double "
                              "quantization, and float32 absmax must come without them")
        self.register_buffer("weight_packed", packed.reshape(-1).contiguous())
        self.register_buffer("absmax", absmax.reshape(-1).contiguous())
        self.register_buffer("quant_map", nb.code_table(quant_type))
        for k in ("nested_absmax", "nested_quant_map", "nested_offset"):
            self.register_buffer(k, None)
        if nested is not None:
            self.nested_absmax = nested["nested_absmax"].reshape(-1).float().contiguous()
            self.nested_quant_map = nested["nested_quant_map"].reshape(-1).float().contiguous()
            self.nested_offset = torch.as_tensor(nested["offset"], dtype=torch.float32).reshape(())
            nb.undo_double_quant(self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @classmethod
    def from_linear(cls, lin: nn.Linear, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False,
                    compute_dtype: torch.dtype = torch.float32, name: str = "weight") -> "Linear4bit":
        w = lin.weight.detach()
        packed, absmax = nb.quantize_4bit(w, quant_type, block_size, what=f"{name}.weight")
        nested = nb.double_quantize(absmax) if double_quant else None
        return cls(lin.in_features, lin.out_features, quant_type=quant_type, block_size=block_size,
                   packed=packed, absmax=nested["absmax"] if nested else absmax, bias=lin.bias, nested=nested,
                   compute_dtype=compute_dtype, weight_dtype=w.dtype if w.is_floating_point() else torch.float32)

    def absmax_float(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        return nb.undo_double_quant(self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) as bitsandbytes dequantizes it: table[code] * absmax in float32,
        cast to the original weight dtype, then to `dtype` (default compute_dtype)."""
        w = nb.dequantize_4bit(self.weight_packed, self.absmax_float(), (self.out_features, self.in_features),
                               self.quant_type, self.block_size, self.weight_dtype)
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xc = x.to(self.compute_dtype)
        y = _DequantMatmul.apply(xc, self)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.to(dt)

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers()) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}, "
                f"compute_dtype={dtype_name(self.compute_dtype)}")


class Linear8bit(_KeepDtypes):
    """LLM.int8() weights: CB int8 (out, in), SCB float32 (out,) = row absmax; W = CB * SCB / 127."""
    _quant_buffers = ("weight_int8", "SCB")

    def __init__(self, in_features: int, out_features: int, *, cb: torch.Tensor, scb: torch.Tensor,
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = as_dtype(compute_dtype)
        if cb.dtype != torch.int8 or tuple(cb.shape) != (self.out_features, self.in_features):
            raise LowbitError(f"weight: expected int8 {(self.out_features, self.in_features)}, got {cb.dtype} "
                              f"{tuple(cb.shape)}")
        if scb.numel() != self.out_features or not bool(torch.isfinite(scb.float()).all()):
            raise LowbitError(f"SCB: expected {self.out_features} finite row scales, got {scb.numel()}")
        self.register_buffer("weight_int8", cb.contiguous())
        self.register_buffer("SCB", scb.reshape(-1).float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, compute_dtype: torch.dtype = torch.float32, name: str = "weight"):
        w = lin.weight.detach().float()
        nb._check_finite(w, f"{name}.weight")
        scb = w.abs().amax(dim=1)
        # bitsandbytes' int8_vectorwise_quant: round(W * (127 / absmax)); an all-zero row stays 0
        cb = torch.round(w * (127.0 / scb.clamp(min=1e-38)).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        return cls(lin.in_features, lin.out_features, cb=cb, scb=scb, bias=lin.bias, compute_dtype=compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight_int8.float() * (self.SCB / 127.0).unsqueeze(1)).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        y = _DequantMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.to(dt)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


BNB_MODULES = (Linear4bit, Linear8bit)


def bnb_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BNB_MODULES)}


def skipped_modules(model: nn.Module, skip=()) -> set[str]:
    """lm_head (and every module tied to the input embedding) stays in float, as transformers'
    bitsandbytes quantizer keeps it (get_keys_to_not_convert), plus the names in `skip`."""
    out = set(skip)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for n, m in model.named_modules():
        if m is head:
            out.add(n)
    return out


def quantize_model(model: nn.Module, cfg: BnbConfig, progress: bool = False) -> dict:
    """Replace every nn.Linear of `model` (but lm_head and cfg.skip) by Linear4bit / Linear8bit, in
    place. -> {"layers": n, "bytes_before": ..., "bytes_after": ..., "double_quant_bytes_saved": ...}."""
    from lowbit.nn.qlinear import set_submodule
    cfg.check()
    skip = skipped_modules(model, cfg.skip)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip
               and not any(n == s or n.startswith(s + ".") for s in skip)]
    if not targets:
        raise LowbitError(f"quantization {cfg.quantization!r}: the model has no nn.Linear to quantize "
                          "(already quantized, or every linear skipped)")
    before = memory_footprint(model)
    saved = 0
    with torch.no_grad():
        for name, lin in targets:
            if cfg.quantization == "int8":
                new = Linear8bit.from_linear(lin, cfg.compute_dtype, name=name)
            else:
                new = Linear4bit.from_linear(lin, cfg.quantization, cfg.block_size, cfg.double_quant,
                                             cfg.compute_dtype, name=name)
                if cfg.double_quant:
                    nbk = new.absmax.numel()
                    saved += nbk * 4 - (nbk + new.nested_absmax.numel() * 4 + 4 + 256 * 4)
            set_submodule(model, name, new)
    return {"layers": len(targets), "skipped": sorted(skip), "bytes_before": before,
            "bytes_after": memory_footprint(model), "double_quant_bytes_saved": saved,
            "config": {"quantization": cfg.quantization, "double_quant": cfg.double_quant,
                       "compute_dtype": dtype_name(as_dtype(cfg.compute_dtype)), "block_size": cfg.block_size}}


def memory_footprint(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage once: transformers'
    `get_memory_footprint(return_buffers=True)` (which counts parameters and buffers by
    nelement * element_size). For a bitsandbytes 4-bit model transformers' figure omits the absmax
    constants (they live in quant_state, neither parameter nor buffer); ours holds them as buffers,
    so they count."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
