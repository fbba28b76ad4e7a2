"""The formats layer: one module per file format, behind one registry.

Every format registers a `Format` with

    detect(path) -> bool                      is this file / directory ours to read?
    write(qm: QuantizedModel, out, **opts)    -> Path   (never quantizes; refuses what it can't hold)
    read(path, dtype=float32, backend=None)   -> LoadedModel (QuantLinear modules, or PackedLinear
                                                 with kernels when backend is given)

`QuantizedModel` is what every writer receives: the model quantized in place by api.quantize,
every QuantizedWeight by module name (embeddings included, which the model serves dequantized),
and the provenance that goes in the manifest. lowbit.models.load_model dispatches to `read`
through `detect_format`; api.export to `write`.

    qm = QuantizedModel.from_report(lm, report)
    get_format("gptq").write(qm, "out/smollm2-gptq")
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.models.base import LoadedModel


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[Path], bool]
    write: Callable[..., Path]
    read: Callable[..., LoadedModel] | None = None
    suffix: str = ""          # "" = a directory; ".gguf", ".onnx" for single files
    # what a format holds, for choosing and for clear refusals (checked again per tensor on write)
    holds: str = ""


_FORMATS: dict[str, Format] = {}
# modules that register a format when imported (kept lazy: importing lowbit stays cheap)
FORMAT_MODULES = ["lowbit.export.native", "lowbit.export.gguf", "lowbit.export.gptq",
                  "lowbit.export.awq", "lowbit.export.compressed_tensors", "lowbit.export.onnx",
                  "lowbit.export.bnb"]


def register_format(fmt: Format) -> Format:
    _FORMATS[fmt.name] = fmt
    return fmt


def _load_all() -> None:
    for mod in FORMAT_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:   # a format module not written yet / optional deps absent
            if e.name != mod:
                raise


def formats() -> dict[str, Format]:
    _load_all()
    return dict(_FORMATS)


def get_format(name: str) -> Format:
    fmts = formats()
    if name not in fmts:
        raise LowbitError(f"format {name!r}: unknown; expected one of {', '.join(sorted(fmts))}")
    return fmts[name]


def detect_format(path: str | os.PathLike, readable: bool = True) -> Format | None:
    """The format that recognises `path` (native first), or None (a float checkpoint).
    readable=True: only formats lowbit reads back as a torch model."""
    p = Path(path)
    for fmt in formats().values():
        if (fmt.read is not None or not readable) and fmt.detect(p):
            return fmt
    return None


def recipe_and_provenance(man: dict, source, sha256) -> tuple[object, dict]:
    """A read-back manifest's recipe (or None) and the provenance a re-export carries on."""
    from lowbit.recipe import Recipe
    recipe = Recipe.from_dict(man["lowbit_recipe"]) if man.get("lowbit_recipe") else None
    prov = {"source": dict(man.get("source", {"model": str(source), "sha256": sha256})),
            "calibration": dict(man.get("calibration", {})), "notes": list(man.get("notes", [])),
            "layers": _manifest_methods(man), "metrics": dict(man.get("metrics", {}))}
    return recipe, prov


def _manifest_methods(man: dict) -> dict:
    """{layer: {"method": ...}} from a read-back manifest's layer rows, so a re-export records
    which method made each layer (as the first export did), not null. Malformed rows are skipped."""
    rows = man.get("layers")
    if not isinstance(rows, dict):
        return {}
    return {n: {"method": r["method"]} for n, r in rows.items()
            if isinstance(r, dict) and isinstance(r.get("method"), str)}


@dataclass
class QuantizedModel:
    """A quantized model ready to write: what every format's write() receives."""
    model: nn.Module                      # quantized in place (QuantLinear modules)
    tokenizer: object
    source_dir: Path                      # an HF directory: config.json and tokenizer files
    qweights: dict                        # module name -> QuantizedWeight (linears and embeddings)
    kinds: dict[str, str]                 # module name -> "linear" | "embedding"
    recipe: object = None                 # lowbit.recipe.Recipe, or None when unknown
    provenance: dict = field(default_factory=dict)   # source, calibration, notes, layers, metrics
    # qweights are read from disk on each use and writers build one layer's tensors at a time
    # (native.read_for_export: a streamed run's conversion); the bytes written are the same
    lazy: bool = False

    @classmethod
    def from_report(cls, lm: LoadedModel, report, metrics: dict | None = None) -> "QuantizedModel":
        """From api.quantize's report on lm.model."""
        if not report.qweights:
            raise LowbitError("export: the report holds no quantized weights (nothing was quantized)")
        kinds = {n: ("embedding" if isinstance(lm.model.get_submodule(n), nn.Embedding) else "linear")
                 for n in report.qweights}
        prov = {"source": {"model": str(lm.source), "sha256": lm.source_sha256 or _source_sha256(lm.path)},
                "calibration": dict(report.calibration), "notes": list(report.notes),
                "layers": {r["name"]: r for r in report.layers}, "metrics": dict(metrics or {}),
                "imatrix": dict(getattr(report, "imatrix", {}) or {})}
        return cls(lm.model, lm.tokenizer, Path(lm.path), dict(report.qweights), kinds, report.recipe, prov)

    @classmethod
    def from_loaded(cls, lm: LoadedModel) -> "QuantizedModel":
        """From a quantized model read back by a format reader (re-export to another format)."""
        from lowbit.nn.qlinear import QuantLinear
        from lowbit.nn.vq import VQLinear
        qweights, kinds = {}, {}
        for name, mod in lm.model.named_modules():
            if isinstance(mod, QuantLinear):
                if getattr(mod, "packed", None) is not None and not hasattr(mod, "qdata"):
                    raise LowbitError(f"export: {name} holds packed kernels only; load without kernels")
                qweights[name], kinds[name] = mod.qweight, "linear"
            elif isinstance(mod, VQLinear):
                qweights[name], kinds[name] = mod.qweight, "linear"
        for name, qw in lm.meta.get("qweights", {}).items():   # quantized embeddings, served dequantized
            qweights[name], kinds[name] = qw, "embedding"
        from lowbit.nn.bnb4 import bnb_modules
        for name, mod in bnb_modules(lm.model).items():          # bitsandbytes-style layers (format bnb)
            qweights[name], kinds[name] = mod, "bnb"
        if not qweights:
            raise LowbitError(f"export: {lm.source} has no quantized module; quantize it first "
                              "(lowbit quantize MODEL --recipe ... or api.quantize)")
        recipe, prov = recipe_and_provenance(lm.meta.get("manifest", {}), lm.source, lm.source_sha256)
        return cls(lm.model, lm.tokenizer, Path(lm.path), qweights, kinds, recipe, prov)

    def bias(self, name: str) -> torch.Tensor | None:
        b = getattr(self.model.get_submodule(name), "bias", None)
        return b.detach() if isinstance(b, torch.Tensor) else None

    @property
    def config(self):
        return self.model.config


def _source_sha256(path) -> str | None:
    """sha256 of a float checkpoint's weights: its one safetensors file, or of the shards' hashes."""
    from lowbit.io import sha256_file
    p = Path(path)
    shards = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not shards:
        return None
    if len(shards) == 1:
        return sha256_file(shards[0])
    import hashlib
    return hashlib.sha256("".join(sha256_file(s) for s in shards).encode()).hexdigest()
