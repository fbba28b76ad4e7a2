"""Importance matrices: collect, read and write them as llama.cpp does.

The statistic (llama.cpp tools/imatrix, PR #4861): for every linear layer inside the transformer
blocks, the sum over calibration tokens of x_j^2 for each input column j, and the token count.
Its mean E[x_j^2] weights column j in the quantizer's error, since the output error of a row is
sum_j (w_j - q_j) x_j, whose expected square is ~ sum_j (w_j - q_j)^2 E[x_j^2].

Files (keys are GGUF tensor names, e.g. "blk.0.attn_q.weight"):
  GGUF (llama.cpp's current format, what llama-imatrix writes by default):
      general.type = "imatrix", imatrix.datasets [str], imatrix.chunk_count u32, imatrix.chunk_size u32
      tensors "<name>.in_sum2" F32 (n_in, n_mat) = raw sums of x^2, "<name>.counts" F32 (1, n_mat) = tokens
  legacy .dat: i32 n_entries; per entry: i32 len, name, i32 ncall, i32 nval, f32[nval] = mean*ncall;
      then optional i32 chunk_count, i32 len, dataset name
llama-quantize turns either into per-column means (sum / count; 1.0 where count is 0).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)     # name -> float64 (n_in,) sum of x^2
    counts: dict[str, int] = field(default_factory=dict)          # name -> tokens seen
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = 512
    chunk_count: int = 0

    def names(self) -> list[str]:
        return sorted(self.sums)

    def mean(self, name: str) -> np.ndarray | None:
        """Per-column E[x^2] exactly as llama-quantize computes it from the saved file, or None:
        float32(sum) / float32(count) in float32 arithmetic (1.0 when nothing was seen), so a
        file quantized with this in-memory matrix has the same bytes as llama-quantize's with
        the written one (a float64 division differs in the last bit for ~1 value in 4, which
        flips near-tie scale choices)."""
        if name not in self.sums:
            return None
        c = self.counts.get(name, 0)
        if c <= 0:
            return np.ones(self.sums[name].shape, dtype=np.float32)
        return np.ascontiguousarray(self.sums[name].astype(np.float32) / np.float32(c), dtype=np.float32)

    def add(self, name: str, x_sq_sum: np.ndarray, n_tokens: int) -> None:
        s = self.sums.get(name)
        if s is not None and s.shape != x_sq_sum.shape:
            raise LowbitError(f"imatrix {name}: {x_sq_sum.shape[0]} columns, earlier {s.shape[0]}")
        self.sums[name] = x_sq_sum.astype(np.float64) + (0 if s is None else s)
        self.counts[name] = self.counts.get(name, 0) + int(n_tokens)

    # ---- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """GGUF imatrix (default) or llama.cpp's legacy format when the suffix is .dat."""
        path = Path(path)
        if not self.sums:
            raise LowbitError(f"imatrix {path}: nothing collected")
        for name, s in self.sums.items():
            if not np.isfinite(s).all():
                raise LowbitError(f"imatrix {name}: non-finite sums; refusing to write {path}")
        from lowbit.io import atomic_path
        with atomic_path(path) as tmp:
            if path.suffix == ".dat":
                tmp.write_bytes(self._legacy_bytes())
            else:
                self._write_gguf(tmp)
        return path

    def _write_gguf(self, path: Path) -> None:
        import gguf
        w = gguf.GGUFWriter(path, arch="")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)   # an imatrix has no architecture
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", list(self.datasets) or ["lowbit"])
        w.add_uint32("imatrix.chunk_count", int(self.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(self.chunk_size))
        for name in self.names():
            w.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32)[None, :])
            w.add_tensor(f"{name}.counts", np.array([[float(self.counts[name])]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    def _legacy_bytes(self) -> bytes:
        ncall = max(1, self.chunk_count)
        out = [struct.pack("<i", len(self.sums))]
        for name in self.names():
            b = name.encode()
            mean = self.mean(name).astype(np.float32)
            out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, mean.size),
                    (mean * np.float32(ncall)).astype("<f4").tobytes()]
        ds = (self.datasets[-1] if self.datasets else "").encode()
        out += [struct.pack("<i", int(self.chunk_count)), struct.pack("<i", len(ds)), ds]
        return b"".join(out)

    @classmethod
    def load(cls, path: str | Path) -> "Imatrix":
        """Read a GGUF imatrix or a legacy .dat one (llama.cpp tries GGUF first, as here)."""
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"imatrix {path}: no such file")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        return cls._load_gguf(path) if magic == b"GGUF" else cls._load_legacy(path)

    @classmethod
    def _load_gguf(cls, path: Path) -> "Imatrix":
        from lowbit.export.gguf.header import open_reader
        r = open_reader(path, what="imatrix")
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors}
        im = cls()
        f = r.fields
        if "imatrix.datasets" in f:
            im.datasets = [str(v) for v in f["imatrix.datasets"].contents()]
        im.chunk_count = int(f["imatrix.chunk_count"].contents()) if "imatrix.chunk_count" in f else 0
        im.chunk_size = int(f["imatrix.chunk_size"].contents()) if "imatrix.chunk_size" in f else 0
        for tname, sums in tensors.items():
            if not tname.endswith(".in_sum2"):
                continue
            base = tname[:-len(".in_sum2")]
            counts = tensors.get(base + ".counts")
            if counts is None:
                raise LowbitError(f"imatrix {path}: {tname} has no matching {base}.counts")
            if counts.size != 1:
                raise LowbitError(f"imatrix {path}: {base} has {counts.size} expert counts; "
                                  "mixture-of-experts imatrices are not supported")
            im.sums[base] = sums.ravel().astype(np.float64)
            im.counts[base] = int(round(float(counts.ravel()[0])))
        if not im.sums:
            raise LowbitError(f"imatrix {path}: no '<name>.in_sum2' tensors")
        return im

    @classmethod
    def _load_legacy(cls, path: Path) -> "Imatrix":
        data = path.read_bytes()
        im, off = cls(chunk_size=0), 0

        def take(fmt: str):
            nonlocal off
            size = struct.calcsize(fmt)
            if off + size > len(data):
                raise LowbitError(f"imatrix {path}: truncated legacy .dat file at byte {off}")
            v = struct.unpack_from(fmt, data, off)
            off += size
            return v

        (n_entries,) = take("<i")
        if n_entries < 1:
            raise LowbitError(f"imatrix {path}: neither GGUF nor a legacy imatrix (n_entries={n_entries})")
        if n_entries * 12 > len(data):        # each entry takes at least 12 bytes
            raise LowbitError(f"imatrix {path}: truncated or corrupt: header says {n_entries} entries, "
                              f"the file has {len(data)} bytes")
        for _ in range(n_entries):
            (n,) = take("<i")
            if n < 0 or off + n > len(data):
                raise LowbitError(f"imatrix {path}: truncated or corrupt: entry name of {n} bytes at byte {off} "
                                  f"(file has {len(data)})")
            name = data[off:off + n].decode("utf-8", errors="replace")
            off += n
            ncall, nval = take("<ii")
            if nval < 0 or off + 4 * nval > len(data):   # checked against the file before allocating
                raise LowbitError(f"imatrix {path}: truncated or corrupt: entry {name!r} says {nval} values at "
                                  f"byte {off}, the file has {len(data)} bytes")
            vals = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float64)
            off += 4 * nval
            # legacy stores mean * ncall; keep it as sums over `ncall` "tokens"
            im.sums[name], im.counts[name] = vals, max(int(ncall), 0)
        if off + 4 <= len(data):
            (im.chunk_count,) = take("<i")
            if off + 4 <= len(data):
                (n,) = take("<i")
                if n > len(data) - off:
                    raise LowbitError(f"imatrix {path}: dataset name of {n} bytes at byte {off} "
                                      f"(file has {len(data)})")
                if n > 0:
                    im.datasets.append(data[off:off + n].decode("utf-8", errors="replace"))
        return im


def collect_imatrix(model, batches, name_of: dict[str, str], chunk_size: int | None = None,
                    dataset: str = "", progress: bool = True) -> Imatrix:
    """Run `batches` (n, seq_len) token ids through `model` and accumulate sum x^2 per input column
    of every nn.Linear listed in name_of (HF module name -> GGUF tensor name).

    As llama-imatrix, only the transformer blocks' linears are collected (not the output head);
    sums are accumulated in float64."""
    import torch
    sums = _SumSq()
    hooks = []
    mods = dict(model.named_modules())
    for hf_name, gname in name_of.items():
        if hf_name not in mods:
            raise LowbitError(f"imatrix: module {hf_name!r} not in the model")
        hooks.append(mods[hf_name].register_forward_pre_hook(sums.hook(gname)))
    it = range(batches.shape[0])
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="imatrix", unit="chunk")
    try:
        with torch.no_grad():
            for i in it:
                model(batches[i:i + 1])
    finally:
        for h in hooks:
            h.remove()
    return sums.imatrix(batches, chunk_size, dataset)


class _SumSq:
    """Per-column sums of x^2 of each hooked linear's input (float64), and the tokens seen; added
    to an Imatrix in the order the hooks first fired."""

    def __init__(self):
        self.acc, self.ntok = {}, {}

    def hook(self, gname: str):
        import torch

        def pre_hook(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            s = (x * x).sum(dim=0)
            self.acc[gname] = s if gname not in self.acc else self.acc[gname] + s
            self.ntok[gname] = self.ntok.get(gname, 0) + x.shape[0]
        return pre_hook

    def imatrix(self, batches, chunk_size: int | None, dataset: str) -> Imatrix:
        im = Imatrix(datasets=[dataset] if dataset else [], chunk_size=chunk_size or int(batches.shape[1]))
        for gname, s in self.acc.items():
            v = s.cpu().numpy()
            if not np.isfinite(v).all():
                raise LowbitError(f"imatrix {gname}: non-finite activations during collection")
            im.add(gname, v, self.ntok[gname])
        im.chunk_count = int(batches.shape[0])
        return im


def collect_imatrix_streamed(model, batches, name_of: dict[str, str], blocks_io, chunk_size: int | None = None,
                             dataset: str = "") -> Imatrix:
    """collect_imatrix with one decoder block in memory at a time (`lowbit quantize --stream
    --budget --format gguf`): `model` is a skeleton holding its embedding; blocks_io.load(b,
    block) reads block b before it runs and blocks_io.release(b, block) drops it after
    (budget/streamed.py StreamedBlocks). Each window goes through the blocks one at a time, as
    collect_imatrix runs them one window per forward, and every sum gets the windows in the same
    order, so the matrix is collect_imatrix's (tests/test_budget_stream.py)."""
    import torch

    from lowbit.arch import get_blocks, spec_for
    from lowbit.calibration.capture import capture_block_inputs, run_block
    arch = spec_for(model)
    blocks = get_blocks(model, arch)
    prefix = arch.blocks
    by_block: dict[int, list[tuple[str, str]]] = {}
    for hf_name, gname in name_of.items():
        idx = hf_name[len(prefix) + 1:].partition(".")[0] if hf_name.startswith(prefix + ".") else ""
        if not idx.isdigit() or int(idx) >= len(blocks):
            raise LowbitError(f"imatrix (streamed): module {hf_name!r} is not inside a decoder block")
        by_block.setdefault(int(idx), []).append((hf_name, gname))
    sums = _SumSq()
    with torch.no_grad():
        acts = capture_block_inputs(model, blocks[0], batches, 1)      # one window per batch
        for b, block in enumerate(blocks):
            blocks_io.load(b, block)
            hooks = [block.get_submodule(h[len(f"{prefix}.{b}."):]).register_forward_pre_hook(sums.hook(g))
                     for h, g in by_block.get(b, [])]
            try:
                acts = [run_block(block, a) for a in acts]
            finally:
                for hd in hooks:
                    hd.remove()
            blocks_io.release(b, block)
    del acts
    return sums.imatrix(batches, chunk_size, dataset)


def imatrix_targets(model) -> dict[str, str]:
    """HF module name -> GGUF tensor name for every nn.Linear inside the transformer blocks
    (what llama-imatrix collects: src0 names starting with "blk.")."""
    import torch.nn as nn

    from lowbit.arch.gguf_names import NameMap, arch_spec
    cfg = model.config
    names = NameMap(arch_spec(cfg.model_type).gguf_arch, int(cfg.num_hidden_layers))
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            g = names.to_gguf(mname + ".weight")
            if g.startswith("blk."):
                out[mname] = g
    return out


def compute_imatrix(loaded, text: str = "wiki-calibration", n_chunks: int = 64, seq_len: int = 512,
                    seed: int = 0, progress: bool = True) -> Imatrix:
    """Collect an imatrix for a LoadedModel on `n_chunks` windows of `seq_len` tokens of `text`
    (lowbit.data.calibration_batches: disjoint windows picked by a seeded permutation)."""
    from lowbit.data.text import calibration_batches
    from lowbit.errors import check_context
    check_context(loaded.model.config, seq_len, "imatrix seq_len")
    if not isinstance(n_chunks, int) or n_chunks < 1:
        raise LowbitError(f"imatrix chunks: expected an integer >= 1, got {n_chunks!r}")
    batches = calibration_batches(loaded.tokenizer, n_chunks, seq_len, seed, text)
    return collect_imatrix(loaded.model, batches, imatrix_targets(loaded.model), chunk_size=seq_len,
                           dataset=str(text), progress=progress)
