"""The manifest every lowbit output carries, and `verify`.

A directory output holds its manifest as a JSON file (lowbit.json for the native format,
lowbit_manifest.json beside the files of foreign formats: GPTQ, AWQ, compressed-tensors, ONNX);
a single-file output (GGUF) has it as a sidecar FILE.lowbit.json. Fields:

    format, lowbit_version      what wrote it
    lowbit_recipe               the Recipe (with the calibration settings used)
    source                      {model, sha256}: what was quantized
    calibration                 CalibrationConfig of the run; calibration_text_sha256 of the text's bytes
    layers                      per quantized module: scheme, method, shape, bits_per_weight, ...
    notes, metrics              what the run reported; evaluation results when given
    files                       {name: sha256} of every other file of the output

No timestamps or timings: the same inputs give the same bytes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.io import sha256_file

FOREIGN = "lowbit_manifest.json"


def provenance(qm, fmt: str, layers: dict | None = None, extra: dict | None = None) -> dict:
    import lowbit
    calib = dict(qm.provenance.get("calibration", {}))
    text_sha = _text_sha256(calib["text"]) if calib.get("text") else None
    return {"format": fmt, "lowbit_version": lowbit.__version__,
            "lowbit_recipe": None if qm.recipe is None else qm.recipe.to_dict(),
            "source": dict(qm.provenance.get("source", {})), "calibration": calib,
            "calibration_text_sha256": text_sha,
            "layers": layers if layers is not None else _layer_rows(qm),
            "notes": list(qm.provenance.get("notes", [])), "metrics": dict(qm.provenance.get("metrics", {})),
            **(extra or {})}


def _layer_rows(qm) -> dict:
    rows = qm.provenance.get("layers", {})
    out = {}
    # a mapping that makes each layer on demand (streaming_gguf.QuantizedOnRead) describes it again
    describe = getattr(qm.qweights, "describe", None)
    for name in qm.qweights:
        qw = describe(name) if describe is not None else qm.qweights[name]
        r = rows.get(name, {})
        out[name] = {"kind": qm.kinds[name], "scheme": qw.scheme.short_name(), "method": r.get("method"),
                     "shape": list(qw.shape), "bits_per_weight": round(qw.bits_per_weight, 6),
                     "ragged_last_group": qw.ragged_last_group}
    return out


def _text_sha256(text: str) -> str | None:
    """sha256 of the calibration text's UTF-8 bytes (a named text, a file or a directory)."""
    import hashlib

    from lowbit.data.text import load_text
    try:
        return hashlib.sha256(load_text(text).encode("utf-8")).hexdigest()
    except (LowbitError, OSError):
        return None


def write_manifest(dirpath: Path, manifest: dict, name: str = FOREIGN) -> Path:
    """Hash every other file of `dirpath` into manifest["files"], then write it as `name`."""
    dirpath = Path(dirpath)
    manifest = dict(manifest)
    manifest["files"] = {f.name: sha256_file(f) for f in sorted(dirpath.iterdir())
                         if f.is_file() and f.name != name}
    (dirpath / name).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return dirpath / name


def sidecar(path: Path) -> Path:
    return Path(f"{path}.lowbit.json")


def write_sidecar(path: Path, manifest: dict) -> Path:
    from lowbit.io import atomic_file
    manifest = dict(manifest)
    manifest["files"] = {Path(path).name: sha256_file(path)}
    with atomic_file(sidecar(path), "w") as fh:
        fh.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return sidecar(path)


def find_manifest(path: str | os.PathLike) -> Path:
    p = Path(path)
    cands = [p / n for n in ("lowbit.json", FOREIGN)] if p.is_dir() else [sidecar(p)]
    for c in cands:
        if c.is_file():
            return c
    raise LowbitError(f"{p}: no lowbit manifest ({' or '.join(str(c.name) for c in cands)}); "
                      "not written by lowbit, nothing to verify against")


def read_json(p: Path, what: str = "manifest") -> dict:
    try:
        d = json.loads(Path(p).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"{p}: not a readable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise LowbitError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def verify(path: str | os.PathLike) -> dict:
    """Check every file the manifest lists against its sha256, and that no weights file is
    unlisted. -> {"manifest": path, "format": ..., "files": n}. Raises LowbitError naming the file."""
    p = Path(path)
    mpath = find_manifest(p)
    m = read_json(mpath)
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise LowbitError(f"{mpath}: has no 'files' table of sha256 hashes; cannot verify (refusing "
                          "to treat a manifest without hashes as verified)")
    root = p if p.is_dir() else p.parent
    for fname, digest in sorted(files.items()):
        f = root / fname
        if os.sep in fname or fname.startswith(".."):
            raise LowbitError(f"{mpath}: file entry {fname!r} is not a plain file name")
        if not f.is_file():
            raise LowbitError(f"{f}: listed in {mpath.name} but missing")
        if sha256_file(f) != digest:
            raise LowbitError(f"{f}: sha256 does not match {mpath.name} (file changed or truncated)")
    if p.is_dir():
        extra = [f.name for f in sorted(p.iterdir()) if f.is_file() and f.name != mpath.name
                 and f.name not in files and f.suffix in (".safetensors", ".gguf", ".onnx", ".bin", ".data")]
        if extra:
            raise LowbitError(f"{p}: weights file(s) {extra} are not listed in {mpath.name}")
    return {"manifest": str(mpath), "format": m.get("format"), "files": len(files)}


def read_if_present(path: str | os.PathLike, verify_files: bool = True) -> dict:
    """A directory's lowbit_manifest.json, checked against its sha256s, or {} when it has none
    (a checkpoint another tool wrote)."""
    m = Path(path) / FOREIGN
    if not m.is_file():
        return {}
    if verify_files:
        verify(path)
    return read_json(m, "lowbit manifest")
