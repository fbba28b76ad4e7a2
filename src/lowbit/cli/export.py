"""`lowbit export MODEL --format FORMAT --out OUT`: write a model in an engine's format.

MODEL is either a quantized output lowbit reads (a lowbit native / GPTQ / AWQ / compressed-tensors
directory): it is written in FORMAT with its codes as they are (GGUF re-encodes only what no ggml
type holds, and says so); or a float model (built-in name, .gguf, HF directory), quantized first
by --recipe (or, for GGUF, the mix --type, with --imatrix as llama-quantize uses it):

    lowbit export out/w4g32 --format gguf --out out/w4g32.gguf          # codes unchanged (Q4_0)
    lowbit export smollm2-135m --format gguf --type q4_k_m --imatrix im.gguf --out q4km.gguf
    lowbit export out/w4g128-gptq --format gptq --out out/gptq
    lowbit export smollm2-135m --format bnb --quantization nf4 --double-quant --out out/nf4   # bitsandbytes

Every path goes through api.quantize and api.export (lowbit.export's registry).
"""
from __future__ import annotations

import sys


def register(sub) -> None:
    from lowbit.presets.gguf_mixes import MIXES
    p = sub.add_parser("export", help="write a model in a deployment format (gguf, gptq, awq, "
                                      "compressed-tensors, onnx, native)")
    p.add_argument("model", help="a quantized output directory, or a float model (built-in name, .gguf, HF dir)")
    p.add_argument("--format", default="gguf", help="output format: gguf (default), native, gptq, awq, compressed-tensors, onnx, bnb")
    p.add_argument("--type", default="q4_k_m", choices=sorted(MIXES), metavar="TYPE",
                   help=f"GGUF mix for a float model: {', '.join(MIXES)} (default q4_k_m)")
    p.add_argument("--recipe", default=None, help="recipe for a float model (preset or JSON; overrides --type)")
    p.add_argument("--imatrix", default=None, help="importance matrix (lowbit imatrix / llama-imatrix file)")
    p.add_argument("--tokenizer-pre", default=None, help="GGUF: llama.cpp pre-tokenizer name (default: from the "
                   "source GGUF, else detected from tokenizer.json)")
    p.add_argument("--refine", action="store_true", help="GGUF with --imatrix: lowbit's block refinement "
                   "(lower weighted error than llama.cpp's search; the bytes then differ from llama.cpp's)")
    p.add_argument("--reencode", default=None, metavar="GGML_TYPE",
                   help="GGUF from an int-quantized model: the ggml type for weights that are not exactly "
                        "one (default by bit width: 4-bit -> Q4_K, with llama.cpp's fallbacks)")
    p.add_argument("--ternary-type", default="tq2_0", choices=("tq2_0", "tq1_0"),
                   help="GGUF from a ternary (BitNet) model: TQ2_0 (default) or TQ1_0 for rows that are "
                        "multiples of 256; other rows go to Q8_0, exactly")

    p.add_argument("--quantization", default=None, choices=["nf4", "fp4", "int8"],
                   help="--format bnb from a float model: bitsandbytes-style 4-bit / 8-bit layers (default nf4)")
    p.add_argument("--double-quant", action="store_true", help="--format bnb: 8-bit absmax constants (QLoRA)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier lowbit output")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from lowbit import api
    from lowbit.errors import LowbitError
    from lowbit.export import detect_format, get_format
    from lowbit.export.common import check_output
    from lowbit.models import resolve_source
    from lowbit.recipe import get_recipe

    fmt = get_format(args.format)
    check_output(args.out, args.overwrite, single_file=bool(fmt.suffix))
    kind, path = resolve_source(args.model)
    src_fmt = detect_format(path) if kind == "hf" else None
    opts = {}
    if fmt.name == "gguf":
        opts = {"tokenizer_pre": args.tokenizer_pre, "reencode": args.reencode, "progress": not args.quiet,
                "ternary_type": args.ternary_type}
    elif args.reencode or args.tokenizer_pre:
        raise LowbitError("--reencode / --tokenizer-pre apply to --format gguf only")
    if (args.quantization or args.double_quant) and fmt.name != "bnb":
        raise LowbitError("--quantization / --double-quant apply to --format bnb only")
    if fmt.name == "bnb" and src_fmt is None:
        if args.recipe or args.imatrix or args.refine:
            raise LowbitError("--format bnb quantizes with --quantization nf4|fp4|int8, not --recipe / --imatrix")
        lm = api.load(args.model, quantization=args.quantization or "nf4", double_quant=args.double_quant)
        out = api.export(lm, None, args.out, fmt.name, overwrite=args.overwrite)
        _summary(out, fmt.name, f"{args.quantization or 'nf4'}{' + double quant' if args.double_quant else ''}")
        return 0
    if src_fmt is not None:
        if args.recipe or args.imatrix or args.refine:
            raise LowbitError(f"{args.model} is already quantized ({src_fmt.name}); --recipe / --imatrix / "
                              "--refine apply to float models")
        from lowbit.export.native import convert
        out = convert(path, args.out, fmt.name, overwrite=args.overwrite, **opts)    # native: layer by layer
        _summary(out, fmt.name, f"from {src_fmt.name}")
        return 0
    recipe = get_recipe(args.recipe or args.type)
    if args.refine:
        if not args.imatrix:
            raise LowbitError("--refine needs --imatrix")
        from lowbit.presets.gguf_mixes import with_refine
        recipe = with_refine(recipe)
    lm = api.load(args.model)
    rep = api.quantize(lm.model, recipe, tokenizer=lm.tokenizer, imatrix=args.imatrix, progress=not args.quiet)
    if args.imatrix and rep.imatrix:
        rep.imatrix["file"] = str(args.imatrix)
    out = api.export(lm, rep, args.out, fmt.name, overwrite=args.overwrite, **opts)
    _summary(out, fmt.name, f"{rep.recipe.name}{', imatrix' if args.imatrix else ''}{', refined' if args.refine else ''}")
    for n in rep.notes:
        print(f"note: {n}", file=sys.stderr)
    return 0


def _summary(out, fmt: str, how: str) -> None:
    import json
    from pathlib import Path

    from lowbit.export.manifest import find_manifest
    out = Path(out)
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({fmt}, {how}): {size / 2**20:.1f} MiB")
    try:
        m = json.loads(find_manifest(out).read_text())
    except Exception:
        return
    g = m.get("gguf") or {}
    if g:
        used: dict[str, int] = {}
        n_fb = 0
        for row in g.get("tensors", {}).values():
            used[row["used"]] = used.get(row["used"], 0) + 1
            if row["wanted"] != row["used"]:
                n_fb += 1
                print(f"fallback: {row['hf']:40s} wanted {row['wanted']:5s} used {row['used']}")
        print(f"{len(g.get('tensors', {}))} tensors (" + ", ".join(f"{k} {v}" for k, v in sorted(used.items()))
              + f"), {n_fb} fallback(s)")
        if g.get("exact_int"):
            print(f"{len(g['exact_int'])} int weight(s) written with their codes unchanged")
        for r in g.get("reencoded", []):
            print(f"re-encoded: {r['name']:40s} {r['scheme']} -> {r['type']}, relative RMS error {r['rel_rms_error']:.4f}")
