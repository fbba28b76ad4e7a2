"""`lowbit verify PATH`: check an output against its manifest (every file's sha256, nothing unlisted)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("verify", help="check a lowbit output (any format) against its manifest's sha256s")
    p.add_argument("path", help="an output directory, or a .gguf / .onnx file with its .lowbit.json sidecar")
    p.set_defaults(func=run)


def run(args) -> int:
    from lowbit.export.manifest import verify
    r = verify(args.path)
    print(f"ok: {args.path}: format {r['format']}, {r['files']} file(s) match {r['manifest']}")
    return 0
