"""ONNX for onnxruntime: the quantized decoder as one graph, every quantized linear a
com.microsoft MatMulNBits node, with a KV cache, run by onnxruntime's CPU execution provider.

    DIR/
      model.onnx              the graph (opset 21 + com.microsoft contrib ops)
      model.onnx.data         every initializer (ONNX external data, one file; no 2 GB protobuf limit)
      config.json, tokenizer  the source model's (export.common.copy_model_files)
      lowbit_manifest.json    export/manifest.py's fields; layers say op, bits, block_size

Graph inputs / outputs, in onnxruntime-genai's names and layout (BNSH cache):

    input_ids                 int64  (batch, seq)
    attention_mask            int64  (batch, past + seq)   ones; its row sums give GQA's seqlens_k
    past_key_values.{i}.key   float  (batch, kv_heads, past, head_dim)   past = 0 on the first call
    past_key_values.{i}.value float  (batch, kv_heads, past, head_dim)
    logits                    float  (batch, seq, vocab)
    present.{i}.key / .value  float  (batch, kv_heads, past + seq, head_dim)

One Llama-family block (llama, mistral without a sliding window, qwen2), as nodes:

    h ─ SkipSimplifiedLayerNormalization(input_layernorm) ─ x      (skip: the residual sum, fp32)
    x ─ MatMulNBits qkv_proj (q|k|v rows stacked, + Add bias) ─ GroupQueryAttention(packed qkv,
        do_rotary, rotate_half layout, cos/sin caches = cos/sin(pos * the model's inv_freq) *
        attention_scaling, causal) ─ MatMulNBits o_proj
    ─ SkipSimplifiedLayerNormalization(post_attention_layernorm, adds the residual) ─ x2
    x2 ─ MatMulNBits gate_up_proj ─ Split ─ gate ─ gate * Sigmoid(gate) ─┐
                                          └ up ───────────────────────────┴ Mul ─ MatMulNBits down_proj

q/k/v (and gate/up) are one MatMulNBits when their schemes share bits, block size and zero-point
presence (else, or with fuse=False, one node each): each output row is the same dot product
either way, so fusing changes no number; it saves kernel calls, which batch-1 decode is bound by.
    final: SkipSimplifiedLayerNormalization(model.norm) ─ lm_head (MatMulNBits, or Gemm transB on
    the float embedding table it is tied to: the table is stored once)

MatMulNBits (onnxruntime docs/ContribOperators.md, com.microsoft.MatMulNBits; conventions checked
by running onnxruntime 1.32 here, tests/test_export_onnx.py): Y = A @ dequant(B)^T with attributes
K (in), N (out), bits, block_size (a power of two >= 16); along K, blocks of block_size codes:

    B            uint8 (N, n_blocks, blob)    n_blocks = ceil(K / block_size), blob = block_size*bits/8
    scales       float (N * n_blocks)         row-major (row n, block b)
    zero_points  uint8 (N * ceil(n_blocks*bits/8))  packed like the codes, each row padded to a byte;
                                              absent = 2^(bits-1) (8 for 4 bits: our symmetric zero)
    w[n, k] = (code[n, k] - zero[n, k // block_size]) * scale[n, k // block_size]

Codes are packed low bits first, along K, within each byte (4-bit shown):

    byte j of a row:   bit 7 ... 4 | 3 ... 0        2-bit: c[4j] bits 1..0, c[4j+1] bits 3..2, ...
                          c[2j+1]  |  c[2j]         8-bit: one code per byte

Our int schemes map exactly: asymmetric integer zero points as they are, symmetric ones
zero = 2^(bits-1) (the input is then omitted). A ragged last group (576 columns at g128 =
4 x 128 + 64) is held as it is: onnxruntime accepts K not a multiple of block_size and reads only
K values of A; the codes past K are written as the block's zero point, so each contributes
exactly 0 whatever runs it. Per-channel schemes repeat the row's scale and zero in every block
of a block size that divides K (576 -> 64, 1536 -> 256; same arithmetic, no padded codes).
bits 2, 4 and 8 are what MatMulNBits has (onnxruntime 1.32's CPU kernels for 2 and 8 bits at
fp32 accuracy are 25-70x slower a call than its 4-bit one, measured: BENCHMARKS.md); other widths,
non-int formats (nf4, fp8, ggml blocks), block granularity, a non power of two group size and
act-order g_idx that is not the identity are refused, naming the tensor.

Everything that is not a quantized linear stays fp32 (norm weights, the embedding table, which
a quantized embedding holds dequantized, as our model serves it).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.export import Format, register_format

FORMAT = "onnx"
MODEL = "model.onnx"
DATA = "model.onnx.data"
OPSET = 21
SIZE_THRESHOLD = 1024                    # initializers at least this big go to DATA (onnx's rule)
MNB_BITS = (2, 4, 8)                     # the widths MatMulNBits holds (onnxruntime >= 1.20 CPU)
MODEL_TYPES = ("llama", "mistral", "qwen2")
CHANNEL_BLOCKS = (256, 128, 64, 32, 16)  # block sizes a per-channel weight may be cut into
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _need_onnx():
    try:
        import onnx
    except ImportError:
        raise LowbitError("format onnx: needs the 'onnx' package (pip install 'lowbit[onnx]', "
                          "i.e. onnx and onnxruntime)") from None
    return onnx


# ---------------------------------------------------------------------------------------------
# MatMulNBits packing
# ---------------------------------------------------------------------------------------------
def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, L) uint8 codes, L a multiple of 8/bits -> (rows, L*bits/8) bytes, low bits first."""
    per = 8 // bits
    c = codes.reshape(codes.shape[0], -1, per).astype(np.uint8)
    out = np.zeros(c.shape[:2], np.uint8)
    for j in range(per):                       # a loop over the 1..4 slots of a byte, not weights
        out |= (c[:, :, j] << (bits * j)).astype(np.uint8)
    return out


def matmul_nbits_block(qw, name: str = "weight") -> tuple[int, int]:
    """(bits, block_size) of MatMulNBits that holds `qw` exactly, or a LowbitError naming `name`."""
    s = qw.scheme
    why = None
    if s.format != "int":
        why = f"format {s.format} (MatMulNBits holds integer codes on an affine grid)"
    elif s.bits not in MNB_BITS:
        why = f"{s.bits}-bit codes (MatMulNBits holds {', '.join(map(str, MNB_BITS))} bits)"
    elif s.granularity == "block" or (s.granularity == "channel" and s.axis != 0):
        why = f"granularity {s.granularity} (MatMulNBits blocks run along the input dimension)"
    elif s.granularity == "group" and (s.group_size < 16 or s.group_size & (s.group_size - 1)):
        why = f"group size {s.group_size} (MatMulNBits needs a power of two >= 16)"
    elif qw.g_idx is not None:
        K = qw.shape[1]
        if s.granularity != "group" or not torch.equal(
                qw.g_idx.long(), torch.arange(K) // s.group_size):
            why = "an act-order g_idx that permutes the groups (MatMulNBits' g_idx input is deprecated)"
    if why:
        raise LowbitError(f"format onnx: tensor {name} ({s.short_name()}) has {why}; requantize it "
                          "with w4gNN / w8gNN / w4c / w8c (NN a power of two >= 16, no act-order "
                          "g_idx), or export to --format native")
    if s.granularity == "group":
        return s.bits, s.group_size
    # channel / tensor: the row's one (scale, zero) repeated in every block. One block spanning
    # the row (block_size = next power of two >= K) would pad the codes to it (576 -> 1024:
    # +78% bytes) and runs slower in onnxruntime 1.32; instead the block that pads least,
    # the largest on a tie (576 -> 64, 1536 -> 256): the scales cost 4 bytes per block
    K = qw.shape[1]
    return s.bits, min(CHANNEL_BLOCKS, key=lambda b: (-(-K // b) * b - K, -b))


def pack_matmul_nbits(qw, name: str = "weight") -> dict:
    """A QuantizedWeight -> MatMulNBits' inputs and attributes:
    {"B", "scales", "zero_points" (None when symmetric), "K", "N", "bits", "block_size"}."""
    bits, bs = matmul_nbits_block(qw, name)
    N, K = qw.shape
    nb = -(-K // bs)
    scale = qw.scale.float()
    zero = (torch.full_like(scale, qw.scheme.sym_zero) if qw.zero_point is None
            else qw.zero_point.float())
    # per-tensor / per-channel qparams become one value per (row, block)
    scale = scale.expand(N, scale.shape[1] if scale.shape[1] == nb else 1).expand(N, nb).contiguous()
    zero = zero.expand(N, zero.shape[1] if zero.shape[1] == nb else 1).expand(N, nb).contiguous()
    if not bool(torch.isfinite(scale).all()):
        raise LowbitError(f"format onnx: tensor {name} has NaN/inf scales; refusing to write it")
    zr = zero.round()
    if not torch.equal(zr, zero) or float(zr.min()) < 0 or float(zr.max()) > (1 << bits) - 1:
        raise LowbitError(f"format onnx: tensor {name} has zero points that are not integers in "
                          f"[0, {(1 << bits) - 1}] (MatMulNBits stores uint8 zero points)")
    z8 = zr.to(torch.uint8).numpy()
    codes = qw.qdata.to(torch.uint8).numpy()
    if codes.max(initial=0) > (1 << bits) - 1:
        raise LowbitError(f"format onnx: tensor {name} has codes above {(1 << bits) - 1} for {bits} bits")
    padded = np.repeat(z8, bs, axis=1)              # codes past K: the block's zero point (adds 0)
    padded[:, :K] = codes
    B = _pack_rows(padded, bits).reshape(N, nb, bs * bits // 8)
    zp = None
    if not bool((z8 == (1 << (bits - 1))).all()):   # absent zero points mean 2^(bits-1)
        per = 8 // bits
        zb = -(-nb // per)
        zpad = np.zeros((N, zb * per), np.uint8)
        zpad[:, :nb] = z8
        zp = _pack_rows(zpad, bits).reshape(-1)
    return {"B": np.ascontiguousarray(B), "scales": scale.numpy().reshape(-1).astype(np.float32),
            "zero_points": zp, "K": K, "N": N, "bits": bits, "block_size": bs}


def dequantize_matmul_nbits(p: dict) -> np.ndarray:
    """The (N, K) float weight MatMulNBits computes with (numpy, for checks)."""
    N, K, bits, bs = p["N"], p["K"], p["bits"], p["block_size"]
    per, nb = 8 // bits, -(-K // bs)
    raw = p["B"].reshape(N, -1)
    codes = np.stack([(raw >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], -1).reshape(N, -1)
    if p["zero_points"] is None:
        zero = np.full((N, nb), 1 << (bits - 1), np.float32)
    else:
        zraw = p["zero_points"].reshape(N, -1)
        zero = np.stack([(zraw >> (bits * j)) & ((1 << bits) - 1) for j in range(per)],
                        -1).reshape(N, -1)[:, :nb].astype(np.float32)
    scale = p["scales"].reshape(N, nb)
    w = (codes.astype(np.float32) - np.repeat(zero, bs, 1)) * np.repeat(scale, bs, 1)
    return w[:, :K]


# ---------------------------------------------------------------------------------------------
# the graph
# ---------------------------------------------------------------------------------------------
class _Graph:
    """Nodes and initializers, named after the HF module they come from. data: an open binary
    file (DATA) that each large initializer is appended to as soon as it is made, leaving a
    reference to it in the graph: the layout onnx.save_model(save_as_external_data=True,
    all_tensors_to_one_file=True, size_threshold=SIZE_THRESHOLD) gives (each tensor at the end
    of the file, in initializer order, no gap; onnx.external_data_helper), written while the
    graph is built so a layer-by-layer conversion holds one tensor's bytes at a time."""

    def __init__(self, data=None):
        self.nodes, self.inits, self.layers = [], [], {}
        self.data = data

    def init(self, name: str, arr) -> str:
        import sys

        from onnx import numpy_helper
        arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise LowbitError(f"format onnx: tensor {name} contains NaN/inf; refusing to write a broken model")
        arr = np.ascontiguousarray(arr)
        # onnx's own test of what goes external: sys.getsizeof of the raw bytes object
        if self.data is not None and sys.getsizeof(b"") + arr.nbytes >= SIZE_THRESHOLD:
            # the tensor from_array would make, without its bytes ever in the message (a cleared
            # bytes field keeps its memory in the message's arena: 9 GiB for a 7B conversion)
            from onnx import TensorProto, helper
            if sys.byteorder != "little":
                raise LowbitError("format onnx: external data is little-endian; this machine is not")
            t = TensorProto()
            t.dims.extend(arr.shape)
            t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            t.name = name
            offset = self.data.tell()
            self.data.write(memoryview(arr.reshape(-1)).cast("B"))
            # the entries onnx.external_data_helper.set_external_data writes, in its order
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA), ("offset", offset), ("length", arr.nbytes)):
                entry = t.external_data.add()
                entry.key, entry.value = k, str(v)
        else:
            t = numpy_helper.from_array(arr, name)
        self.inits.append(t)
        return name

    def node(self, op: str, inputs, outputs, name: str, domain: str = "", **attrs):
        from onnx import helper
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def _row(self, name: str, qw, p: dict, node: str) -> None:
        self.layers[name] = {"kind": "linear", "op": "MatMulNBits", "node": node,
                             "scheme": qw.scheme.short_name(), "shape": list(qw.shape), "bits": p["bits"],
                             "block_size": p["block_size"], "zero_points": p["zero_points"] is not None,
                             "ragged_last_group": qw.ragged_last_group,
                             "bits_per_weight": round(qw.bits_per_weight, 6)}

    def _matmul_nbits(self, name: str, p: dict, x: str) -> str:
        ins = [x, self.init(f"{name}.qweight", p["B"]), self.init(f"{name}.scales", p["scales"])]
        if p["zero_points"] is not None:
            ins.append(self.init(f"{name}.qzeros", p["zero_points"]))
        return self.node("MatMulNBits", ins, f"{name}/out", name, "com.microsoft", K=p["K"], N=p["N"],
                         bits=p["bits"], block_size=p["block_size"])

    def linear(self, qm, name: str, x: str) -> str:
        """One linear (quantized: MatMulNBits; float: MatMul on W^T), plus its bias."""
        mod = qm.model.get_submodule(name)
        bias = qm.bias(name)
        if name in qm.qweights and qm.kinds.get(name) == "linear":
            qw = qm.qweights[name]
            p = pack_matmul_nbits(qw, name)
            y = self._matmul_nbits(name, p, x)
            self._row(name, qw, p, name)
        else:
            w = mod.weight.detach().float()
            y = self.node("MatMul", [x, self.init(f"{name}.weight_t", w.t().contiguous())], f"{name}/out", name)
        if bias is not None:
            y = self.node("Add", [y, self.init(f"{name}.bias", bias.float())], f"{name}/biased", f"{name}/bias")
        return y

    def fused(self, qm, names: list[str], x: str, fused_name: str) -> str | None:
        """Linears that read the same input as ONE MatMulNBits over their rows stacked (q/k/v,
        gate/up: one kernel call instead of 2-3, what decode at batch 1 is bound by). The
        stacked inputs are the per-layer ones concatenated along N (B, scales and the per-row
        packed zero points are all row-major). -> the (.., sum N) output, or None when the
        layers do not share bits / block_size / zero-point presence (then they stay separate)."""
        if not all(n in qm.qweights and qm.kinds.get(n) == "linear" for n in names):
            return None
        packs = [pack_matmul_nbits(qm.qweights[n], n) for n in names]
        key = {(p["K"], p["bits"], p["block_size"], p["zero_points"] is None) for p in packs}
        if len(key) != 1:
            return None
        cat = {"B": np.concatenate([p["B"] for p in packs]),
               "scales": np.concatenate([p["scales"] for p in packs]),
               "zero_points": None if packs[0]["zero_points"] is None else
               np.concatenate([p["zero_points"] for p in packs]),
               "K": packs[0]["K"], "N": sum(p["N"] for p in packs), "bits": packs[0]["bits"],
               "block_size": packs[0]["block_size"]}
        y = self._matmul_nbits(fused_name, cat, x)
        for n, p in zip(names, packs):
            self._row(n, qm.qweights[n], p, fused_name)
        biases = [qm.bias(n) for n in names]
        if any(b is not None for b in biases):
            b = torch.cat([torch.zeros(p["N"]) if b is None else b.float() for b, p in zip(biases, packs)])
            y = self.node("Add", [y, self.init(f"{fused_name}.bias", b)], f"{fused_name}/biased",
                          f"{fused_name}/bias")
        return y

    def split(self, y: str, sizes: list[int], names: list[str]) -> list[str]:
        self.init(f"{y}/split_sizes", np.array(sizes, np.int64))
        return self.node("Split", [y, f"{y}/split_sizes"], [f"{n}/out" for n in names], f"{y}/split", axis=-1)


def _check_model(qm):
    cfg = qm.config
    mt = getattr(cfg, "model_type", None)
    if mt not in MODEL_TYPES:
        raise LowbitError(f"format onnx: model_type {mt!r} is not one this exporter builds "
                          f"({', '.join(MODEL_TYPES)}); export to --format native or gguf")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise LowbitError(f"format onnx: hidden_act {cfg.hidden_act!r}; this exporter builds SiLU MLPs")
    sw = getattr(cfg, "sliding_window", None)
    if sw and (mt == "mistral" or getattr(cfg, "use_sliding_window", False)):
        raise LowbitError(f"format onnx: {mt} with sliding_window={sw} is not built by this exporter")
    for name, kind in qm.kinds.items():
        if kind == "linear" and not (name.startswith("model.layers.") or name == "lm_head"):
            raise LowbitError(f"format onnx: quantized layer {name} is not one this graph has")
    rot = qm.model.model.rotary_emb
    rtype = getattr(rot, "rope_type", "default")
    if rtype not in ("default", "linear", "llama3", "yarn", "longrope") or rtype == "dynamic":
        raise LowbitError(f"format onnx: rope_type {rtype!r} (position-dependent frequencies) is not "
                          "held by GroupQueryAttention's fixed cos/sin caches")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if rot.inv_freq.numel() * 2 != head_dim:
        raise LowbitError(f"format onnx: partial rotary ({rot.inv_freq.numel() * 2} of {head_dim} dims) "
                          "is not built by this exporter")
    return head_dim


def build_model(qm, max_seq_len: int | None = None, fuse: bool = True, data=None):
    """The onnx.ModelProto of `qm` (a QuantizedModel of the Llama family). fuse: q/k/v and
    gate/up each as one MatMulNBits (when their schemes allow; exact either way). data: an open
    file the large initializers are written to as they are made (_Graph)."""
    onnx = _need_onnx()
    from onnx import TensorProto, helper
    head_dim = _check_model(qm)
    cfg, m = qm.config, qm.model
    L, nh, nkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    eps = float(cfg.rms_norm_eps)
    g = _Graph(data)

    # rotary caches: HF's cos/sin(position * inv_freq) * attention_scaling, computed by torch
    # the way LlamaRotaryEmbedding does (one fp32 product per entry), for every position
    rot = m.model.rotary_emb
    n_pos = int(max_seq_len or cfg.max_position_embeddings)
    freqs = torch.outer(torch.arange(n_pos, dtype=torch.float32), rot.inv_freq.float())
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    cos = g.init("cos_cache", freqs.cos() * scaling)
    sin = g.init("sin_cache", freqs.sin() * scaling)

    # GQA's per-sequence lengths from the mask: seqlens_k = sum(mask) - 1 (int32, (batch,)),
    # total_sequence_length = mask.shape[1] (int32 scalar)
    g.init("one_i64", np.array([1], np.int64))
    msum = g.node("ReduceSum", ["attention_mask", "one_i64"], "mask_sum", "mask_sum", keepdims=0)
    sk = g.node("Sub", [msum, "one_i64"], "seqlens_k_i64", "seqlens_k_sub")
    seqlens_k = g.node("Cast", [sk], "seqlens_k", "seqlens_k", to=TensorProto.INT32)
    shp = g.node("Shape", ["attention_mask"], "mask_shape", "mask_shape")
    g.init("idx1", np.array(1, np.int64))
    tot = g.node("Gather", [shp, "idx1"], "total_i64", "total_gather", axis=0)
    total = g.node("Cast", [tot], "total_seq_len", "total_seq_len", to=TensorProto.INT32)

    embed = m.model.embed_tokens.weight.detach().float()
    emb_name = g.init("model.embed_tokens.weight", embed)
    h = g.node("Gather", [emb_name, "input_ids"], "embeds", "model.embed_tokens")
    pending = None                                    # the block output still to add to h
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])]

    def norm(x_new, weight, name):
        """RMSNorm of h (+ x_new added into the residual first): -> normed; updates h."""
        nonlocal h
        w = g.init(f"{name}.weight", weight.detach().float())
        if x_new is None:
            return g.node("SimplifiedLayerNormalization", [h, w], f"{name}/out", name, axis=-1,
                          epsilon=eps, stash_type=1)
        outs = g.node("SkipSimplifiedLayerNormalization", [x_new, h, w],
                      [f"{name}/out", "", "", f"{name}/residual"], name, "com.microsoft", epsilon=eps)
        h = outs[3]
        return outs[0]

    for i in range(L):
        blk, p = m.model.layers[i], f"model.layers.{i}"
        x = norm(pending, blk.input_layernorm.weight, f"{p}.input_layernorm")
        qkv_names = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
        qkv = g.fused(qm, qkv_names, x, f"{p}.self_attn.qkv_proj") if fuse else None
        if qkv is not None:       # GroupQueryAttention takes packed q|k|v when key, value are ""
            q, k, v = qkv, "", ""
        else:
            q, k, v = (g.linear(qm, n, x) for n in qkv_names)
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        ok, ov = f"present.{i}.key", f"present.{i}.value"
        for n in (pk, pv):
            inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", nkv, "past", head_dim]))
        for n in (ok, ov):
            outputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", nkv, "total", head_dim]))
        att = g.node("GroupQueryAttention", [q, k, v, pk, pv, seqlens_k, total, cos, sin],
                     [f"{p}.self_attn/out", ok, ov], f"{p}.self_attn", "com.microsoft",
                     num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0,
                     scale=float(head_dim ** -0.5))[0]
        o = g.linear(qm, f"{p}.self_attn.o_proj", att)
        x2 = norm(o, blk.post_attention_layernorm.weight, f"{p}.post_attention_layernorm")
        gu_names = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        gu = g.fused(qm, gu_names, x2, f"{p}.mlp.gate_up_proj") if fuse else None
        if gu is not None:
            gate, up = g.split(gu, [cfg.intermediate_size] * 2, gu_names)
        else:
            gate, up = (g.linear(qm, n, x2) for n in gu_names)
        sig = g.node("Sigmoid", [gate], f"{p}.mlp/sigmoid", f"{p}.mlp/sigmoid")
        act = g.node("Mul", [gate, sig], f"{p}.mlp/silu", f"{p}.mlp/silu")
        prod = g.node("Mul", [act, up], f"{p}.mlp/gated", f"{p}.mlp/gated")
        pending = g.linear(qm, f"{p}.mlp.down_proj", prod)
    x = norm(pending, m.model.norm.weight, "model.norm")

    head = m.lm_head
    if "lm_head" in qm.qweights or head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr():
        g.node("Identity", [g.linear(qm, "lm_head", x)], "logits", "lm_head/logits")
    else:
        # tied to the float embedding table: Gemm(transB) reads the one stored (vocab, hidden) table
        g.init("flat_shape", np.array([-1, cfg.hidden_size], np.int64))
        flat = g.node("Reshape", [x, "flat_shape"], "lm_head/flat", "lm_head/flat")
        lg = g.node("Gemm", [flat, emb_name], "lm_head/logits2d", "lm_head", transB=1)
        sh = g.node("Shape", [x], "lm_head/x_shape", "lm_head/x_shape", start=0, end=2)
        g.init("vocab_dim", np.array([cfg.vocab_size], np.int64))
        out_shape = g.node("Concat", [sh, "vocab_dim"], "lm_head/out_shape", "lm_head/out_shape", axis=0)
        g.node("Reshape", [lg, out_shape], "logits", "lm_head/reshape")
    for name in qm.qweights:
        if qm.kinds.get(name) == "embedding":
            qw = qm.qweights[name]
            g.layers[name] = {"kind": "embedding", "op": "Gather", "scheme": qw.scheme.short_name(),
                              "shape": list(qw.shape), "stored": "float32 (dequantized)"}
    graph = helper.make_graph(g.nodes, f"lowbit-{cfg.model_type}", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="lowbit", producer_version=_lowbit_version())
    model.ir_version = 10
    return model, g.layers


def _lowbit_version() -> str:
    import lowbit
    return lowbit.__version__


def write(qm, out: str | os.PathLike, *, overwrite: bool = False, max_shard_size=None,
          max_seq_len: int | None = None, fuse: bool = True) -> Path:
    """Write a QuantizedModel as an ONNX directory for onnxruntime (module docstring).
    max_seq_len caps the rotary caches (default: config.max_position_embeddings); fuse=False
    keeps one MatMulNBits per linear (q/k/v, gate/up unfused)."""
    onnx = _need_onnx()
    from lowbit.export.common import copy_model_files, output_dir, source_config
    from lowbit.export.manifest import provenance, write_manifest
    if max_shard_size is not None:
        raise LowbitError("format onnx: max_shard_size does not apply (one external data file, no size limit)")
    cfg = qm.config
    io = {"inputs": ["input_ids", "attention_mask", "past_key_values.{i}.key", "past_key_values.{i}.value"],
          "outputs": ["logits", "present.{i}.key", "present.{i}.value"], "kv_layout": "BNSH",
          "num_layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
          "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
          "max_seq_len": int(max_seq_len or cfg.max_position_embeddings)}
    if not qm.lazy:
        model, layers = build_model(qm, max_seq_len, fuse)
    with output_dir(out, overwrite) as tmp:
        if qm.lazy:         # a layer-by-layer conversion: each initializer written as it is made
            with open(tmp / DATA, "wb") as fh:
                model, layers = build_model(qm, max_seq_len, fuse, data=fh)
            onnx.save_model(model, str(tmp / MODEL))
        else:
            onnx.save_model(model, str(tmp / MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA, size_threshold=SIZE_THRESHOLD)
        rows = qm.provenance.get("layers", {})
        for name, row in layers.items():
            row["method"] = rows.get(name, {}).get("method")
        manifest = provenance(qm, FORMAT, layers, {"opset": OPSET, "graph_io": io, "onnx_version": onnx.__version__})
        copy_model_files(qm.source_dir, tmp, source_config(qm))
        write_manifest(tmp, manifest)
    return Path(out)


# ---------------------------------------------------------------------------------------------
# detect, and running it with onnxruntime
# ---------------------------------------------------------------------------------------------
def detect(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / MODEL).is_file() and (p / "lowbit_manifest.json").is_file()):
        return False
    try:
        return json.loads((p / "lowbit_manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class OnnxRunner:
    """An exported directory in an onnxruntime CPU session: logits for token ids, with or
    without the KV cache, and timed greedy generation like lowbit.nn.decode.generate.

        r = OnnxRunner(DIR, threads=2)
        logits = r.logits(ids)                      # torch (1, S, vocab), no cache
        res = r.generate(ids, max_new_tokens=64)    # GenerationResult (prefill / decode tokens/s)
    """

    def __init__(self, path: str | os.PathLike, threads: int = 2, verify: bool = True,
                 spinning: bool | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise LowbitError("OnnxRunner: needs onnxruntime (pip install 'lowbit[onnx]')") from None
        from lowbit.export.manifest import read_json
        from lowbit.export.manifest import verify as verify_files
        self.path = Path(path)
        if not detect(self.path):
            raise LowbitError(f"{self.path}: not a lowbit ONNX directory (expected {MODEL} and "
                              "lowbit_manifest.json with format 'onnx')")
        self.manifest = read_json(self.path / "lowbit_manifest.json")
        if verify:
            verify_files(self.path)
        io = self.manifest.get("graph_io") or {}
        try:
            self.n_layers, self.kv_heads, self.head_dim = int(io["num_layers"]), int(io["kv_heads"]), int(io["head_dim"])
        except (KeyError, TypeError, ValueError):
            raise LowbitError(f"{self.path / 'lowbit_manifest.json'}: no graph_io table "
                              "(num_layers, kv_heads, head_dim)") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if spinning is None:   # follow the OpenMP policy lowbit's torch runs under (PASSIVE on a shared box)
            spinning = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(self.path / MODEL), so, providers=["CPUExecutionProvider"])
        except Exception as e:   # onnxruntime raises its own exception types for a bad file
            raise LowbitError(f"{self.path / MODEL}: onnxruntime cannot load it "
                              f"({type(e).__name__}: {str(e)[:300]})") from None

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return [z] * (2 * self.n_layers)

    def forward(self, ids, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (batch, S) after the cached `past` (None: empty) -> (logits (batch, S, V), present)."""
        ids = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        past = past if past is not None else self.empty_cache(ids.shape[0])
        feed = {"input_ids": ids,
                "attention_mask": np.ones((ids.shape[0], past[0].shape[2] + ids.shape[1]), np.int64)}
        for i in range(self.n_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def logits(self, ids) -> torch.Tensor:
        return torch.from_numpy(self.forward(ids)[0])

    def generate(self, ids, max_new_tokens: int = 64):
        """Greedy generation of exactly max_new_tokens (EOS ignored, as benchmarks do), timed."""
        from lowbit.nn.decode import GenerationResult
        ids = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(1, -1)
        res = GenerationResult(prompt_tokens=int(ids.shape[1]))
        t0 = time.perf_counter()
        logits, past = self.forward(ids)
        tok = int(np.argmax(logits[0, -1]))
        res.prefill_seconds = time.perf_counter() - t0
        res.tokens.append(tok)
        step = np.empty((1, 1), np.int64)
        t1 = time.perf_counter()
        while len(res.tokens) < max_new_tokens:
            step[0, 0] = tok
            logits, past = self.forward(step, past)
            tok = int(np.argmax(logits[0, -1]))
            res.tokens.append(tok)
        res.decode_seconds = time.perf_counter() - t1
        return res


register_format(Format(FORMAT, "ONNX for onnxruntime: MatMulNBits weights (2/4/8-bit groups, per "
                       "channel), GroupQueryAttention with a KV cache; run with lowbit.export.onnx.OnnxRunner",
                       detect, write, None, holds="int 2/4/8 bit, groups of a power of two >= 16 (ragged "
                       "last group ok) or per channel; Llama/Mistral/Qwen2"))
