"""`lowbit imatrix MODEL --out FILE [--text wiki-calibration] [--chunks 64] [--seq-len 512]`

Collects llama.cpp's importance matrix (per input column mean of x^2 over calibration tokens) for
every linear layer of the transformer blocks, and writes it in llama.cpp's GGUF imatrix format
(or the legacy format when FILE ends in .dat), usable by `lowbit export --imatrix` and llama-quantize.
"""
from __future__ import annotations

from lowbit.cli.argtypes import positive_int


def register(sub) -> None:
    p = sub.add_parser("imatrix", help="collect an importance matrix (llama.cpp's format) on calibration text")
    p.add_argument("model", help="built-in name, .gguf file or Hugging Face directory")
    p.add_argument("--out", required=True, help="output file (.gguf = llama.cpp's format, .dat = legacy)")
    p.add_argument("--text", default="wiki-calibration", help="named text, file or directory")
    p.add_argument("--chunks", type=positive_int, default=64, help="windows of --seq-len tokens")
    p.add_argument("--seq-len", type=positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from lowbit.calibration.imatrix import compute_imatrix
    from lowbit.export.common import check_writable
    from lowbit.models import load_model
    check_writable(args.out, single_file=True)     # before the run, not after it
    loaded = load_model(args.model)
    im = compute_imatrix(loaded, args.text, args.chunks, args.seq_len, args.seed, progress=not args.quiet)
    im.save(args.out)
    tokens = max(im.counts.values())
    print(f"wrote {args.out}: {len(im.sums)} tensors, {tokens} tokens ({im.chunk_count} chunks of {args.seq_len})")
    return 0
