"""Resume a calibrated run after a kill: the block loop's state saved after every finished block.

    DIR/                         (the CLI keeps it beside the output: .OUT.resume)
      state.json                 key (what the run is), blocks_done, notes, files; written last
      block-0007.safetensors     the QuantizedWeights block 7 produced (codes, scales, zeros, g_idx)
      acts-0007.safetensors      the hidden states entering block 8, one tensor per batch
      fpacts-0007.safetensors    block-level methods (signround, vq with block_steps): the float
                                 model's hidden states entering block 8, which their targets need

The key holds the recipe, the calibration settings, the sha256 of the calibration token windows,
the source checkpoint's sha256 and the lowbit version; a restart whose key differs in any of them
is refused, naming which and what it was. A restart with the same key swaps the finished blocks'
layers in, takes the saved hidden states as the next block's input (the block kwargs, which depend
on the tokens only, are recaptured) and goes on from there: every number it then computes is the
one the uninterrupted run computed, so the output is the same bytes.

Every file is written under a temporary name and renamed; state.json is renamed last, so a kill at
any point leaves the previous consistent state (a block file without its state entry is redone).
Pickle-free: tensors in safetensors, everything else JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io import atomic_file, atomic_path

STATE = "state.json"
STATE_VERSION = 1


def tokens_sha256(tokens: torch.Tensor) -> str:
    t = tokens.to(torch.int64).contiguous()
    return hashlib.sha256(repr(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def run_key(recipe, calibration: dict, tokens: torch.Tensor, source_sha256: str | None) -> dict:
    import lowbit
    return {"recipe": recipe.to_dict(), "calibration": dict(calibration),
            "calibration_tokens_sha256": tokens_sha256(tokens), "source_sha256": source_sha256,
            "lowbit_version": lowbit.__version__, "threads": torch.get_num_threads()}


WHAT = {"recipe": "the recipe", "calibration": "the calibration settings",
        "calibration_tokens_sha256": "the calibration token windows (text, seed, count or length)",
        "source_sha256": "the source model (sha256)", "lowbit_version": "the lowbit version",
        "threads": "the torch thread count (float sums differ with it)"}


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."



def restore_acts(state_dir, acts_file, acts: list) -> None:
    """Put the saved next-block inputs back into `acts` (BlockInputs), checking count and shapes."""
    from safetensors.torch import load_file
    saved = load_file(str(acts_file))
    if len(saved) != len(acts):
        raise LowbitError(f"resume state {state_dir}: {len(saved)} saved batches, this run has {len(acts)}")
    for i, a in enumerate(acts):
        h = saved[f"batch.{i}"]
        if h.shape != a.hidden.shape:
            raise LowbitError(f"resume state {state_dir}: batch {i} has shape {tuple(h.shape)}, "
                              f"expected {tuple(a.hidden.shape)}")
        a.hidden = h

class Checkpoint:
    """The loop calls restore() once before its first block and save() after each finished block."""

    def __init__(self, path: str | os.PathLike, key: dict):
        self.path, self.key = Path(path), key
        self.state = None
        self.saved_layers = 0
        st = self.path / STATE
        if st.is_file():
            try:
                state = json.loads(st.read_text())
                old = state["key"]
                int(state["blocks_done"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise LowbitError(f"resume state {st}: unreadable ({type(e).__name__}: {e}); delete "
                                  f"{self.path} to start over") from None
            diff = [k for k in sorted(set(key) | set(old)) if key.get(k) != old.get(k)]
            if diff:
                k = diff[0]
                raise LowbitError(f"resume state {self.path}: refusing to resume: "
                                  f"{' and '.join(WHAT.get(d, d) for d in diff)} changed (e.g. {k}: saved "
                                  f"{_short(old.get(k))}, now {_short(key.get(k))}); delete {self.path} "
                                  "(or pass --fresh) to start over")
            self.state = state

    @property
    def blocks_done(self) -> int:
        return 0 if self.state is None else int(self.state["blocks_done"])

    def restore(self, model, acts: list, res, swap, fp_acts: list | None = None) -> tuple[int, list]:
        """Swap in the layers of the finished blocks (swap(model, name, qw, method) -> row) and
        take the saved hidden states (and the float path's into fp_acts, for block-level
        methods). -> (first block to run, acts)."""
        if self.state is None:
            return 0, acts
        for fname in self.state["files"]:
            for name, qw, method in _read_block(self.path / fname):
                res.layers.append(swap(model, name, qw, method))
        res.notes[:] = list(self.state["notes"])
        self._restore_acts(acts, fp_acts)
        self.saved_layers = len(res.layers)
        return self.blocks_done, acts

    def _restore_acts(self, acts: list, fp_acts: list | None) -> None:
        restore_acts(self.path, self.path / self.state["acts"], acts)
        saved_fp = self.state.get("fp_acts")
        if (fp_acts is None) != (saved_fp is None):
            raise LowbitError(f"resume state {self.path}: " + (
                "holds no float-path hidden states, which this run's block-level methods need"
                if saved_fp is None else "holds float-path hidden states this run does not use")
                + f"; delete {self.path} to start over")
        if fp_acts is not None:
            restore_acts(self.path, self.path / saved_fp, fp_acts)

    def save(self, block: int, res, acts: list, fp_acts: list | None = None) -> None:
        from safetensors.torch import save_file
        self.path.mkdir(parents=True, exist_ok=True)
        new = res.layers[self.saved_layers:]
        bname, aname = f"block-{block:04d}.safetensors", f"acts-{block:04d}.safetensors"
        write_block(self.path / bname, new)
        named = [(aname, acts)] + ([(f"fp{aname}", fp_acts)] if fp_acts is not None else [])
        for fname, batches in named:
            with atomic_path(self.path / fname) as tmp:
                save_file({f"batch.{i}": a.hidden.contiguous() for i, a in enumerate(batches)}, str(tmp))
        prev = self.state
        files = (list(prev["files"]) if prev else []) + [bname]
        self.state = {"version": STATE_VERSION, "key": self.key, "blocks_done": block + 1, "files": files,
                      "acts": aname, "notes": list(res.notes)}
        if fp_acts is not None:
            self.state["fp_acts"] = f"fp{aname}"
        with atomic_file(self.path / STATE, "w") as fh:
            fh.write(json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        for k in ("acts", "fp_acts"):            # the previous block's hidden states: superseded
            if prev and prev.get(k) and prev[k] != self.state.get(k):
                (self.path / prev[k]).unlink(missing_ok=True)
        self.saved_layers = len(res.layers)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_block(f: Path, layers) -> None:
    """A block's (name, weight, method) layers as one safetensors file (_read_block reads it), atomically."""
    from safetensors.torch import save_file
    tensors, meta = {}, []
    for name, qw, method in layers:
        meta.append(_put(tensors, name, qw, method))
    with atomic_path(f) as tmp:
        save_file(tensors, str(tmp), metadata={"layers": json.dumps(meta, sort_keys=True)})


def _put(tensors: dict, name: str, qw, method: str) -> dict:
    from lowbit.numerics.qweight import QuantizedWeight
    from lowbit.numerics.vq import VQWeight
    info = {k: v for k, v in qw.info.items() if isinstance(v, (bool, int, float, str))}
    if isinstance(qw, VQWeight):                 # vector codebooks (method vq)
        for k in ("codebook", "indices", "scale"):
            tensors[f"{name}.{k}"] = getattr(qw, k).contiguous()
        return {"name": name, "method": method, "kind": "vq", "shape": list(qw.shape),
                "group_size": qw.group_size, "info": info}
    from lowbit.numerics.ggml.weight import GGMLWeight
    if isinstance(qw, GGMLWeight):               # ggml blocks (gptq with a ggml type): the GGUF bytes
        tensors[f"{name}.ggml_data"] = qw.data.contiguous()
        return {"name": name, "method": method, "kind": "ggml", "type": qw.type, "wanted": qw.wanted,
                "shape": list(qw.shape), "info": info}
    if not isinstance(qw, QuantizedWeight):
        raise LowbitError(f"resume: layer {name} is a {type(qw).__name__}; resume state holds "
                          "integer/float schemes, vector codebooks and ggml blocks only")
    tensors[f"{name}.qdata"] = qw.qdata.contiguous()
    tensors[f"{name}.scale"] = qw.scale.contiguous()
    if qw.zero_point is not None:
        tensors[f"{name}.zero_point"] = qw.zero_point.contiguous()
    if qw.g_idx is not None:
        tensors[f"{name}.g_idx"] = qw.g_idx.contiguous()
    return {"name": name, "method": method, "scheme": qw.scheme.to_dict(), "info": info}


def _read_block(f: Path) -> list:
    from safetensors import safe_open

    from lowbit.numerics.qweight import QuantizedWeight
    from lowbit.numerics.scheme import Scheme
    from lowbit.numerics.vq import VQWeight
    try:
        with safe_open(str(f), framework="pt") as h:
            meta = json.loads(h.metadata()["layers"])
            out = []
            for row in meta:
                n = row["name"]
                get = (lambda k, n=n: h.get_tensor(f"{n}.{k}") if f"{n}.{k}" in h.keys() else None)
                if row.get("kind") == "ggml":
                    from lowbit.numerics.ggml.weight import GGMLWeight
                    out.append((n, GGMLWeight(get("ggml_data"), row["type"], tuple(row["shape"]), row["wanted"],
                                              dict(row["info"])), row["method"]))
                    continue
                if row.get("kind") == "vq":
                    out.append((n, VQWeight(get("codebook"), get("indices"), get("scale"), tuple(row["shape"]),
                                            int(row["group_size"]), dict(row["info"])), row["method"]))
                    continue
                out.append((n, QuantizedWeight(get("qdata"), get("scale"), get("zero_point"),
                                               Scheme.from_dict(row["scheme"]), get("g_idx"), dict(row["info"])),
                            row["method"]))
    except LowbitError:
        raise
    except Exception as e:
        raise LowbitError(f"resume state {f}: unreadable ({type(e).__name__}: {e}); delete "
                          f"{f.parent} to start over") from None
    return out
