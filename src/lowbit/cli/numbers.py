"""`lowbit formats`, `lowbit estimate`, `lowbit inspect`: what numbers cost.

    lowbit formats [--values 0.1234 75535]           each format's bits, range, step near 1.0,
                                                     bytes per parameter, and how values survive
    lowbit estimate --params 70e9 [--format int4] [--group-size 128] [--symmetric]
    lowbit inspect MODEL_DIR|NAME|FILE.gguf [--group-size 128]
"""
from __future__ import annotations

import math

DEFAULT_VALUES = (0.1234, 3.14159, 75535.0, 1e-05)
INSPECT_FORMATS = ("fp32", "bf16", "fp8_e4m3", "int8", "int4", "nf4", "int3", "int2", "ternary")


def register(sub) -> None:
    p = sub.add_parser("formats", help="number formats: bits, range, step near 1.0, bytes/param, casts")
    p.add_argument("--values", type=float, nargs="+", default=list(DEFAULT_VALUES),
                   help="values to cast into each format (default: %(default)s)")
    p.set_defaults(func=run_formats)

    p = sub.add_parser("estimate", help="weight memory of N parameters at each format, scales included")
    p.add_argument("--params", type=float, required=True, help="number of parameters, e.g. 70e9")
    p.add_argument("--format", default=None,
                   help="int2..int8, nf4, fp4, ternary, fp8_e4m3, fp8_e5m2, fp16, bf16, fp32 (default: all)")
    p.add_argument("--group-size", type=int, default=128,
                   help="values per scale; 0 = one scale per tensor, -1 = per channel (needs --in-features)")
    p.add_argument("--in-features", type=int, default=None, help="input width, for --group-size -1")
    p.add_argument("--symmetric", action="store_true", help="int formats: no zero point (scale only)")
    p.add_argument("--scale-bits", type=int, default=16, help="bits per stored scale (default 16)")
    p.set_defaults(func=run_estimate)

    p = sub.add_parser("inspect", help="a checkpoint's parameters by dtype and module, and its size at each format")
    p.add_argument("model", help="a Hugging Face directory, a built-in name (smollm2-135m) or a .gguf")
    p.add_argument("--group-size", type=int, default=128, help="group size for the quantized sizes")
    p.set_defaults(func=run_inspect)


# ---------------------------------------------------------------------------------------------
def _fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    if math.isinf(v) or math.isnan(v):
        return str(v)
    a = abs(v)
    return f"{v:.6g}" if 1e-4 <= a < 1e7 else f"{v:.3e}"


def run_formats(args) -> int:
    import torch

    from lowbit.numerics.formats import FORMATS
    values = torch.tensor(args.values, dtype=torch.float64)
    if not bool(torch.isfinite(values).all()):
        from lowbit.errors import LowbitError
        raise LowbitError(f"--values: expected finite numbers, got {args.values}")
    head = ["format", "bits", "min", "max", "step@1.0", "bytes/param"] + [f"{v:g} ->" for v in args.values]
    rows = []
    for name, f in FORMATS.items():
        x = values.float()
        sat = f.cast(x).tolist()
        cells = []
        raw_cast = f.cast(x, saturate=False).tolist() if f.kind == "float" else sat
        for v, s, raw in zip(args.values, sat, raw_cast):
            note = ""
            r = round(v) if f.kind == "int" else v      # an int saturates only if the rounded value is out
            if r > f.max_value or r < f.min_value:
                note = " (sat)" if math.isfinite(raw) else f" (sat; .to() gives {raw})"
            cells.append(_fmt_num(s) + note)
        bits = f"{f.storage_bits:g}" if f.kind != "codebook" or f.info_bits == f.storage_bits \
            else f"{f.storage_bits:g} ({f.info_bits:.2f} info)"
        rows.append([name, bits, _fmt_num(f.min_value), _fmt_num(f.max_value), _fmt_num(f.step_near_one()),
                     f"{f.bytes_per_param:g}"] + cells)
    _print_table(head, rows)
    print()
    print("Casts round to nearest (ties to even) and saturate at the range (sat); float32 shown as stored.")
    print("nf4 / fp4 / ternary values are in units of a per-group scale (absmax, absmax/6, absmean):")
    print("quantizing divides by the scale first. int rows are the bare integer grid (scale 1).")
    for name in ("nf4", "fp4", "ternary"):
        print(f"  {name}: {FORMATS[name].description}")
    return 0


def run_estimate(args) -> int:
    from lowbit.numerics.memory import ESTIMATE_FORMATS, estimate_weight_memory, human_bytes
    fmts = [args.format] if args.format else list(ESTIMATE_FORMATS)
    g = args.group_size
    gran = {0: "one scale per tensor", -1: "one scale per output channel"}.get(g, f"group size {g}")
    head = ["format", "bits/weight", "codes", "scales", "zeros", "total", "total GiB"]
    rows = []
    for f in fmts:
        m = estimate_weight_memory(args.params, f, g, symmetric=args.symmetric, scale_bits=args.scale_bits,
                                   in_features=args.in_features)
        rows.append([f, f"{m.bits_per_weight:.4f}", human_bytes(m.code_bytes), human_bytes(m.scale_bytes),
                     human_bytes(m.zero_bytes), human_bytes(m.total_bytes), f"{m.total_bytes / 2**30:.2f}"])
    ints = "symmetric (no zero point)" if args.symmetric else "asymmetric (zero point at the code width)"
    print(f"weights: {args.params:,.0f} parameters; {gran}; scales at {args.scale_bits} bits; int formats {ints}")
    _print_table(head, rows)
    print("GB = 1e9 bytes. Weights only: add the KV cache and activations for serving memory. "
          "ternary counts 1.6 bits (5 trits per byte).")
    return 0


def run_inspect(args) -> int:
    from lowbit.models.inventory import DTYPE_BITS, checkpoint_tensors
    from lowbit.models.load import gguf_to_hf_dir, resolve_source
    from lowbit.numerics.memory import human_bytes, tensor_weight_memory
    kind, path = resolve_source(args.model)
    where = str(path)
    if kind == "gguf":
        path, _ = gguf_to_hf_dir(path)
        where = f"{where}\n  read from its dequantized copy {path}"
    tensors = checkpoint_tensors(path)
    n_total = sum(t.numel for t in tensors)
    b_total = sum(t.nbytes for t in tensors)
    print(f"checkpoint: {where}")
    print(f"{len(tensors)} tensors in {len({t.file for t in tensors})} safetensors file(s); "
          f"{n_total:,} parameters; {human_bytes(b_total)} now")
    print()
    by_dtype: dict[str, list[int]] = {}
    for t in tensors:
        acc = by_dtype.setdefault(t.dtype, [0, 0, 0])
        acc[0] += 1
        acc[1] += t.numel
        acc[2] += t.nbytes
    _print_table(["dtype", "tensors", "parameters", "bytes"],
                 [[d, str(a[0]), f"{a[1]:,}", human_bytes(a[2])] for d, a in sorted(by_dtype.items())])
    print()
    by_mod: dict[str, list] = {}
    for t in tensors:
        acc = by_mod.setdefault(t.module, [0, 0, 0, set(), set()])
        acc[0] += 1
        acc[1] += t.numel
        acc[2] += t.nbytes
        acc[3].add(t.dtype)
        acc[4].add("x".join(map(str, t.shape)))
    _print_table(["module (block index as N)", "tensors", "parameters", "dtype", "shape", "bytes"],
                 [[m, str(a[0]), f"{a[1]:,}", ",".join(sorted(a[3])), ",".join(sorted(a[4])), human_bytes(a[2])]
                  for m, a in by_mod.items()])
    print()
    quant = [t for t in tensors if t.is_block_linear_weight]
    rest = [t for t in tensors if not t.is_block_linear_weight]
    n_q = sum(t.numel for t in quant)
    g = args.group_size
    print(f"at each format: the {len(quant)} 2-D linear weights inside blocks ({n_q:,} parameters, "
          f"{100 * n_q / max(n_total, 1):.1f}%) at the format, group size {g}, asymmetric int "
          "(ragged last groups counted); the other tensors at min(stored, 16) bits (fp32 row: 32)")
    rows = [["now (as stored)", human_bytes(b_total), f"{8 * b_total / max(n_total, 1):.2f}"]]
    for f in INSPECT_FORMATS:
        other_bits = 32 if f == "fp32" else 16
        q_bytes = sum(tensor_weight_memory(t.shape, f, g).total_bytes for t in quant)
        r_bytes = sum(t.numel * min(DTYPE_BITS.get(t.dtype, 32), other_bits) / 8 if f != "fp32"
                      else t.numel * 4 for t in rest)
        total = q_bytes + r_bytes
        rows.append([f, human_bytes(total), f"{8 * total / max(n_total, 1):.2f}"])
    _print_table(["format", "total", "bits/param"], rows)
    return 0


def _print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
