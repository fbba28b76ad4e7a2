"""Our own forward step for Llama-family decoders: fewer calls per token than the HF forward.

Per block it makes one kernel call for the packed linears that read the same input (q/k/v,
gate/up: their codes and scales are concatenated along the rows once, and the original modules
keep views of the fused buffers, so memory does not grow), writes K/V into a preallocated cache
(no torch.cat per token), and at decode runs 3 small C++ ops (nn/ext/step_ops.cpp: residual add
+ rms norm, rope + cache write, silu * up) where the HF block runs ~60 ATen ops plus its Python
(cache classes, masks, kwargs plumbing). The arithmetic is the HF block's, op for op (rms norm in fp32, rotary embedding,
scaled-dot-product attention, silu(gate) * up), so logits agree with the HF forward to fp32
summation order (tests/test_step.py); the fused call gives the unfused calls' outputs exactly,
because every kernel computes each output row on its own.

    x = embed[ids]                                            (M, D), M = tokens of this step
    per block:  h = norm(x);  q|k|v = W_qkv h;  rope(q, k) at positions p..p+M-1
                K[:, p:p+M], V[:, p:p+M] = k, v   (cache (Hkv, T, hd) per block, T fixed)
                x += W_o sdpa(q, K[:, :p+M], V[:, :p+M]);  h = norm(x);  g|u = W_gu h
                x += W_down (silu(g) * u)
    logits = lm_head(norm(x[-1]))

Used by lowbit.nn.decode.generate and lowbit.eval.speed when `step_model(model)` accepts the
model (model_type llama / mistral / qwen2 without sliding windows, silu MLP, no q/k norms);
otherwise they run the HF forward, as before.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.numerics.activation import ActScheme, act_scale, quantize_act

MODEL_TYPES = ("llama", "mistral", "qwen2")
# tokens per step up to which the block's small ops run in nn/ext/step_ops.cpp (single-threaded,
# scalar exp: right for decode; a 128-token prefill is faster in torch's vectorised ops)
OPS_MAX_M = 4


def _ext_kernel(mod: nn.Module):
    """The ExtKernel a linear runs on, or None (float linear, other backend, kernel override)."""
    from lowbit.nn.kernels import ExtKernel
    from lowbit.nn.prepare import PackedLinear
    if isinstance(mod, PackedLinear) and mod.__dict__.get("_override") is None:
        k = mod._modules.get("packed")
        return k if isinstance(k, ExtKernel) else None
    return None


class FusedRows:
    """Linears sharing one input, called once: x (M, K) -> (M, sum of out_features).

    ext kernels with the same container / group size / table / activation mode: their codes,
    scales and zeros are concatenated along the rows and each kernel is pointed at its slice.
    Anything else (float nn.Linear, torch / tiled kernels, overrides, mixed kinds) is called one
    by one and concatenated: float weights stay separate tensors, because views of one storage
    would be counted once by storage-keyed accounting (eval.size) and refused by safetensors.
    """

    def __init__(self, mods: list[nn.Module]):
        self.mods = mods
        self.sizes = [int(m.out_features) for m in mods]
        self.kind = "separate"
        self.bias = None
        kerns = [_ext_kernel(m) for m in mods]
        # input-activation quantization (BitNet's int8 per token, ...): one dynamic scheme shared
        # by every linear of the group is applied once to the shared input; anything else (static
        # per-layer scales, LLM.int8(), a mix) keeps the linears separate, each its own forward
        acts = [getattr(m, "act_quant", None) for m in mods]
        self.acts = acts
        self.in_act = acts[0] if all(a is not None and a.scheme.dynamic and a.scheme.outlier_threshold is None
                                  and a.scheme == acts[0].scheme for a in acts) else None
        shared = self.in_act is not None or all(a is None for a in acts)
        # a kernel that rounds x itself (TernaryKernel: BitNet's int8 per token) fuses only with
        # that same scheme on every linear; then the group's rounding is the kernel's, not torch's
        own = [k.__dict__.get("input_act") if k is not None else None for k in kerns]
        self.self_round = own[0] is not None
        if own[0] is not None and not (self.in_act is not None and all(o == self.in_act.scheme for o in own)):
            shared = False
        if shared and all(k is not None for k in kerns) and self._ext_compatible(kerns):
            self._fuse_ext(kerns)
            if any(m.bias is not None for m in mods):   # + 0.0 where a linear has none
                self.bias = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(n)
                                       for m, n in zip(mods, self.sizes)])

    @staticmethod
    def _ext_compatible(kerns) -> bool:
        k0 = kerns[0]
        return all(type(k) is type(k0) and k.layout == k0.layout
                   and k.perm is None and k.k_pad == k.in_features and k.in_features == k0.in_features
                   and k.nibble == k0.nibble and k.group_size == k0.group_size and k.q8_flags() == k0.q8_flags()
                   and torch.equal(k.lut, k0.lut) and (k.zero is None) == (k0.zero is None)
                   and k.codes.dtype == k0.codes.dtype for k in kerns)

    def _fuse_ext(self, kerns) -> None:
        if len(kerns) > 1:
            codes = torch.cat([k.codes for k in kerns])
            scale = torch.cat([k.scale for k in kerns])
            zero = None if kerns[0].zero is None else torch.cat([k.zero for k in kerns])
            r0 = 0
            for k, n in zip(kerns, self.sizes):   # the modules keep views: no second copy
                k.codes, k.scale = codes[r0:r0 + n], scale[r0:r0 + n]
                if zero is not None:
                    k.zero = zero[r0:r0 + n]
                k.__dict__.pop("_args", None)
                r0 += n
        else:
            codes, scale, zero = kerns[0].codes, kerns[0].scale, kerns[0].zero
        k0 = kerns[0]
        self.op, self.args = k0.fused_call(codes, scale, zero)
        self.kerns, self.q8 = kerns, k0.q8_flags()
        self.kind = "ext"

    def valid(self) -> bool:
        """False once a module was changed under us (e.g. model.to(), a new kernel, another
        act_quant)."""
        if any(getattr(m, "act_quant", None) is not a for m, a in zip(self.mods, self.acts)):
            return False
        if self.kind == "ext":
            return all(_ext_kernel(m) is k for m, k in zip(self.mods, self.kerns)) and all(
                k.codes.untyped_storage().data_ptr() == self.args[0].untyped_storage().data_ptr()
                and k.q8_flags() == self.q8 for k in self.kerns)   # set_*_activations change it
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "ext":
            if self.self_round:         # the kernel rounds fp32 x itself; anything else: one by one
                if x.dtype != torch.float32 or not self.in_act.enabled:
                    ys = [m(x) for m in self.mods]
                    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
            elif self.in_act is not None:
                x = self.in_act(x)
            xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
            y = self.op(xf, *self.args)
            if self.bias is not None:
                y = y + self.bias
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        ys = [m(x) for m in self.mods]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _linears(layer: nn.Module) -> list[nn.Module]:
    return [layer.get_submodule(n) for n in _LINEARS]


class _Block:
    def __init__(self, layer: nn.Module):
        self.layer, self.mods = layer, _linears(layer)
        a, m = layer.self_attn, layer.mlp
        self.ln1, self.eps1 = layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon)
        self.ln2, self.eps2 = layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon)
        self.qkv = FusedRows([a.q_proj, a.k_proj, a.v_proj])
        self.o = FusedRows([a.o_proj])
        self.gate_up = FusedRows([m.gate_proj, m.up_proj])
        self.down = FusedRows([m.down_proj])
        self.fused = (self.qkv, self.o, self.gate_up, self.down)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm, op for op (fp32 statistics, weight applied in the input dtype)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def why_unsupported(model: nn.Module) -> str | None:
    """None if StepModel runs `model`, else the reason (the caller then uses the HF forward)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in MODEL_TYPES:
        return f"model_type {mt!r} (step path covers {', '.join(MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "MLP is not silu(gate) * up without bias"
    if getattr(cfg, "use_sliding_window", False) or (mt == "mistral" and getattr(cfg, "sliding_window", None)):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
        return "no model.layers / rotary_emb / embed_tokens"
    for layer in layers:
        a = getattr(layer, "self_attn", None)
        if a is None or any(hasattr(a, n) for n in ("q_norm", "k_norm")) or not hasattr(layer, "mlp"):
            return "attention with q/k norms or a block without self_attn / mlp"
        if getattr(a.o_proj, "bias", None) is not None:
            return "o_proj with bias"
    return None


class StepModel:
    """model -> step(ids (M,), pos, cache) -> logits of the last position (vocab,)."""

    def __init__(self, model: nn.Module):
        why = why_unsupported(model)
        if why:
            raise LowbitError(f"step path: unsupported model: {why}")
        cfg, inner = model.config, model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.norm_w, self.norm_eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        self.lm_head = model.lm_head
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.scaling = float(getattr(inner.layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        self.blocks = [_Block(layer) for layer in inner.layers]
        self.dtype = self.embed.weight.dtype
        self._rope_len = 0
        self.use_ops = True   # nn/ext/step_ops.cpp for fp32 models (False: plain torch, for tests)

    def valid(self) -> bool:
        """False once the model's modules or tensors changed (quantized, .to(), new kernels)."""
        inner = self.model.model
        if (self.model.lm_head is not self.lm_head or inner.embed_tokens is not self.embed
                or self.embed.weight.dtype != self.dtype or len(inner.layers) != len(self.blocks)):
            return False
        return all(b.layer is layer and all(x is y for x, y in zip(b.mods, _linears(layer)))
                   and all(f.valid() for f in b.fused) for b, layer in zip(self.blocks, inner.layers))

    def new_cache(self, length: int, kv: str | None = None) -> "KVCache":
        """A cache for `length` positions; kv: None / "float" (the model's dtype), "int8" or "fp8"
        (codes + one fp32 scale per head and position; see KVCache)."""
        return KVCache(len(self.blocks), self.kv_heads, length, self.head_dim, self.dtype, kv)

    def _rope(self, length: int) -> None:
        if length <= self._rope_len:
            return
        n = max(length, 2 * self._rope_len)
        pos = torch.arange(n)[None]
        dummy = torch.zeros(1, 1, self.head_dim, dtype=self.dtype)
        cos, sin = self.model.model.rotary_emb(dummy, pos)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self._rope_len = n

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, pos: int, cache: "KVCache", all_logits: bool = False) -> torch.Tensor:
        """Run ids (M,) at positions pos..pos+M-1 -> the last position's logits (vocab,), or every
        position's (M, vocab) with all_logits (long-context evaluation, eval/kvcache.py)."""
        m = int(ids.numel())
        end = pos + m
        if end > cache.length:
            raise LowbitError(f"step path: KV cache holds {cache.length} positions, step needs {end}")
        self._rope(end)
        cos, sin = self.cos[pos:end], self.sin[pos:end]        # (M, hd)
        H, G, hd = self.heads, self.kv_heads, self.head_dim
        half = hd // 2
        mask = None
        causal = m > 1 and pos == 0
        if m > 1 and pos > 0:   # a chunk after earlier tokens: row i sees columns <= pos + i
            mask = torch.arange(end)[None] <= (pos + torch.arange(m))[:, None]
        x = self.embed.weight[ids.reshape(-1)]                  # (M, D), a new tensor we own
        ops = self._fused_ops() if m <= OPS_MAX_M else None
        if ops is not None:
            return self._step_fused_ops(ops, x, pos, end, cos, sin, mask, causal, cache, all_logits)
        direct = m == 1 and H <= 16 * G and cache.direct()        # decode: attend on the codes
        for li, b in enumerate(self.blocks):
            h = _rms(x, b.ln1, b.eps1)
            qkv = b.qkv(h)
            qk = qkv[:, :(H + G) * hd].view(m, H + G, hd).transpose(0, 1)    # (H+G, M, hd)
            rot = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rot * sin
            kc, vc = cache.layer(li, pos, past=not direct)                     # (G, T, hd)
            kc[:, pos:end] = qk[H:]
            vc[:, pos:end] = qkv[:, (H + G) * hd:].view(m, G, hd).transpose(0, 1)
            cache.commit(li, pos, end, scratch=not direct)
            att = (cache.attend(li, qk[:H, 0], end, self.scaling).reshape(1, H * hd) if direct
                   else self._attend(qk[:H], kc, vc, end, mask, causal))
            x = x + b.o(att)
            gu = b.gate_up(_rms(x, b.ln2, b.eps2))
            inter = gu.shape[-1] // 2
            x = x + b.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        cache.pos = end
        if all_logits:
            return self.lm_head(_rms(x, self.norm_w, self.norm_eps))
        return self.lm_head(_rms(x[-1:], self.norm_w, self.norm_eps))[0]

    def _attend(self, q, kc, vc, end, mask, causal) -> torch.Tensor:
        """q (H, M, hd) against the cache's first `end` positions -> (M, H * hd)."""
        att = F.scaled_dot_product_attention(q[None], kc[None, :, :end], vc[None, :, :end],
                                             attn_mask=mask, is_causal=causal, scale=self.scaling,
                                             enable_gqa=self.kv_heads != self.heads)
        return att[0].transpose(0, 1).reshape(q.shape[1], self.heads * self.head_dim)

    def _fused_ops(self):
        """torch.ops.lowbit_cpu when its block ops can run this model (fp32, extension loaded)."""
        if self.dtype != torch.float32 or not self.use_ops:
            return None
        from lowbit.nn import ext
        return torch.ops.lowbit_cpu if ext.load() and hasattr(torch.ops.lowbit_cpu, "rope_kv") else None

    def _step_fused_ops(self, ops, x, pos, end, cos, sin, mask, causal, cache, all_logits=False) -> torch.Tensor:
        # the same block with nn/ext/step_ops.cpp: residual add + norm, rope + cache write, silu * up
        H, G = self.heads, self.kv_heads
        nb = len(self.blocks)
        h = ops.add_rms_norm(x, None, self.blocks[0].ln1, self.blocks[0].eps1)
        direct = x.shape[0] == 1 and H <= 16 * G and cache.direct()
        for li, b in enumerate(self.blocks):
            kc, vc = cache.layer(li, pos, past=not direct)
            q = ops.rope_kv(b.qkv(h), cos, sin, kc, vc, pos, H, G)
            cache.commit(li, pos, end, scratch=not direct)
            att = (cache.attend(li, q[:, 0], end, self.scaling).reshape(1, -1) if direct
                   else self._attend(q, kc, vc, end, mask, causal))
            h = ops.add_rms_norm(x, b.o(att), b.ln2, b.eps2)
            nxt = self.blocks[li + 1] if li + 1 < nb else None
            w, eps = (nxt.ln1, nxt.eps1) if nxt is not None else (self.norm_w, self.norm_eps)
            h = ops.add_rms_norm(x, b.down(ops.silu_mul(b.gate_up(h))), w, eps)
        cache.pos = end
        return self.lm_head(h) if all_logits else self.lm_head(h[-1:])[0]


KV_FORMATS = {"int8": "int8", "fp8": "fp8_e4m3"}     # --kv-cache name -> ActScheme format


class KVCache:
    """Preallocated keys / values for every block; `pos` positions filled so far.

    kv None / "float": (layers, kv_heads, length, head_dim) in the model's dtype, read and written
    in place. kv "int8" / "fp8": each key / value row (one head, one position, head_dim values)
    is stored as codes (int8, or float8 e4m3) with one fp32 scale, absmax / 127 (448): dynamic per
    token and head, the rounding of numerics/activation.py (round half to even, clamp; e4m3
    round to nearest). Then a block's step dequantizes the stored rows into one float scratch
    shared by all blocks (layer), the new rows are written there, rounded into the store and
    replaced by what the store now holds (commit): attention reads exactly what the cache keeps,
    the new tokens included. The store is ~1/4 (int8, fp8) of an fp32 cache plus 4 bytes per row;
    the scratch is one block's float K and V.
    """

    def __init__(self, layers: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 kv: str | None = None):
        self.length, self.pos = length, 0
        self.kv = None if kv in (None, "float") else kv
        if self.kv is None:
            self.k = torch.empty(layers, kv_heads, length, head_dim, dtype=dtype)
            self.v = torch.empty(layers, kv_heads, length, head_dim, dtype=dtype)
            return
        if self.kv not in KV_FORMATS:
            raise LowbitError(f"KV cache: expected float | {' | '.join(KV_FORMATS)}, got {kv!r}")
        self.scheme = ActScheme(format=KV_FORMATS[self.kv], dynamic=True, granularity="token")
        code = torch.int8 if self.kv == "int8" else torch.float8_e4m3fn
        self.kq = torch.empty(layers, kv_heads, length, head_dim, dtype=code)
        self.vq = torch.empty(layers, kv_heads, length, head_dim, dtype=code)
        self.ks = torch.empty(layers, kv_heads, length, 1, dtype=torch.float32)
        self.vs = torch.empty(layers, kv_heads, length, 1, dtype=torch.float32)
        self.k = torch.empty(1, kv_heads, length, head_dim, dtype=dtype)    # the scratch
        self.v = torch.empty(1, kv_heads, length, head_dim, dtype=dtype)
        # kv_attend reads the codes as bytes and decodes them by this table (e4m3's two NaN codes,
        # never stored, as 0)
        bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        self._lut = torch.nan_to_num(bits.view(code).float(), nan=0.0)
        self._u8 = (self.kq.view(torch.uint8), self.vq.view(torch.uint8))

    def direct(self) -> bool:
        """True where a decode step attends on the codes (lowbit_cpu.kv_attend: quantized cache,
        C++ kernels loaded, head_dim a multiple of 16 up to 256, at most 16 query heads per kv
        head); then layer(past=False) skips dequantizing the stored rows."""
        d = self.__dict__.get("_direct")
        if d is None:
            d = False
            if self.kv is not None and self.k.dtype == torch.float32:
                from lowbit.nn import ext
                hd = self.k.shape[-1]
                d = bool(ext.load() and hasattr(torch.ops.lowbit_cpu, "kv_attend") and hd % 16 == 0 and hd <= 256)
            self._direct = d
        return d

    def attend(self, li: int, q: torch.Tensor, end: int, scaling: float) -> torch.Tensor:
        """One decode position's attention, q (H, hd) fp32 -> (H, hd), on block li's codes."""
        kq, vq = self._u8
        return torch.ops.lowbit_cpu.kv_attend(q.contiguous(), kq[li], self.ks[li], vq[li], self.vs[li], self._lut,
                                              self.kv == "int8", end, scaling)

    def layer(self, li: int, pos: int, past: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Block li's (K, V) float buffers (kv_heads, length, head_dim), positions < pos filled
        (past=False: only the rows this step writes are meaningful)."""
        if self.kv is None:
            return self.k[li], self.v[li]
        kc, vc = self.k[0], self.v[0]
        if pos and past:
            for buf, codes, scales in ((kc, self.kq, self.ks), (vc, self.vq, self.vs)):
                if codes.dtype == torch.int8:
                    torch.mul(codes[li, :, :pos], scales[li, :, :pos], out=buf[:, :pos])
                else:   # no type promotion for float8: convert, then scale in place
                    buf[:, :pos].copy_(codes[li, :, :pos]).mul_(scales[li, :, :pos])
        return kc, vc

    def commit(self, li: int, pos: int, end: int, scratch: bool = True) -> None:
        """Round block li's new rows pos..end-1 into the store; with `scratch` the scratch then
        holds their dequantized values (for sdpa; a decode step on kv_attend reads the store).
        NaN/inf keys or values are refused with the block named."""
        if self.kv is None:
            return
        for buf, codes, scales, what in ((self.k[0], self.kq, self.ks, "keys"), (self.v[0], self.vq, self.vs, "values")):
            x = buf[:, pos:end].float()
            if not bool(torch.isfinite(x).all()):   # act_scale would hide a NaN row (scale 1)
                raise LowbitError(f"KV cache: block {li}'s {what} at positions {pos}..{end - 1} contain NaN/inf")
            s = act_scale(x, self.scheme)
            q = quantize_act(x, s, self.scheme)
            codes[li, :, pos:end] = q
            scales[li, :, pos:end] = s
            if scratch:
                buf[:, pos:end] = (q.float() * s).to(buf.dtype)

    def nbytes(self) -> int:
        """Bytes the cache keeps across steps (the store; the float scratch not counted)."""
        ts = (self.k, self.v) if self.kv is None else (self.kq, self.vq, self.ks, self.vs)
        return sum(t.numel() * t.element_size() for t in ts)

    def scratch_bytes(self) -> int:
        return 0 if self.kv is None else sum(t.numel() * t.element_size() for t in (self.k, self.v))


def step_model(model: nn.Module, enable: bool | None = None) -> StepModel | None:
    """The model's StepModel (built once, kept on the model, rebuilt if its linears changed), or
    None when `enable` is False, or it is None / True and the model is not supported (True raises
    LowbitError instead)."""
    if enable is False:
        return None
    why = why_unsupported(model)
    if why:
        if enable:
            raise LowbitError(f"step path: unsupported model: {why}")
        return None
    sm = model.__dict__.get("_lowbit_step")
    if sm is None or not sm.valid():
        sm = StepModel(model)
        model.__dict__["_lowbit_step"] = sm
    return sm
