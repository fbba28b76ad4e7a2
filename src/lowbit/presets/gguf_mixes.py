"""llama.cpp's quantization mixes (Q4_K_M, Q3_K_M, ...) as lowbit Recipe rules.

Each mix is data: an ordered list of (module pattern, ggml type) rules, first match wins, taken
from llama.cpp src/llama-quant.cpp (llama_tensor_get_type_impl) for dense, non-Falcon models:

    mix     default  lm_head  attn_v (v_proj)                          ffn_down (down_proj)               attn_output
    Q2_K    Q2_K     Q6_K     Q4_K if n_head/n_head_kv >= 4 else Q3_K   Q3_K                               Q3_K
    Q3_K_M  Q3_K     Q6_K     Q5_K in layers <2, else Q4_K             Q5_K in layers < n/16, else Q4_K   Q4_K
    Q4_K_S  Q4_K     Q6_K     Q5_K in layers <4                        Q5_K in layers < n/8               -
    Q4_K_M  Q4_K     Q6_K     Q6_K in use_more_bits layers             Q6_K in use_more_bits layers       -
    Q5_K_M  Q5_K     Q6_K     Q6_K in use_more_bits layers             Q6_K in use_more_bits layers       -
    Q6_K    Q6_K     Q6_K
    Q8_0    Q8_0     Q8_0
    use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2   (integer division)

Layer-dependent rules name a layer set in angle brackets (`layers\\.<more_bits>\\.`), bound to the
model's layer count by `bind_mix` (a registered preset has them unbound; `lowbit export` binds).
A model with tied embeddings stores one tensor (token_embd) that serves as the output too: it
takes the lm_head rule, as llama.cpp treats it. The untied token_embd takes the default type.

Rows whose length is not a multiple of a type's block fall back per tensor, as llama.cpp's
tensor_type_fallback: Q2_K, Q3_K, TQ1_0, TQ2_0 -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0;
and F16 when even that does not fit. SmolLM2 (hidden 576) falls back on every 576-column tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from lowbit.errors import LowbitError
from lowbit.numerics.ggml.types import ggml_type
from lowbit.numerics.scheme import Scheme
from lowbit.recipe import Recipe, Rule, register_preset

FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
            "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# nominal code bits per format (Scheme.bits is informational for ggml formats)
_BITS = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6, "q8_0": 8, "q4_0": 4, "q4_1": 4,
         "q5_0": 5, "q5_1": 5, "tq1_0": 2, "tq2_0": 2}

V, DOWN, O = r"\.self_attn\.v_proj$", r"\.mlp\.down_proj$", r"\.self_attn\.o_proj$"
HEAD = r"^lm_head$"


@dataclass(frozen=True)
class Mix:
    name: str
    ftype: str                          # gguf.LlamaFileType member, written as general.file_type
    default: str
    rules: tuple[tuple[str, str], ...]  # (targets regex, ggml type), before the default


def _layer(sel: str, tail: str) -> str:
    return rf"layers\.<{sel}>{tail}"


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("q2_k", "MOSTLY_Q2_K", "q2_k", ((HEAD, "q6_k"), (rf"<gqa_ge_4>{V}", "q4_k"), (V, "q3_k"),
                                        (DOWN, "q3_k"), (O, "q3_k"))),
    Mix("q3_k_m", "MOSTLY_Q3_K_M", "q3_k", ((HEAD, "q6_k"), (_layer("first_2", V), "q5_k"), (V, "q4_k"),
                                            (_layer("first_n16", DOWN), "q5_k"), (DOWN, "q4_k"), (O, "q4_k"))),
    Mix("q4_k_s", "MOSTLY_Q4_K_S", "q4_k", ((HEAD, "q6_k"), (_layer("first_4", V), "q5_k"),
                                            (_layer("first_n8", DOWN), "q5_k"))),
    Mix("q4_k_m", "MOSTLY_Q4_K_M", "q4_k", ((HEAD, "q6_k"), (_layer("more_bits", V), "q6_k"),
                                            (_layer("more_bits", DOWN), "q6_k"))),
    Mix("q5_k_m", "MOSTLY_Q5_K_M", "q5_k", ((HEAD, "q6_k"), (_layer("more_bits", V), "q6_k"),
                                            (_layer("more_bits", DOWN), "q6_k"))),
    Mix("q6_k", "MOSTLY_Q6_K", "q6_k", ((HEAD, "q6_k"),)),
    Mix("q8_0", "MOSTLY_Q8_0", "q8_0", ((HEAD, "q8_0"),)),
    # single-type files: llama.cpp's Q4_0 / Q5_0 give the first n/8 ffn_down Q4_1 / Q5_1 when an
    # imatrix is used; TQ*: embeddings Q4_K; F16 / F32: convert_hf_to_gguf's --outtype
    Mix("q4_0", "MOSTLY_Q4_0", "q4_0", ((HEAD, "q6_k"), (rf"<imatrix>{_layer('first_n8', DOWN)}", "q4_1"))),
    Mix("q5_0", "MOSTLY_Q5_0", "q5_0", ((HEAD, "q6_k"), (rf"<imatrix>{_layer('first_n8', DOWN)}", "q5_1"))),
    Mix("q4_1", "MOSTLY_Q4_1", "q4_1", ((HEAD, "q6_k"),)),
    Mix("q5_1", "MOSTLY_Q5_1", "q5_1", ((HEAD, "q6_k"),)),
    Mix("tq1_0", "MOSTLY_TQ1_0", "tq1_0", ((HEAD, "q6_k"), (r"embed_tokens$", "q4_k"))),
    Mix("tq2_0", "MOSTLY_TQ2_0", "tq2_0", ((HEAD, "q6_k"), (r"embed_tokens$", "q4_k"))),
    Mix("f16", "MOSTLY_F16", "f16", ()),
    Mix("f32", "ALL_F32", "f32", ()),
)}
# the presets the issue asks for (all MIXES are accepted by `lowbit export --type`)
PRESETS = ("q4_k_m", "q4_k_s", "q5_k_m", "q3_k_m", "q2_k", "q6_k", "q8_0")


def ggml_scheme(type_name: str) -> Scheme:
    fmt = ggml_type(type_name).format
    fmt = {"f32": "fp32", "f16": "fp16"}.get(fmt, fmt)
    return Scheme(bits=_BITS.get(fmt, 16), format=fmt)


def mix_recipe(name: str) -> Recipe:
    """The unbound Recipe of a mix (layer sets still as <placeholders>)."""
    key = name.lower()
    if key not in MIXES:
        raise LowbitError(f"GGUF mix {name!r}: unknown; expected one of {', '.join(MIXES)}")
    m = MIXES[key]
    rules = [Rule(t, ggml_scheme(ty), "ggml") for t, ty in m.rules]
    rules.append(Rule(r".*", ggml_scheme(m.default), "ggml"))
    return Recipe(name=m.name, rules=rules, ignore=[],
                  description=f"llama.cpp {m.name.upper()} mix (llama-quant.cpp rules); layer sets "
                              "bound to the model at export")


def mix_gptq_recipe(name: str, kquants_only: bool = False) -> Recipe:
    """`<mix>-gptq`: the same per-tensor types, with GPTQ's error feedback choosing the codes of
    every decoder linear (methods/gptq_ggml.py); lm_head / embeddings keep llama.cpp's encoder.
    `<mix>-gptqk` (kquants_only): GPTQ only on the tensors that really get a k-quant; llama.cpp's
    encoder on those that fall back to a legacy type (rows not a multiple of 256)."""
    r = mix_recipe(name)
    extra = {"ggml_fallback": "encoder"} if kquants_only else {}
    rules = [Rule(x.targets, x.scheme, "ggml" if x.targets == HEAD else "gptq",
                  dict(x.method_args) if x.targets == HEAD else {**x.method_args, **extra})
             for x in r.rules]
    suffix = "-gptqk" if kquants_only else "-gptq"
    what = "on the k-quant tensors (fallback types keep llama.cpp's encoding)" if kquants_only else ""
    return Recipe(name=f"{r.name}{suffix}", rules=rules, ignore=list(r.ignore),
                  description=f"{r.description}; codes by GPTQ with ggml's block encoders as the quantizer"
                              + (f" {what}" if what else ""))


for _m in MIXES:
    register_preset(_m, f"GGUF {_m.upper()}: llama.cpp's per-tensor mix as Recipe rules")(
        lambda _n=_m: mix_recipe(_n))
    if _m not in ("f16", "f32", "tq1_0", "tq2_0"):
        register_preset(f"{_m}-gptq", f"GGUF {_m.upper()} types, codes chosen by GPTQ (ggml encoders as quantizer)")(
            lambda _n=_m: mix_gptq_recipe(_n))
        register_preset(f"{_m}-gptqk", f"GGUF {_m.upper()} types, GPTQ codes on the k-quant tensors only")(
            lambda _n=_m: mix_gptq_recipe(_n, kquants_only=True))

EMBED = r"embed_tokens$"


def with_refine(recipe: Recipe) -> Recipe:
    """The same recipe with lowbit's block refinement on every llama.cpp-encoder (ggml) rule."""
    return replace(recipe, rules=[Rule(r.targets, r.scheme, r.method,
                                       {**r.method_args, **({"refine": True} if r.method == "ggml" else {})})
                                  for r in recipe.rules])


def is_ggml_recipe(recipe: Recipe) -> bool:
    from lowbit.numerics.scheme import GGUF_FORMATS
    return any(r.scheme is not None and (r.scheme.format in GGUF_FORMATS or r.method == "ggml")
               for r in recipe.rules)


def bind_to_model(recipe: Recipe, model, has_imatrix: bool = False) -> Recipe:
    """A recipe with ggml types, made concrete for `model` as llama-quantize treats it: layer sets
    bound to its layer count; the token embedding quantized too (GGUF stores it quantized): with
    tied embeddings it takes the lm_head rule and serves as the output (lm_head itself is not a
    separate tensor then), else the rule its own name matches. Other recipes pass unchanged."""
    if not is_ggml_recipe(recipe):
        return recipe
    cfg = model.config
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    r = bind_mix(recipe, int(cfg.num_hidden_layers), n_head, n_kv, has_imatrix)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    src = r.rule_for("lm_head") if tied else r.rule_for("model.embed_tokens")
    rules = [x for x in r.rules if x.targets != EMBED]
    ignore = list(r.ignore)
    if src is not None and src.scheme is not None:
        rules.insert(0, Rule(EMBED, src.scheme, "ggml"))
    if tied and r"^lm_head$" not in ignore:
        ignore.append(r"^lm_head$")
    return replace(r, rules=rules, ignore=ignore)      # transforms, finetune, calibration kept


# ---- binding layer sets to a model ----------------------------------------------------------------
def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def layer_sets(n_layers: int) -> dict[str, list[int]]:
    r = range(n_layers)
    return {"more_bits": [i for i in r if use_more_bits(i, n_layers)],
            "first_2": [i for i in r if i < 2], "first_4": [i for i in r if i < 4],
            "first_n8": [i for i in r if i < n_layers // 8],
            "first_n16": [i for i in r if i < n_layers // 16]}


_PLACEHOLDER = re.compile(r"<([a-z0-9_]+)>")


def bind_mix(recipe: Recipe, n_layers: int, n_head: int, n_head_kv: int, has_imatrix: bool = False) -> Recipe:
    """Substitute <layer sets> with explicit layer alternations and <conditions> with "" (true)
    or a never-matching "(?!)" (false)."""
    sets = layer_sets(n_layers)
    conds = {"gqa_ge_4": n_head // max(1, n_head_kv) >= 4, "imatrix": has_imatrix}

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key in sets:
            ids = sets[key]
            return "(?:" + "|".join(map(str, ids)) + ")" if ids else "(?!)"
        if key in conds:
            return "" if conds[key] else "(?!)"
        raise LowbitError(f"recipe {recipe.name}: unknown placeholder <{key}> in a rule target")

    rules = [Rule(_PLACEHOLDER.sub(sub, r.targets), r.scheme, r.method, dict(r.method_args)) for r in recipe.rules]
    return replace(recipe, rules=rules, description=recipe.description +
                   f" (bound: {n_layers} layers, {n_head}/{n_head_kv} heads)")


def fallback_type(type_name: str, n_per_row: int) -> str:
    """llama.cpp's tensor_type_fallback: the type actually used for rows of n_per_row values."""
    t = ggml_type(type_name)
    if t.fits(n_per_row):
        return t.name
    fb = FALLBACK.get(t.name, t.name if t.block_size <= 32 else None)
    if fb is None:
        raise LowbitError(f"ggml type {t.name}: no fallback for rows of {n_per_row} values")
    return fb if ggml_type(fb).fits(n_per_row) else "F16"
