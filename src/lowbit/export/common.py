"""What every format's writer and reader share: the output directory, model files, float tensors,
sharded safetensors, and the skeleton model a reader fills in.

Writers build their output under a temporary sibling and rename it into place (`output_dir`), so a
crash never leaves a half-written model; `--overwrite` replaces only a directory that a lowbit
writer made (it has a manifest), never an arbitrary path.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.io import clean_stale, tmp_prefix

# files copied from the source model directory: config and tokenizer, nothing else (no pickles,
# no dotfiles, no symlinks followed)
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
               "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
               "chat_template.jinja", "chat_template.json")
MANIFEST_NAMES = ("lowbit.json", "lowbit_manifest.json")
DEFAULT_MAX_SHARD = 5 * 2**30       # transformers' save_pretrained default (5 GB)


def parse_size(s: str | int | None) -> int | None:
    """'500MB' / '2GiB' / 1000000 -> bytes (None stays None)."""
    if s is None or isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(s), re.I)
    if not m:
        raise LowbitError(f"max_shard_size {s!r}: expected a size such as 500MB, 2GB or 1GiB")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** "_KMGT".index((m[2] or "_").upper()))


def check_output(out: str | os.PathLike, overwrite: bool = False, single_file: bool = False) -> None:
    """Refuse an existing `out` unless overwrite and it is a lowbit output (a directory with a
    manifest, or a file with its .lowbit.json sidecar): never delete an arbitrary path."""
    out = Path(out)
    check_writable(out, single_file)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise LowbitError(f"output {out}: already exists; choose a new path or pass overwrite")
    if single_file:
        ours = out.is_file() and not out.is_symlink() and Path(f"{out}.lowbit.json").is_file()
    else:
        ours = out.is_dir() and not out.is_symlink() and any((out / m).is_file() for m in MANIFEST_NAMES)
    if not ours:
        raise LowbitError(f"output {out}: exists and is not a lowbit output ("
                          f"{'no .lowbit.json sidecar' if single_file else 'no ' + ' or '.join(MANIFEST_NAMES)}"
                          "); refusing to overwrite it")


def check_writable(out: str | os.PathLike, single_file: bool = False) -> None:
    """The nearest existing ancestor of `out` must be a directory we can create entries in (and a
    single-file output must not be an existing directory): a read-only or mistyped output path
    fails before any work, not after the run."""
    out = Path(out)
    if single_file and out.is_dir():
        raise LowbitError(f"output {out}: is a directory; expected a file path")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LowbitError(f"output {out}: {parent} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise LowbitError(f"output {out}: cannot write in {parent} ({e.strerror or e})") from None


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces `out` atomically (rename)."""
    check_output(out, overwrite)
    with replace_dir(out) as tmp:
        yield tmp


@contextlib.contextmanager
def replace_dir(out: str | os.PathLike):
    """The atomic swap alone (the caller has checked `out`): yield a temporary sibling directory;
    on success it replaces `out` by rename, on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(out), dir=out.parent))
    try:
        yield tmp
        if out.exists():                   # overwrite: swap in the new directory, then drop the old
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_model_files(src: Path, dst: Path, config: dict | None = None) -> None:
    """config.json (the given dict, else the source's) and the tokenizer files of `src`."""
    src = Path(src)
    if config is None:
        config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in MODEL_FILES:
        f = src / name
        if f.is_file() and not f.is_symlink():
            shutil.copyfile(f, dst / name)


def source_config(qm) -> dict:
    cfg = json.loads((Path(qm.source_dir) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    # a transform may untie lm_head from the embedding (transforms/rotate.py): the file says so
    tied = getattr(getattr(qm.model, "config", None), "tie_word_embeddings", None)
    if tied is False and cfg.get("tie_word_embeddings", True):
        cfg["tie_word_embeddings"] = False
    return cfg


def scale_for_file(scale: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Scales as a file stores them: float16 when every value is an fp16 number (lowbit's methods
    round them so before use), else float32. -> (tensor, dtype name)."""
    s16 = scale.to(torch.float16)
    if torch.equal(s16.float(), scale.float()):
        return s16.contiguous(), "float16"
    return scale.float().contiguous(), "float32"


def float_tensors(model: nn.Module, skip_modules: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of `model` outside `skip_modules`, by state_dict name, each storage once.
    -> (tensors, tied) where tied maps a name to the one it shares storage with."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        owner, _, _ = key.rpartition(".")
        if owner in skip_modules:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            tied[key] = seen[ident]
            continue
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise LowbitError(f"tensor {key}: contains NaN/inf; refusing to write a broken model")
        seen[ident] = key
        tensors[key] = value.detach().contiguous()
    return tensors, tied


def shard_plan(sizes: dict[str, int], max_shard_size: int | str | None = None) -> list[list[str]]:
    """Tensor names (sorted) split into shards of at most max_shard_size bytes (default 5 GB)."""
    limit = parse_size(max_shard_size) or DEFAULT_MAX_SHARD
    shards: list[list[str]] = [[]]
    acc = 0
    for k in sorted(sizes):
        if shards[-1] and acc + sizes[k] > limit:
            shards.append([])
            acc = 0
        shards[-1].append(k)
        acc += sizes[k]
    return shards


def shard_name(i: int, n: int, stem: str = "model") -> str:
    return f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shard(tensors: dict[str, torch.Tensor], dst: Path, i: int, n: int, stem: str = "model") -> str:
    # one metadata key only: safetensors keeps header metadata in a hash map, so with two keys
    # their order (and the file's bytes) changed from one save to the next
    from safetensors.torch import save_file
    fname = shard_name(i, n, stem)
    save_file(tensors, str(dst / fname), metadata={"format": "pt"})
    return fname


def write_index(dst: Path, shards: list[list[str]], sizes: dict[str, int], stem: str = "model") -> str:
    weight_map = {k: shard_name(i, len(shards), stem) for i, keys in enumerate(shards) for k in keys}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (dst / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return f"{stem}.safetensors.index.json"


def save_safetensors(tensors, dst: Path, max_shard_size: int | str | None = None,
                     stem: str = "model") -> list[str]:
    """Write `tensors` (a dict, or LayerTensors) as model.safetensors, or as transformers' shards
    model-00001-of-0000N.safetensors + model.safetensors.index.json when they exceed
    max_shard_size (default 5 GB). Tensors keep their sorted-name order; shards split by size.
    -> the file names written."""
    lazy = isinstance(tensors, LayerTensors)
    sizes = tensors.sizes() if lazy else {k: v.numel() * v.element_size() for k, v in tensors.items()}
    shards = shard_plan(sizes, max_shard_size)
    files = []
    for i, keys in enumerate(shards):
        part = tensors.take(keys) if lazy else {k: tensors[k] for k in keys}
        files.append(write_shard(part, dst, i, len(shards), stem))
        del part
        if lazy:
            from lowbit.calibration.paused import trim_heap
            trim_heap()         # hand the shard's pages back before the next one is built
    if lazy:
        tensors.check_all_taken()
    if len(shards) > 1:
        files.append(write_index(dst, shards, sizes, stem))
    return files


class LayerTensors:
    """The tensors a writer makes, with its quantized layers' tensors added layer by layer.

        t = LayerTensors(keep)
        t.add("model.layers.0.mlp.down_proj", lambda: pack_layer(...))     # -> {key: tensor}
        t["model.layers.0.mlp.down_proj.bias"] = bias                       # plain tensors
        save_safetensors(t, dst, max_shard_size)

    keep=True (the in-memory export): every tensor is held, as a dict would hold it. keep=False
    (a streamed conversion, QuantizedModel.lazy): a layer's producer runs when it is added, only
    its tensors' shapes and dtypes are kept, and it runs again when the shard holding them is
    written, so one layer's tensors (plus the shard being written) are in memory, not the model's.
    A producer must give the same tensors each time (checked: shape and dtype)."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self._held: dict[str, torch.Tensor] = {}
        self._meta: dict[str, tuple[tuple, torch.dtype, str]] = {}     # key -> (shape, dtype, layer)
        self._produce: dict[str, object] = {}
        self._ready: dict[str, torch.Tensor] = {}
        self._taken: set[str] = set()

    def add(self, layer: str, produce) -> None:
        t = produce()
        for k, v in t.items():
            self._check_new(k)
            if self.keep:
                self._held[k] = v
            else:
                self._meta[k] = (tuple(v.shape), v.dtype, layer)
        if not self.keep:
            self._produce[layer] = produce

    def _check_new(self, k: str) -> None:
        if k in self._held or k in self._meta:
            raise LowbitError(f"export: tensor {k} would be written twice")

    def __setitem__(self, k: str, v: torch.Tensor) -> None:
        self._check_new(k)
        self._held[k] = v

    def update(self, d: dict) -> None:
        for k, v in d.items():
            self[k] = v

    def __iter__(self):
        return iter([*self._held, *self._meta])

    def __contains__(self, k: str) -> bool:
        return k in self._held or k in self._meta

    def sizes(self) -> dict[str, int]:
        out = {k: v.numel() * v.element_size() for k, v in self._held.items()}
        for k, (shape, dt, _) in self._meta.items():
            out[k] = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        return out

    def take(self, keys) -> dict[str, torch.Tensor]:
        """The tensors `keys`, producing the layers they belong to (each of a layer's other tensors
        waits, produced, until its own shard takes it)."""
        out = {}
        for k in keys:
            if k in self._held:
                out[k] = self._held[k] if self.keep else self._held.pop(k)
            else:
                if k not in self._ready:
                    shape, dt, layer = self._meta[k]
                    for k2, v in self._produce[layer]().items():
                        if k2 not in self._meta or (tuple(v.shape), v.dtype) != self._meta[k2][:2]:
                            raise LowbitError(f"export: layer {layer}: tensor {k2} came out {v.dtype} "
                                              f"{tuple(v.shape)} the second time, first "
                                              f"{self._meta.get(k2, (None, None))[1]} {self._meta.get(k2, (None,))[0]}")
                        if k2 not in self._taken:
                            self._ready[k2] = v
                out[k] = self._ready.pop(k)
            self._taken.add(k)
        return out

    def check_all_taken(self) -> None:
        if self._ready:
            raise LowbitError(f"export: tensors produced but not written: {sorted(self._ready)[:5]}")


class TensorFiles:
    """Read tensors one at a time from a directory's safetensors (one file or an index of shards),
    never loading the whole checkpoint. Tracks which keys were taken, so a reader can refuse
    tensors it did not expect."""

    def __init__(self, path: Path, stem: str = "model"):
        from safetensors import safe_open
        path = Path(path)
        index = path / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise LowbitError(f"{index}: not a safetensors index (expected a weight_map): {e}") from None
            files = sorted(set(wmap.values()))
        else:
            files = [f.name for f in sorted(path.glob("*.safetensors"))]
        if not files:
            raise LowbitError(f"{path}: no *.safetensors weights")
        self.path, self._handles, self._where, self.used = path, {}, {}, set()
        for fname in files:
            f = path / fname
            if not f.is_file():
                raise LowbitError(f"{path}: shard {fname} is missing")
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:
                raise LowbitError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
            self._handles[fname] = h
            for k in h.keys():
                self._where[k] = fname

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str, required: bool = True) -> torch.Tensor | None:
        if key not in self._where:
            if required:
                raise LowbitError(f"{self.path}: tensor {key} is missing")
            return None
        self.used.add(key)
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as e:
            raise LowbitError(f"{self.path / self._where[key]}: tensor {key} unreadable "
                              f"({type(e).__name__}: {e})") from None

    def unused(self) -> list[str]:
        return sorted(set(self._where) - self.used)


def empty_model(config_dir: Path, dtype: torch.dtype, config=None):
    """The model's skeleton from config.json: parameters on the meta device (nothing allocated),
    computed buffers (rotary tables) real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.models.base import dtype_kw
    try:
        config = config or AutoConfig.from_pretrained(config_dir)
    except Exception as e:
        raise LowbitError(f"{config_dir}/config.json: not a usable model config ({type(e).__name__}: {e})") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **dtype_kw(dtype))
    return model


def set_tensor(model: nn.Module, key: str, value: torch.Tensor, where: str = "", check_finite: bool = True) -> None:
    """Put `value` at `key` in `model` (a parameter or buffer it has), its shape checked, NaN/inf
    refused (check_finite=False: a tensor already checked in this run)."""
    owner, _, leaf = key.rpartition(".")
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        raise LowbitError(f"{where}: tensor {key} does not belong to the model built from config.json") from None
    cur = mod._parameters.get(leaf, mod._buffers.get(leaf))
    if leaf not in mod._parameters and leaf not in mod._buffers:
        raise LowbitError(f"{where}: tensor {key} does not belong to the model built from config.json")
    if check_finite and value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        raise LowbitError(f"{where}: tensor {key} contains {int((~torch.isfinite(value)).sum())} NaN/inf "
                          "value(s); refusing to load a broken model")
    if cur is not None and tuple(cur.shape) != tuple(value.shape):
        raise LowbitError(f"{where}: tensor {key} has shape {tuple(value.shape)}, the model built from "
                          f"config.json expects {tuple(cur.shape)}")
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def quant_module(qw, bias, name: str, dtype: torch.dtype, backend: str | None):
    """QuantLinear (reference forward), or PackedLinear on `backend`'s kernels (codes packed at
    once, the unpacked codes dropped)."""
    from lowbit.nn.qlinear import QuantLinear
    from lowbit.numerics.vq import VQWeight
    bias = None if bias is None else bias.to(dtype)
    if isinstance(qw, VQWeight):            # its own module: table-lookup kernels on any backend
        from lowbit.nn.vq import VQLinear
        return VQLinear(qw, bias)
    if backend is None:
        return QuantLinear(qw, bias)
    from lowbit.nn.prepare import PackedLinear
    return PackedLinear(qw, bias, backend, name)


def place_quantized(model: nn.Module, name: str, qw, bias, kind: str, dtype, backend, where) -> None:
    """Put one read QuantizedWeight into the skeleton: a linear becomes a quantized module, an
    embedding (a lookup table) is served dequantized."""
    from lowbit.nn.qlinear import set_submodule
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise LowbitError(f"{where}: quantized layer {name} is not in the model built from config.json") from None
    want = (mod.weight.shape if hasattr(mod, "weight") and mod.weight is not None
            else (getattr(mod, "out_features", None), getattr(mod, "in_features", None)))
    if tuple(want) != tuple(qw.shape):
        raise LowbitError(f"{where}: layer {name} has shape {tuple(qw.shape)}, the model built from "
                          f"config.json expects {tuple(want)}")
    if kind == "embedding":
        set_tensor(model, f"{name}.weight", qw.dequantize(dtype), where)
    else:
        set_submodule(model, name, quant_module(qw, bias, name, dtype, backend))


def retie(model: nn.Module, tied: dict[str, str], quantized: set[str]) -> None:
    """Point each tied tensor (stored once) at the one it shares, e.g. lm_head.weight ->
    model.embed_tokens.weight; a tied name that is itself a quantized layer keeps its own module."""
    for key, target in tied.items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized:
            continue
        src_owner, _, src_leaf = target.rpartition(".")
        setattr(model.get_submodule(owner), leaf, getattr(model.get_submodule(src_owner), src_leaf))


def tie_by_config(model: nn.Module) -> None:
    """Peers store a tied output embedding once (transformers drops lm_head.weight): tie it to the
    input embedding when config.json says tie_word_embeddings and nothing was read for it."""
    out = model.get_output_embeddings()
    if (out is not None and getattr(out, "weight", None) is not None and out.weight.is_meta
            and getattr(model.config, "tie_word_embeddings", False)):
        out.weight = model.get_input_embeddings().weight


def finish(model: nn.Module, path: Path, manifest: dict, fmt: str, tokenizer_dir: Path | None = None,
           extra_meta: dict | None = None):
    """Check nothing is left on the meta device, then -> LoadedModel (eval, no grad)."""
    from transformers import AutoTokenizer

    from lowbit.models.base import LoadedModel
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise LowbitError(f"{path}: no tensor for {left[:5]} ({len(left)} in all)")
    model.eval()
    model.requires_grad_(False)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir or path)
    except Exception as e:
        raise LowbitError(f"{tokenizer_dir or path}: tokenizer files unreadable ({type(e).__name__}: {e})") from None
    check_vocab(model, tok, tokenizer_dir or path)
    return LoadedModel(model=model, tokenizer=tok, path=Path(path), source=str(path),
                       source_sha256=(manifest.get("source") or {}).get("sha256"),
                       meta={"manifest": manifest, "format": fmt, **(extra_meta or {})})


def check_vocab(model: nn.Module, tok, where) -> None:
    """Every id the tokenizer makes must index the model's embedding (a model may have more rows
    than the tokenizer has tokens, never fewer)."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None) or getattr(getattr(emb, "weight", None), "shape", [None])[0]
    n = len(tok)
    if rows is not None and n > rows:
        raise LowbitError(f"{where}: the tokenizer has {n} tokens but the model's embedding has {rows} rows "
                          "(vocab_size); tokenizer and weights do not belong together")


class OnDemandLayers(Mapping):
    """name -> a layer's quantized weight, made by _make(name) when asked for; only the last one
    is kept (writers look at a layer several times in a row). `names`: the layers there are."""

    def __init__(self, names):
        self._names, self._last = names, (None, None)

    def _make(self, name: str):
        raise NotImplementedError

    def __getitem__(self, name: str):
        if self._last[0] != name:
            if name not in self._names:
                raise KeyError(name)
            self._last = (None, None)            # the previous layer is freed before the next is made
            self._last = (name, self._make(name))
        return self._last[1]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names
