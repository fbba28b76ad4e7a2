"""Write a checkpoint with Llama-2-7B's shapes and random fp16 weights (no download) as
safetensors shards + index + config.json, for the streaming benchmark (BENCHMARKS.md).

    python bench/make_7b_checkpoint.py BIG/llama2-7b-shaped      (~13.5 GB; ~2 GB shards)
    python bench/make_7b_checkpoint.py BIG/llama2-7b-2l --layers 2   (~1.4 GB: 2 of the 32 blocks)
    python bench/make_7b_checkpoint.py BIG/b7-tok --tokenizer-from DIR   (DIR's tokenizer files copied,
        vocab_size set to that tokenizer's: a GGUF export needs a tokenizer, and no Llama-2 one is here)

--layers N keeps the first N decoder blocks (all 32 of Llama-2-7B have the same shapes, so one
block's peak memory and time are every block's) with the full embedding and lm_head.

(BIG: any directory outside the repo with ~20 GB free)

Weights are N(0, 0.02) values (norms 1): a pool of 2^25 values drawn once from a seeded generator,
each tensor a different window of it (drawing 6.7e9 normals takes too long on a shared 2-core box;
the quantizer sees random, distinct rows either way). RAM: the pool, one shard being written.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
          "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
          "hidden_act": "silu", "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}


def tensors(cfg: dict):
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    yield "model.embed_tokens.weight", (v, h)
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{n}.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


POOL = 2**25


def _fill(pool: torch.Tensor, shape: tuple, start: int) -> torch.Tensor:
    """A (rows, cols) fp16 tensor whose rows are consecutive windows of the pool from `start`."""
    n = shape[0] * shape[1]
    reps = -(-n // POOL)
    flat = torch.cat([pool[start + r:start + r + POOL] for r in range(reps)])[:n]
    return flat.reshape(shape).clone()


def main(out: Path, shard_bytes: int = 2 * 10**9, layers: int | None = None, tokenizer_from: Path | None = None) -> None:
    cfg = dict(CONFIG)
    if tokenizer_from is not None:
        import shutil

        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer_from)
        cfg["vocab_size"] = len(tok)
        for k in ("bos_token_id", "eos_token_id"):
            cfg[k] = getattr(tok, k)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                     "merges.txt", "tokenizer.model"):
            if (Path(tokenizer_from) / name).is_file():
                shutil.copyfile(Path(tokenizer_from) / name, out / name)
    if layers is not None:
        if not 1 <= layers <= CONFIG["num_hidden_layers"]:
            raise SystemExit(f"--layers: expected 1..{CONFIG['num_hidden_layers']}, got {layers}")
        cfg["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = torch.Generator().manual_seed(7)
    pool = (torch.randn(POOL + 2**20, generator=gen) * 0.02).half()
    starts = torch.randint(0, 2**20, (10_000,), generator=gen).tolist()
    shard, size, n, wmap, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            wmap.update({k: name for k in shard})
            shard, size = {}, 0
    for k, (name, shape) in enumerate(tensors(cfg)):
        t = torch.ones(shape, dtype=torch.float16) if len(shape) == 1 else _fill(pool, shape, starts[k])
        if size + t.numel() * 2 > shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}: {total / 1e9:.2f} GB in {n} shards")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write a random checkpoint with Llama-2-7B's shapes.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks to write (default 32)")
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="copy this directory's tokenizer; vocab_size becomes its size")
    a = ap.parse_args()
    main(a.out, layers=a.layers, tokenizer_from=a.tokenizer_from)
