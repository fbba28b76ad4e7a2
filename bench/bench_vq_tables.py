"""The vector codebooks' two decode tables side by side on a saved lowbit model: the 16-bit tables
(byte permutes on AVX-512 VBMI + VNNI, AVX2 byte shuffles for codebooks of <= 64 entries) against
the float tables (gathers), token by token through the KV cache, as decode runs them (one row of x
per linear). LOWBIT_ISA=avx2 in the environment runs the AVX2 variant.

    .venv/bin/python bench/bench_vq_tables.py bench/_work/low20/gptq/models/vq-w2g64 --tokens 128

Prints KL(float || 16-bit) per token (mean, max), top-1 agreement and both perplexities over the
first --tokens tokens of wiki-evaluation.
"""
from __future__ import annotations

import argparse

import torch

from lowbit import api
from lowbit.data.text import load_text
from lowbit.nn import ext
from lowbit.nn.vq import table_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a saved lowbit native directory with vq layers")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not ext.load():
        raise SystemExit(f"the compiled kernels are not loaded: {ext.status()}")
    op = torch.ops.lowbit_cpu
    torch.set_num_threads(args.threads)
    lm = api.load(args.model, backend="auto")
    model = lm.model.eval()
    ids = lm.tokenizer(load_text("wiki-evaluation"), return_tensors="pt").input_ids[:, :args.tokens]

    def run(i16: bool) -> tuple[str, torch.Tensor]:
        prev = op.set_vq_i16(i16)
        try:
            kernel, out, cache = table_kernels(model), [], None
            with torch.no_grad():
                for t in range(ids.shape[1]):
                    r = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                    cache = r.past_key_values
                    out.append(r.logits[0, -1].double().log_softmax(-1))
            return kernel, torch.stack(out)
        finally:
            op.set_vq_i16(prev)

    _, a = run(False)
    kb, b = run(True)
    if "i16" not in kb:
        print(f"note: this CPU runs float tables only here ({kb}; 16-bit tables need AVX-512 VBMI + VNNI, "
              f"or AVX2 for codebooks of <= 64 entries)")
    kl = (a.exp() * (a - b)).sum(-1)
    tgt = ids[0, 1:, None]
    ppl_a = float((-a[:-1].gather(1, tgt).mean()).exp())
    ppl_b = float((-b[:-1].gather(1, tgt).mean()).exp())
    agree = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    print(f"{ext.isa()}, {ids.shape[1]} tokens: KL(float tables || {kb}) mean {float(kl.mean()):.2e} max {float(kl.max()):.2e}, "
          f"top-1 agreement {agree:.4f}, PPL float tables {ppl_a:.3f} / 16-bit {ppl_b:.3f}")


if __name__ == "__main__":
    main()
