"""`lowbit generate` / `lowbit chat`: run a (quantized) model on packed-weight CPU kernels.

    lowbit generate smollm2-135m --prompt "The capital of France is" --recipe w4g128-rtn
    lowbit chat smollm2-135m --recipe w4g128-rtn                 # interactive; --prompt for one turn

Tokens stream to stdout as they are chosen; prompt and decode tokens/s go to stderr.
"""
from __future__ import annotations

import sys

from lowbit.cli.argtypes import nonneg_float, nonneg_int, positive_int


def _common(p) -> None:
    p.add_argument("model", help="built-in name (smollm2-135m), .gguf file, Hugging Face directory or "
                                 "lowbit native directory (loaded straight into packed kernels)")
    p.add_argument("--recipe", default=None,
                   help="quantize on load with this data-free recipe (e.g. w4g128-rtn, w8-rtn); "
                        "default: run the model as loaded")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize lm_head (recipes keep it in float by default; at this model "
                        "size it is a fifth of the weights read per token)")
    p.add_argument("--backend", default="auto", choices=["auto", "ext", "torch", "tiled", "reference"],
                   help="kernel for quantized linears (reference = dequantize then matmul)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="activation / float weight dtype")
    p.add_argument("--kv-cache", default="float", choices=["float", "int8", "fp8"],
                   help="KV cache storage: float (--dtype), or int8 / fp8 e4m3 codes with one fp32 scale "
                        "per token and head (~27%% of an fp32 cache; Llama-family step path only)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=nonneg_int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")


def register(sub) -> None:
    p = sub.add_parser("generate", help="stream a continuation of --prompt and print tokens/s")
    _common(p)
    p.add_argument("--prompt", required=True)
    p.set_defaults(func=run_generate)
    c = sub.add_parser("chat", help="chat with the tokenizer's chat template (--prompt for one turn)")
    _common(c)
    c.add_argument("--prompt", default=None, help="one user turn, then exit (no stdin)")
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=run_chat)


def prepare_model(args):
    """Load, optionally quantize, attach kernels. -> (model, tokenizer, description)."""
    import torch

    from lowbit import api
    from lowbit.errors import LowbitError
    from lowbit.export import detect_format
    from lowbit.models import load_model, resolve_source
    from lowbit.nn.prepare import prepare_for_inference
    from lowbit.nn.qlinear import QuantLinear
    from lowbit.recipe import get_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    kind, path = resolve_source(args.model)
    fmt = detect_format(path) if kind == "hf" else None
    if fmt is not None:   # a quantized output: read straight into packed kernels, layer by layer
        if args.recipe:
            raise LowbitError(f"{args.model} is already quantized ({fmt.name}); drop --recipe")
        backend = None if args.backend == "reference" else args.backend
        lm = load_model(args.model, dtype=dtype, backend=backend)
        how = "reference kernels" if backend is None else f"packed on load, {backend}"
        return lm.model, lm.tokenizer, f"{args.model} {args.dtype} ({fmt.name}, {how})"
    lm = load_model(args.model, dtype=dtype)
    model, tok = lm.model, lm.tokenizer
    desc = f"{args.model} {args.dtype}"
    if args.recipe:
        recipe = get_recipe(args.recipe)
        if args.quantize_lm_head:
            recipe.ignore = [p for p in recipe.ignore if p != "lm_head"]
        api.quantize(model, recipe, progress=False)
        desc += f" {recipe.name}{' +lm_head' if args.quantize_lm_head else ''}"
    elif args.quantize_lm_head:
        raise LowbitError("--quantize-lm-head needs --recipe")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        if args.backend != "reference":
            rep = prepare_for_inference(model, args.backend)
            desc += " kernels " + ",".join(f"{k}x{v}" for k, v in sorted(rep["backends"].items()))
        else:
            desc += " reference kernels"
    return model, tok, desc


class _Streamer:
    """Print each token's text as soon as it is chosen (decoding the whole tail so multi-byte
    characters and merged spaces come out right)."""

    def __init__(self, tok, out=None):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], ""

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character; wait for the rest
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


def _report(res, desc: str) -> None:
    import torch
    print(f"\n[{desc}; threads {torch.get_num_threads()}] prompt {res.prompt_tokens} tok "
          f"@ {res.prompt_tokens_per_s:.1f} tok/s | decode {len(res.tokens)} tok "
          f"@ {res.decode_tokens_per_s:.1f} tok/s ({res.stopped_by})", file=sys.stderr)


def _eos(tok, model) -> list[int]:
    ids = {tok.eos_token_id}
    cfg = getattr(model, "generation_config", None)
    e = getattr(cfg, "eos_token_id", None)
    ids.update(e if isinstance(e, list) else [e])
    return [i for i in ids if i is not None]


def run_generate(args) -> int:
    from lowbit.nn.decode import generate
    model, tok, desc = prepare_model(args)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    print(args.prompt, end="", flush=True)
    res = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed, eos_token_id=_eos(tok, model), on_token=_Streamer(tok),
                   kv_cache=args.kv_cache)
    _report(res, desc + ("" if args.kv_cache == "float" else f", {args.kv_cache} KV cache"))
    return 0


def chat_input_ids(tok, messages: list[dict]):
    from lowbit.errors import LowbitError
    if not getattr(tok, "chat_template", None):
        raise LowbitError("this tokenizer has no chat template; use `lowbit generate` instead")
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"]


def run_chat(args) -> int:
    from lowbit.nn.decode import generate
    model, tok, desc = prepare_model(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return 0
            user = turns.pop(0)
        else:
            try:
                user = input("you> ")
            except EOFError:
                return 0
            if user.strip() in ("", "/exit", "/quit"):
                return 0
        messages.append({"role": "user", "content": user})
        ids = chat_input_ids(tok, messages)
        stream = _Streamer(tok)
        print("assistant> ", end="", flush=True)
        res = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed, eos_token_id=_eos(tok, model), on_token=stream,
                       kv_cache=args.kv_cache)
        _report(res, desc + ("" if args.kv_cache == "float" else f", {args.kv_cache} KV cache"))
        messages.append({"role": "assistant", "content": stream.shown.strip()})
