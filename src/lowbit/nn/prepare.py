"""prepare_for_inference: swap every QuantLinear for a PackedLinear that holds only packed codes
and calls the fastest kernel available here (nn/kernels.py).

After it, the unpacked uint8 codes (one byte per weight) are gone from memory: a 4-bit weight
takes K/2 bytes per row plus (N, G) fp32 scales (and zeros). PackedLinear is still a
QuantLinear, so code that reads `module.qweight` (exporters, reports) keeps working: the codes
are unpacked on request.
"""
from __future__ import annotations

import ctypes
import gc
from collections import Counter

import torch
import torch.nn as nn

from lowbit.nn.kernels import TernaryKernel, make_kernel, token_int8
from lowbit.nn.qlinear import QuantLinear, set_submodule
from lowbit.numerics.qweight import QuantizedWeight


class PackedLinear(QuantLinear):
    """A QuantLinear whose codes live only in its kernel's packed buffers (self.packed).

    act_quant (the input-activation rounding) can be given here or set later (the native reader
    attaches it after building the layer): on a ternary weight, BitNet's int8-per-token scheme
    moves the layer onto TernaryKernel, which rounds x in C++ in the same call as the matmul."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                 backend: str = "auto", name: str = "weight", act_quant=None):
        nn.Module.__init__(self)  # QuantLinear's own qdata buffer would hold the unpacked codes
        self._init_common(qweight, bias)
        self.__dict__["_act_quant"] = act_quant
        self.__dict__["_where"] = (backend, name)
        self.packed = make_kernel(qweight, self.bias, backend, name,
                                  None if act_quant is None else act_quant.scheme)
        self._sync_w8a8()

    @property
    def act_quant(self):
        return self.__dict__.get("_act_quant")

    @act_quant.setter
    def act_quant(self, aq) -> None:
        self.__dict__["_act_quant"] = aq
        k = self._modules.get("packed") if "_modules" in self.__dict__ else None
        if (k is not None and aq is not None and not isinstance(k, TernaryKernel) and self.scheme.format == "ternary"
                and token_int8(aq.scheme)):
            backend, name = self.__dict__.get("_where", ("auto", "weight"))
            with torch.no_grad():
                new = make_kernel(self.qweight, self.bias, backend, name, aq.scheme)
            if isinstance(new, TernaryKernel):
                self.packed = new
        if k is not None:
            self._sync_w8a8()

    def _sync_w8a8(self) -> None:
        """W8A8 read from a file (int8 per-row weights, int8 inputs): on backend "auto" the layer
        runs the int8 kernel of nn/w8a8.py on its packed codes (shared where the widths allow),
        as prepare_for_inference does for a model quantized in memory; another input scheme, or
        none, puts it back on its packed kernel. An override the user set is left alone."""
        from lowbit.nn import w8a8
        cur = self.__dict__.get("_override")
        if cur is not None and not isinstance(cur, w8a8.W8A8Kernel):
            return
        self.__dict__["_override"] = None
        if self.__dict__.get("_where", ("auto",))[0] == "auto" and w8a8.eligible(self) and w8a8.backend() == "ext":
            with torch.no_grad():
                self.__dict__["_override"] = w8a8.W8A8Kernel(self, "ext")

    @property
    def backend(self) -> str:
        from lowbit.nn.w8a8 import W8A8Kernel
        return "w8a8" if isinstance(self.__dict__.get("_override"), W8A8Kernel) else self.packed.backend

    @property
    def qdata(self) -> torch.Tensor:  # unpacked on request only (exports, checks)
        return self.packed.unpack_codes()

    @property
    def kernel(self):
        return self.__dict__.get("_override") or self.packed

    def set_kernel(self, kernel) -> None:
        """Override the packed kernel with any callable (x, module) -> y; None restores it."""
        self.__dict__["_override"] = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        override = self.__dict__.get("_override")
        aq = self.__dict__.get("_act_quant")       # input activations (BitNet's int8 per token, ...)
        if override is not None:
            if aq is not None and not getattr(override, "quantizes_input", False):
                x = aq(x)
            return override(x, self)
        packed = self._modules["packed"]
        own = packed.__dict__.get("input_act")     # the scheme the kernel rounds x with itself
        if own is not None:
            if (aq is not None and aq.enabled and x.dtype == torch.float32
                    and aq.scheme == own):
                return packed.forward(x)
            return packed.forward_float(x if aq is None else aq(x))   # another rounding, or none
        if aq is not None:
            x = aq(x)
        return packed.forward(x)  # skips nn.Module.__call__ hooks: ~2 us a call

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend}"


def release_checkpoint_memory(model: nn.Module) -> None:
    """Copy the float tensors `model` still holds (embeddings, norms, a float lm_head) into
    process memory and return freed heap pages to the OS.

    transformers memory-maps safetensors checkpoints; one tensor still viewing the map keeps
    every page of it that was ever read (all the float weights quantization read) resident, so a
    4-bit model would report the float model's RSS. Tied parameters stay tied (the Parameter
    object is shared; it is copied once).
    """
    seen: set[int] = set()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, PackedLinear):
                continue
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    p.data = p.data.clone()
            for name, b in list(mod._buffers.items()):
                if b is not None and id(b) not in seen:
                    seen.add(id(b))
                    mod._buffers[name] = b.clone()
    gc.collect()
    try:  # glibc only: give back the pages quantization's temporaries left free in the heap
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def prepare_for_inference(model: nn.Module, backend: str = "auto", release_checkpoint: bool = True) -> dict:
    """Replace every QuantLinear of `model` (in place) by a PackedLinear with the fastest kernel.

    backend: "auto" (our C++ kernel where it builds and the scheme has a group form, else the
    tiled fallback; W8A8 layers keep their int8 codes and get the int8 kernel of nn/w8a8.py, counted
    as "w8a8"), or force "ext" | "torch" | "tiled". Returns {"backends": {name: count},
    "layers": n, "packed_bytes": bytes held by the kernels}. release_checkpoint: see
    release_checkpoint_memory (on by default: without it RSS stays at the float model's).
    """
    counts: Counter = Counter()
    nbytes = 0
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, QuantLinear) and not isinstance(m, PackedLinear)]
    from lowbit.nn import w8a8
    w8 = []
    with torch.no_grad():
        for name, mod in targets:
            if backend == "auto" and w8a8.eligible(mod) and w8a8.backend() == "ext":
                # W8A8 (int8 weights per channel, int8 inputs): the layer keeps its u8 codes and gets
                # the int8 kernel (nn/w8a8.py), attached below once its buffers are final
                w8.append(mod)
                counts["w8a8"] += 1
                nbytes += mod.qdata.numel() + mod.scale.numel() * 4
                continue
            # input-activation quantization stays as it was (and picks the ternary kernel for BitNet)
            packed = PackedLinear(mod.qweight, mod.bias, backend, name, act_quant=mod.act_quant)
            set_submodule(model, name, packed)
            counts[packed.backend] += 1
            nbytes += packed.packed.nbytes()
    if release_checkpoint and targets:
        release_checkpoint_memory(model)
    with torch.no_grad():
        for mod in w8:
            mod.set_kernel(w8a8.W8A8Kernel(mod, "ext"))
    return {"backends": dict(counts), "layers": len(targets), "packed_bytes": nbytes}
