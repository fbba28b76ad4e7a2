"""`lowbit export MODEL --format gguf --type q4_k_m [--imatrix FILE] --out FILE.gguf`

MODEL is a built-in name, a .gguf file or a Hugging Face directory. Each format is one entry in
EXPORTERS (format -> function taking the parsed args); add a format by adding an entry.
"""
from __future__ import annotations

import sys


def _export_gguf(args) -> int:
    from lowbit.export.gguf.writer import export_gguf
    if not args.out.endswith(".gguf"):
        print(f"lowbit export: note: {args.out} does not end in .gguf", file=sys.stderr)
    rep = export_gguf(args.model, args.out, args.recipe or args.type, imatrix=args.imatrix,
                      tokenizer_pre=args.tokenizer_pre, refine=args.refine, progress=not args.quiet)
    for t in rep.fallbacks:
        print(f"fallback: {t.name:32s} wanted {t.wanted:5s} used {t.used:5s} "
              f"(row of {t.shape[-1]} is not a multiple of {t.wanted}'s block)")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(rep.type_counts().items()))
    print(f"wrote {rep.path}: {rep.file_bytes / 2**20:.1f} MiB, {rep.bits_per_weight:.3f} bits/weight, "
          f"{len(rep.tensors)} tensors ({counts}), {len(rep.fallbacks)} fallback(s), "
          f"imatrix {'yes' if args.imatrix else 'no'}{', refined' if args.refine else ''}, {rep.seconds:.1f} s")
    return 0


EXPORTERS = {"gguf": _export_gguf}


def register(sub) -> None:
    from lowbit.presets.gguf_mixes import MIXES
    p = sub.add_parser("export", help="write a model in a deployment format (GGUF for llama.cpp)")
    p.add_argument("model", help="built-in name, .gguf file or Hugging Face directory")
    p.add_argument("--format", choices=sorted(EXPORTERS), default="gguf")
    p.add_argument("--type", default="q4_k_m", choices=sorted(MIXES), metavar="TYPE",
                   help=f"GGUF mix: {', '.join(MIXES)} (default q4_k_m)")
    p.add_argument("--recipe", default=None, help="a recipe JSON with ggml formats (overrides --type)")
    p.add_argument("--imatrix", default=None, help="importance matrix (lowbit imatrix / llama-imatrix file)")
    p.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name (default: from the "
                   "source GGUF, else detected from tokenizer.json)")
    p.add_argument("--refine", action="store_true", help="with --imatrix: lowbit's block refinement "
                   "(lower weighted error than llama.cpp's search; the bytes then differ from llama.cpp's)")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=lambda a: EXPORTERS[a.format](a))
