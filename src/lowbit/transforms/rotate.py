"""Hadamard rotations folded into the weights: same float outputs, incoherent weights to quantize.

QuaRot (arXiv:2404.00456) / QuIP# (arXiv:2402.04396) style, for weight-only quantization. With
Q (hidden x hidden, orthogonal, transforms/hadamard.py) and nn.Linear's y = x W^T + b, W (out, in):

    residual stream     h' = h Q                       (every block's input and output)
    embeddings          E' = E Q                       (rows are token vectors)
    RMSNorm             rms(h Q) = rms(h): it commutes with Q once its weight g is folded into
                        the linears that read it: W <- W diag(g), g <- 1
    readers             W' = W Q                       (q/k/v, gate/up, lm_head)
    writers             W' = Q^T W,  b' = b Q          (o_proj, down_proj: added to the stream)
    heads (v -> o)      per head of width d, Qh (d x d): v' = v Qh, so W_v' = Qh^T W_v per head
                        and W_o' = W_o blockdiag(Qh, ..): attention mixes tokens, not dimensions,
                        so softmax(qk) v Qh = (softmax(qk) v) Qh. Grouped-query heads share Qh.
    down_proj input     act(gate) * up is not linear in anything foldable: rotating it needs the
                        online x -> x Qd before down_proj (optional, `online_down`), W_down' = W Qd

A tied lm_head is untied first (lm_head = E diag(g_final) Q differs from E Q); the model's
config then says tie_word_embeddings = false, and every export writes both matrices.
Everything is computed in float64 and cast back to the weights' dtype once.

Folded rotations leave plain nn.Linear weights: every format exports them. The online down_proj
rotation is a forward pre-hook a format cannot hold, so lowbit.api.export refuses such a model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lowbit.arch import get_blocks, get_module, spec_for
from lowbit.arch.specs import ROTATIONS, RotationSpec
from lowbit.errors import LowbitError
from lowbit.transforms.hadamard import Rotation, random_hadamard

ONLINE_ATTR = "_lowbit_online_rotation"   # set on a model whose forward needs online rotations


@dataclass
class RotateConfig:
    seed: int = 0
    heads: bool = True          # also the head-wise rotation of v_proj -> o_proj
    online_down: bool = False   # also rotate down_proj's input online (not exportable)


def rotation_spec(model: nn.Module) -> RotationSpec:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    spec = ROTATIONS.get(mt)
    if spec is None:
        raise LowbitError(f"rotate: model_type {mt!r} has no rotation spec (supported: "
                          f"{sorted(ROTATIONS)}). Gemma's (1 + weight) norms and scaled embeddings, "
                          "sandwich norms (olmo2, gemma2/3), and LayerNorm with mean/bias (opt, gpt2, "
                          "cohere) do not commute with a rotation; see lowbit/arch/specs.py ROTATIONS")
    return spec


def _module(root: nn.Module, path: str, what: str) -> nn.Module:
    m = get_module(root, path)
    if m is None:
        raise LowbitError(f"rotate: expected {what} at {path!r}, found nothing")
    return m


def _check_norm(norm: nn.Module, path: str) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if "RMSNorm" not in type(norm).__name__ or not isinstance(w, torch.Tensor) or \
            getattr(norm, "bias", None) is not None:
        raise LowbitError(f"rotate: {path}: expected an RMSNorm with a weight and no bias, found "
                          f"{type(norm).__name__}; a rotation does not commute with it")
    return w


def _linear(root: nn.Module, path: str) -> nn.Linear:
    m = _module(root, path, "a linear")
    if not isinstance(m, nn.Linear):
        raise LowbitError(f"rotate: {path}: expected a float nn.Linear, found {type(m).__name__} "
                          "(rotate before quantizing)")
    return m


def _set(p: nn.Parameter, value: torch.Tensor) -> None:
    # a new tensor, not in place: loaded weights are often a copy-on-write memory map
    p.data = value.to(p.dtype).contiguous()


def _fold_norm(norm: nn.Module, readers: list[nn.Linear], path: str) -> None:
    g = _check_norm(norm, path).detach().double()
    for lin in readers:
        _set(lin.weight, lin.weight.detach().double() * g[None, :])
    _set(norm.weight, torch.ones_like(g))


def _read(lin: nn.Linear, rot: Rotation) -> None:
    """W <- W Q (Q applied to every row without being built: hadamard.Rotation.apply)."""
    _set(lin.weight, rot.apply(lin.weight.detach().double()))


def _write(lin: nn.Linear, rot: Rotation) -> None:
    """W <- Q^T W = (W^T Q)^T, b <- b Q."""
    _set(lin.weight, rot.apply(lin.weight.detach().double().T.contiguous()).T)
    if lin.bias is not None:
        _set(lin.bias, rot.apply(lin.bias.detach().double()))


def _rotate_heads(v: nn.Linear, o: nn.Linear, Qh: torch.Tensor, d: int, path: str) -> None:
    if v.out_features % d or o.in_features % d:
        raise LowbitError(f"rotate: {path}: head_dim {d} does not divide v_proj out {v.out_features} / "
                          f"o_proj in {o.in_features}")
    Wv = v.weight.detach().double().reshape(-1, d, v.in_features)            # (kv_heads, d, in)
    _set(v.weight, torch.einsum("ji,hjk->hik", Qh, Wv).reshape(v.out_features, v.in_features))
    if v.bias is not None:
        _set(v.bias, (v.bias.detach().double().reshape(-1, d) @ Qh).reshape(-1))
    Wo = o.weight.detach().double().reshape(o.out_features, -1, d)           # (out, heads, d)
    _set(o.weight, (Wo @ Qh).reshape(o.out_features, o.in_features))


class _OnlineInput:
    """A forward pre-hook on the MLP: makes sure whatever module is its down projection now (the
    float linear, or the QuantLinear the calibration loop swapped in) rotates its input first."""

    def __init__(self, child: str, rot: Rotation):
        self.child, self.rot = child, rot

    def _rotate(self, _mod, args):
        return (self.rot.apply(args[0]), *args[1:])

    def __call__(self, mlp: nn.Module, _args) -> None:
        mod = getattr(mlp, self.child)
        if getattr(mod, ONLINE_ATTR, None) is not self.rot:
            # prepend: the rotation must run before any statistics hook on the same module
            mod.register_forward_pre_hook(self._rotate, prepend=True)
            setattr(mod, ONLINE_ATTR, self.rot)


class Rotator:
    """The rotations of one model, applied a piece at a time: rotate_model applies every piece to
    a float model; streaming (RotatedSource) applies each to a block as it is read. `model` may
    be a meta-device skeleton: the checks need module types and shapes only. A tied lm_head is
    untied here (its weight becomes its own, config.tie_word_embeddings false)."""

    def __init__(self, model: nn.Module, config: RotateConfig | None = None):
        cfg = self.cfg = config or RotateConfig()
        spec = self.spec = rotation_spec(model)
        arch = self.arch = spec_for(model)
        blocks = get_blocks(model, arch)
        c = model.config
        hidden = int(c.hidden_size)
        emb = [_module(model, p, "an embedding") for p in spec.embeddings]
        head = _linear(model, spec.lm_head)
        for e in emb:
            if e.weight.shape[1] != hidden:
                raise LowbitError(f"rotate: embedding width {e.weight.shape[1]} != hidden_size {hidden}")
        # check every block before changing anything
        for b, block in enumerate(blocks):
            for npath, readers in spec.norms:
                _check_norm(_module(block, npath, "a norm"), f"{arch.blocks}.{b}.{npath}")
                for r in readers:
                    _linear(block, r)
            for w in spec.writers:
                _linear(block, w)
        _check_norm(_module(model, spec.final_norm, "the final norm"), spec.final_norm)
        self.info: dict = {"seed": cfg.seed, "hidden": hidden, "untied_lm_head": False}
        if any(head.weight is e.weight or (not head.weight.is_meta and head.weight.data_ptr() == e.weight.data_ptr())
               for e in emb):
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            c.tie_word_embeddings = False
            self.info["untied_lm_head"] = True
        self.rot = random_hadamard(hidden, cfg.seed)
        self.info["residual"] = self.rot.describe()
        self.head_dim = int(getattr(c, "head_dim", 0) or hidden // int(c.num_attention_heads))
        rot_h = random_hadamard(self.head_dim, cfg.seed + 1) if cfg.heads and spec.v_o else None
        self.Qh = None if rot_h is None else rot_h.matrix()
        if rot_h is not None:
            self.info["heads"] = rot_h.describe()
        self.rot_down = None

    @torch.no_grad()
    def embedding(self, e: nn.Module) -> None:
        _set(e.weight, self.rot.apply(e.weight.detach().double()))

    @torch.no_grad()
    def block(self, b: int, block: nn.Module) -> None:
        spec, rot, path = self.spec, self.rot, f"{self.arch.blocks}.{b}"
        for npath, readers in spec.norms:
            lins = [_linear(block, r) for r in readers]
            _fold_norm(_module(block, npath, "a norm"), lins, f"{path}.{npath}")
            for lin in lins:
                _read(lin, rot)
        for w in spec.writers:
            _write(_linear(block, w), rot)
        if self.Qh is not None:
            _rotate_heads(_linear(block, spec.v_o[0]), _linear(block, spec.v_o[1]), self.Qh, self.head_dim, path)
        if self.cfg.online_down and spec.down:
            down = _linear(block, spec.down)
            if self.rot_down is None:
                self.rot_down = random_hadamard(down.in_features, self.cfg.seed + 2)
                self.info["online_down"] = self.rot_down.describe()
            _read(down, self.rot_down)
            parent, _, child = spec.down.rpartition(".")
            _module(block, parent, "the MLP").register_forward_pre_hook(_OnlineInput(child, self.rot_down))

    @torch.no_grad()
    def head(self, model: nn.Module) -> None:
        """The final norm folded into lm_head, then lm_head reads the rotated stream."""
        head = _linear(model, self.spec.lm_head)
        _fold_norm(_module(model, self.spec.final_norm, "the final norm"), [head], self.spec.final_norm)
        _read(head, self.rot)


def rotate_model(model: nn.Module, config: RotateConfig | None = None) -> dict:
    """Rotate `model` (float, unquantized) in place; the float outputs are unchanged up to
    rounding. Returns what was done (widths, constructions, untied embeddings, online parts)."""
    if getattr(model, "_lowbit_rotation", None):
        raise LowbitError("rotate: this model is already rotated (rotating twice is allowed by the "
                          "math but never what a recipe means)")
    r = Rotator(model, config)
    for p in r.spec.embeddings:
        r.embedding(_module(model, p, "an embedding"))
    for b, block in enumerate(get_blocks(model, r.arch)):
        r.block(b, block)
    r.head(model)
    model._lowbit_rotation = r.info
    if r.rot_down is not None:
        setattr(model, ONLINE_ATTR, r.info["online_down"])
    return r.info


class RotatedSource:
    """A streamed checkpoint's tensors as the rotated model has them (streaming.py), computed
    from the source a piece at a time by the same Rotator steps rotate_model takes, so every
    value is rotate_model's: a decoder block's tensors (its norms folded and set to 1, readers
    and writers rotated) when one of them is read, one block cached; the embedding rotated; the
    final norm as ones; lm_head with the final norm folded in, then rotated (from the embedding
    when the source ties them: the rotated model unties it). `files`: the source (read(key) and
    `key in files`, as models/shards.py gives them); `skeleton`: a meta-device model of the
    source, which this keeps as its own (its config then says tie_word_embeddings false when
    the rotation untied lm_head)."""

    def __init__(self, files, skeleton: nn.Module, config: RotateConfig, dtype: torch.dtype, where: str):
        from lowbit.export.common import tie_by_config
        if config.online_down:
            raise LowbitError("streaming: transform rotate with online_down: the online rotation is no "
                              "weight a file holds; stream with online_down false")
        self.files, self.model, self.dtype, self.where = files, skeleton, dtype, where
        tie_by_config(skeleton)
        self.rotator = Rotator(skeleton, config)
        spec, self.prefix = self.rotator.spec, self.rotator.arch.blocks
        self.emb_keys = {f"{p}.weight" for p in spec.embeddings}
        self.norm_key, self.head_key = f"{spec.final_norm}.weight", f"{spec.lm_head}.weight"
        first = sorted(self.emb_keys)[0]
        # the head's values: its own tensor, or the embedding's where the source ties them
        self.head_from = first if self.rotator.info["untied_lm_head"] else self.head_key
        self.cache: tuple[int | None, dict] = (None, {})

    @property
    def info(self) -> dict:
        return self.rotator.info

    def __contains__(self, key: str) -> bool:
        return key in self.files or (key == self.head_key and self.head_from in self.files)

    def _fill(self, key: str) -> None:
        from lowbit.export.common import set_tensor
        if key not in self.files:
            raise LowbitError(f"{self.where}: tensor {key} is missing")
        v = self.files.read(key)
        set_tensor(self.model, key, v.to(self.dtype) if v.is_floating_point() else v, self.where)

    def _module_of(self, key: str) -> nn.Module:
        return self.model.get_submodule(key.rpartition(".")[0])

    def read(self, key: str) -> torch.Tensor:
        if key.startswith(self.prefix + "."):
            idx = key[len(self.prefix) + 1:].partition(".")[0]
            if idx.isdigit():
                return self._block(int(idx), key)
        if key in self.emb_keys:
            self._fill(key)
            mod = self._module_of(key)
            self.rotator.embedding(mod)
            return self._take(mod, key)
        if key == self.norm_key or key == self.head_key:
            self._fill(self.norm_key)
            if key == self.norm_key:     # folded into lm_head: ones (the value rotate_model leaves)
                norm = self._module_of(key)
                out = torch.ones_like(norm.weight.detach().double()).to(norm.weight.dtype).contiguous()
                norm.to("meta")
                return out
            head = self._module_of(key)
            v = self.files.read(self.head_from)
            head.weight = nn.Parameter(v.to(self.dtype), requires_grad=False)
            self.rotator.head(self.model)
            self._module_of(self.norm_key).to("meta")
            return self._take(head, key)
        return self.files.read(key)

    def _take(self, mod: nn.Module, key: str) -> torch.Tensor:
        out = getattr(mod, key.rpartition(".")[2]).detach()
        mod.to("meta")
        return out

    def _block(self, b: int, key: str) -> torch.Tensor:
        if self.cache[0] != b:
            self.cache = (None, {})
            base = f"{self.prefix}.{b}"
            block = self.model.get_submodule(base)
            from lowbit.streaming import read_block
            read_block(self.model, self.files, base, block, self.dtype, self.where)
            self.rotator.block(b, block)
            self.cache = (b, {f"{base}.{k}": v.detach() for k, v in block.state_dict().items()})
            block.to("meta")
        if key not in self.cache[1]:
            raise LowbitError(f"{self.where}: tensor {key} does not belong to the model built from config.json")
        return self.cache[1][key]
