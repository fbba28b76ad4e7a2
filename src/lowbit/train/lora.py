"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on a frozen base, QLoRA when the base is NF4
(Dettmers et al. 2023, arXiv:2305.14314): saved in PEFT's layout so `peft` loads them.

    lm = api.load("smollm2-135m", quantization="nf4", double_quant=True)     # frozen 4-bit base
    names = add_lora(lm.model, LoraConfig(r=8, alpha=16, dropout=0.05))    # every block linear
    train(lm.model, windows, TrainConfig(steps=100, grad_checkpointing=True))   # train/loop.py
    save_adapter(lm.model, "out/adapter", cfg, base="smollm2-135m")         # PEFT's files
    merge_lora(lm.model)                                                     # optional: fold + re-quantize

Each target linear L becomes LoraLinear(base=L):

    y = L(x) + (dropout(x) @ A^T) @ B^T * (alpha / r)        A (r, in), B (out, r), float32

A starts Kaiming-uniform (a = sqrt(5)) and B at zero, PEFT's default init, so the adapted model
starts exactly at the base model. Only A and B train; the base (Linear4bit or nn.Linear) is frozen.
The default targets are the architecture spec's block linears (lowbit/arch/specs.py: q/k/v/o and
gate/up/down for Llama), QLoRA's "all linear layers" choice; lm_head and embeddings stay frozen.

PEFT's layout (peft 0.x `save_pretrained`, LoRA, adapter name "default" left out of the keys):
    adapter_config.json          {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r", "lora_alpha",
                                  "lora_dropout", "target_modules", "bias": "none", ...}
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, in)
                                 base_model.model.<module>.lora_B.weight  (out, r)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lowbit.errors import LowbitError

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None      # leaf names (q_proj, ...); None: the spec's block linears
    seed: int = 0

    def check(self) -> "LoraConfig":
        if not isinstance(self.r, int) or self.r <= 0:
            raise LowbitError(f"LoraConfig.r: expected a positive integer rank, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise LowbitError(f"LoraConfig.alpha: expected a positive number, got {self.alpha!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise LowbitError(f"LoraConfig.dropout: expected 0 <= dropout < 1, got {self.dropout!r}")
        return self

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r


class LoraLinear(nn.Module):
    """A frozen linear-like `base` plus the low-rank update B A (alpha / r)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        xa = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(xa)) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def _spec(model: nn.Module):
    """The model_type's ArchSpec (its block linears may already be 4-bit layers), else spec_for."""
    from lowbit.arch import get_module, spec_for
    from lowbit.arch.specs import BY_MODEL_TYPE
    s = BY_MODEL_TYPE.get(getattr(getattr(model, "config", None), "model_type", None))
    if s is not None and isinstance(get_module(model, s.blocks), nn.ModuleList):
        return s
    return spec_for(model)


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """Leaf names of the spec's block linears, in execution order (q_proj, k_proj, ...)."""
    return tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for n in _spec(model).linears))


def _target_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    blocks = _spec(model).blocks + "."
    out = []
    for name, mod in model.named_modules():
        if name.startswith(blocks) and name.rsplit(".", 1)[-1] in targets and hasattr(mod, "in_features") \
                and not isinstance(mod, LoraLinear) and not name.endswith((".lora_A", ".lora_B")):
            out.append(name)
    return out


def add_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze every parameter of `model`, wrap each target linear in LoraLinear (seeded A init).
    -> the wrapped module names."""
    from lowbit.nn.qlinear import set_submodule
    cfg.check()
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LowbitError("add_lora: the model already has LoRA adapters")
    targets = tuple(cfg.targets) if cfg.targets else default_targets(model)
    names = _target_modules(model, targets)
    if not names:
        raise LowbitError(f"add_lora: no linear named {', '.join(targets)} inside the model's blocks")
    model.requires_grad_(False)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        for name in names:
            set_submodule(model, name, LoraLinear(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout))
    finally:
        torch.random.set_rng_state(gen_state)
    model._lowbit_lora = {"r": cfg.r, "alpha": float(cfg.alpha), "dropout": float(cfg.dropout),
                          "targets": list(targets)}
    return names


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's key names -> the A and B weights (float32, contiguous)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous()
    return out


def peft_config(model: nn.Module, base: str) -> dict:
    """adapter_config.json as peft's LoraConfig writes it (the fields this adapter sets)."""
    meta = getattr(model, "_lowbit_lora", None)
    if meta is None:
        raise LowbitError("save_adapter: the model has no LoRA adapters (add_lora first)")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": meta["r"], "lora_alpha": meta["alpha"], "lora_dropout": meta["dropout"],
            "target_modules": sorted(meta["targets"]), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save_adapter(model: nn.Module, out, base: str = "", overwrite: bool = False) -> Path:
    """adapter_config.json + adapter_model.safetensors, atomically (a temporary directory renamed).
    An existing `out` is replaced only with overwrite and only when it is an adapter directory."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise LowbitError(f"adapter output {out}: already exists; choose a new path or pass overwrite")
        if not (out / ADAPTER_CONFIG).is_file():
            raise LowbitError(f"adapter output {out}: exists and is not an adapter directory (no {ADAPTER_CONFIG}); "
                              "refusing to overwrite it")
    sd = adapter_state_dict(model)
    if not sd:
        raise LowbitError("save_adapter: the model has no LoRA adapters (add_lora first)")
    for k, v in sd.items():
        if not bool(torch.isfinite(v).all()):
            raise LowbitError(f"save_adapter: tensor {k} contains NaN/inf; refusing to write a broken adapter")
    cfg = peft_config(model, base)
    from lowbit.export.common import replace_dir
    with replace_dir(out) as tmp:
        save_file(sd, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def load_adapter(model: nn.Module, path) -> list[str]:
    """Read a PEFT LoRA adapter directory (ours or peft's) into `model` (wrapping its targets)."""
    from safetensors.torch import load_file
    p = Path(path)
    cfg_file, w_file = p / ADAPTER_CONFIG, p / ADAPTER_WEIGHTS
    if not (cfg_file.is_file() and w_file.is_file()):
        raise LowbitError(f"{p}: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT LoRA adapter)")
    try:
        c = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise LowbitError(f"{cfg_file}: not JSON ({e})") from None
    if c.get("peft_type") != "LORA" or c.get("use_dora") or c.get("use_rslora") or c.get("rank_pattern") \
            or c.get("alpha_pattern"):
        raise LowbitError(f"{cfg_file}: expected a plain LoRA adapter (peft_type LORA, no DoRA / rsLoRA / "
                          f"per-module ranks), got peft_type {c.get('peft_type')!r}")
    tm = c.get("target_modules")
    targets = tuple(tm) if isinstance(tm, list) else None
    if targets is None:
        raise LowbitError(f"{cfg_file}: target_modules {tm!r}: expected a list of module names")
    names = add_lora(model, LoraConfig(int(c["r"]), float(c["lora_alpha"]), 0.0, targets))
    sd = load_file(str(w_file))
    want = adapter_state_dict(model)
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    if missing or extra:
        raise LowbitError(f"{w_file}: adapter tensors do not match the model: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}")
    mods = lora_modules(model)
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape) or not bool(torch.isfinite(v).all()):
            raise LowbitError(f"{w_file}: tensor {k}: expected finite {tuple(want[k].shape)}, got {tuple(v.shape)}")
        name, leaf = k[len(PEFT_PREFIX):].rsplit(".", 2)[0], k.rsplit(".", 2)[1]
        getattr(mods[name], leaf).weight.data.copy_(v)
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base: W + B A (alpha / r). A Linear4bit / Linear8bit base is
    dequantized, updated and quantized again with its own settings (so the merged model is as
    small as the base; the update is rounded to the base's grid). -> the merged module names."""
    from lowbit.nn.bnb4 import Linear4bit, Linear8bit
    from lowbit.nn.qlinear import set_submodule
    merged = []
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            base = m.base
            if isinstance(base, (Linear4bit, Linear8bit)):
                w = base.dequantize(torch.float32) + m.delta_weight().float()
                lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
                lin.weight.data = w
                if base.bias is not None:
                    lin.bias.data = base.bias.detach().float()
                new = (Linear4bit.from_linear(lin, base.quant_type, base.block_size, base.double_quant,
                                              base.compute_dtype, name=name) if isinstance(base, Linear4bit)
                       else Linear8bit.from_linear(lin, base.compute_dtype, name=name))
            elif isinstance(base, nn.Linear):
                base.weight.data += m.delta_weight().to(base.weight.dtype)
                new = base
            else:
                raise LowbitError(f"merge_lora: {name}: cannot merge into a {type(base).__name__}")
            set_submodule(model, name, new)
            merged.append(name)
    if hasattr(model, "_lowbit_lora"):
        del model._lowbit_lora
    return merged


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
