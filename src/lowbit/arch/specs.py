"""Per-architecture specs, as data: where the decoder blocks live and how their linears are fed.

One `ArchSpec` per Hugging Face `model_type` family (the idea of GPTQModel's `module_tree` and of
llm-compressor's regex mappings: model knowledge is a table, not per-model code).

    blocks      dotted path of the nn.ModuleList of repeated decoder blocks ("model.layers")
    groups      the block's linears in execution order, relative to the block; the names in one
                tuple read the *same* input tensor (q/k/v all read the attention norm's output),
                so they share one set of statistics (one GPTQ Hessian). The order of the tuples
                is the order of "true sequential" quantization (GPTQ paper, sec. 4 / the
                reference code's --true-sequential): each group sees the outputs of the groups
                before it already quantized.
    head        modules applied, in order, between the last block and lm_head ("model.norm");
                lets lm_head be calibrated from the quantized blocks' outputs without a full
                model forward. A path missing from a model (OPT's optional project_out) is skipped.
    lm_head     the output projection
    embeddings  input embedding tables (quantizable on request, data-free only)

Llama block (SmolLM2: hidden 576, 9 q heads / 3 kv heads of 64, intermediate 1536):

    x ─ input_layernorm ─┬─ q_proj (576->576) ─┐
                         ├─ k_proj (576->192) ─┼─ attention ─ o_proj (576->576) ─ + x = h
                         └─ v_proj (576->192) ─┘
    h ─ post_attention_layernorm ─┬─ gate_proj (576->1536) ─ silu ─┐
                                  └─ up_proj   (576->1536) ────────┴─ * ─ down_proj (1536->576) ─ + h

A model whose type is not listed here falls back to `lowbit.arch.generic_spec`, which finds the
repeated block list and discovers the groups by watching one block run.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    name: str
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    head: tuple[str, ...] = ()
    lm_head: str = "lm_head"
    embeddings: tuple[str, ...] = ()
    model_types: tuple[str, ...] = field(default=(), compare=False)
    discovered: bool = False  # True for the generic fallback (groups found by probing)
    # smoothing pairs (transforms/: SmoothQuant, AWQ): (producer, consumers). The producer is a
    # norm or a linear whose output feeds the consumers' inputs channel for channel, so a scale s
    # per input channel folds as producer / s, consumers * s (float outputs unchanged)
    smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a block, in execution order."""
        return tuple(n for g in self.groups for n in g)

    def to_dict(self) -> dict:
        return {"name": self.name, "blocks": self.blocks, "groups": [list(g) for g in self.groups],
                "head": list(self.head), "lm_head": self.lm_head, "embeddings": list(self.embeddings),
                "discovered": self.discovered}


# norm -> q/k/v, v -> o (with GQA: v's channels repeated for the query heads sharing them),
# norm -> gate/up, up -> down (silu(gate) * up is linear in up)
_LLAMA_PAIRS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("self_attn.v_proj", ("self_attn.o_proj",)),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                ("mlp.up_proj", ("mlp.down_proj",)))
# Norms whose weight enters as (offset + weight) (Gemma's RMSNorm: x * (1 + w)), by model_type
NORM_WEIGHT_OFFSET: dict[str, float] = {"gemma": 1.0, "gemma2": 1.0, "gemma3_text": 1.0}

_LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"),
                 ("mlp.down_proj",))

SPECS: tuple[ArchSpec, ...] = (
    # Llama and the families that kept its module names (Qwen3 adds q_norm / k_norm, which are
    # not linears; Gemma 2/3 add pre/post feed-forward norms, also not linears).
    ArchSpec("llama", "model.layers", _LLAMA_GROUPS, head=("model.norm",),
             embeddings=("model.embed_tokens",), smooth_pairs=_LLAMA_PAIRS,
             model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                          "olmo", "olmo2", "granite", "smollm3", "cohere", "helium")),
    # Phi-3 fuses q/k/v and gate/up into single linears.
    ArchSpec("phi3", "model.layers",
             (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
             head=("model.norm",), embeddings=("model.embed_tokens",), model_types=("phi3",),
             smooth_pairs=(("input_layernorm", ("self_attn.qkv_proj",)),
                           ("post_attention_layernorm", ("mlp.gate_up_proj",)))),
    # OPT (the GPTQ paper's main family): pre-LayerNorm blocks under model.decoder.
    ArchSpec("opt", "model.decoder.layers",
             (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
              ("fc1",), ("fc2",)),
             head=("model.decoder.final_layer_norm", "model.decoder.project_out"),
             embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
             model_types=("opt",),
             # fc1 -> ReLU -> fc2: relu(x / s) = relu(x) / s for s > 0
             smooth_pairs=(("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                           ("self_attn.v_proj", ("self_attn.out_proj",)),
                           ("final_layer_norm", ("fc1",)), ("fc1", ("fc2",)))),
    # GPT-2: transformers' Conv1D modules (weight stored (in, out)); c_attn is a fused q/k/v.
    ArchSpec("gpt2", "transformer.h",
             (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
             head=("transformer.ln_f",), embeddings=("transformer.wte", "transformer.wpe"),
             model_types=("gpt2",)),
)

BY_MODEL_TYPE: dict[str, ArchSpec] = {t: s for s in SPECS for t in s.model_types}


# ---- rotations (lowbit.transforms.rotate) -----------------------------------------------------
@dataclass(frozen=True)
class RotationSpec:
    """Where a residual-stream rotation Q must be folded so the float outputs are unchanged
    (QuaRot arXiv:2404.00456, sec. 4): every norm that feeds linears must be a plain RMSNorm
    (x / rms(x) * weight, which commutes with Q once its weight is folded into its readers).

    norms       (norm path, linears reading its output), relative to a block; the norm's weight
                is multiplied into those linears' input columns, then set to 1
    writers     linears whose outputs are added to the residual stream (rows rotated by Q^T)
    v_o         (value projection, attention output projection): a head-wise rotation of width
                head_dim folded into both (attention mixes tokens, not a head's dimensions)
    down        the MLP output projection whose input (after the gate nonlinearity) can only be
                rotated online (x -> x Q before the matmul; optional)
    final_norm  the norm before lm_head (folded into lm_head)
    """
    norms: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    v_o: tuple[str, str] | None
    down: str | None
    final_norm: str
    embeddings: tuple[str, ...]
    lm_head: str = "lm_head"


_LLAMA_ROTATION = RotationSpec(
    norms=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    writers=("self_attn.o_proj", "mlp.down_proj"), v_o=("self_attn.v_proj", "self_attn.o_proj"),
    down="mlp.down_proj", final_norm="model.norm", embeddings=("model.embed_tokens",))

# model_type -> RotationSpec. Absent on purpose (rotate refuses them with the reason):
#   gemma*      RMSNorm computes x * (1 + weight) and the embeddings are scaled by sqrt(hidden)
#   olmo2, gemma2/3, cohere   norms on the sublayer outputs / LayerNorm with a mean: do not commute
#   opt, gpt2   LayerNorm (mean subtraction and bias) in front of every linear group
ROTATIONS: dict[str, RotationSpec] = {t: _LLAMA_ROTATION for t in
                                      ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite")}
ROTATIONS["phi3"] = RotationSpec(
    norms=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
    writers=("self_attn.o_proj", "mlp.down_proj"), v_o=None, down="mlp.down_proj",
    final_norm="model.norm", embeddings=("model.embed_tokens",))
