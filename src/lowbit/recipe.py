"""Recipe: which modules get which scheme and which method. Typed, serialisable, saved with every output.

A Recipe is an ordered list of rules. For each candidate module (every nn.Linear; an embedding
only when a rule names it), the first rule whose `targets` regex matches the module's qualified
name (re.search) decides; `ignore` patterns are checked first and keep a module in float. A rule
with scheme=None also keeps its modules in float.

    Recipe(name="w4g128-gptq",
           rules=[Rule(targets=r".*", scheme=int_scheme(4, 128), method="gptq",
                       method_args={"damp_percent": 0.01})],
           ignore=["lm_head"])

Named presets (`get_recipe("w4g128-gptq")`) follow a small grammar, so every combination a user
may want has a name without a table of them:

    w{bits}[g{group}][-sym][-rot]-{method}[-actorder[-static]][-mse][-ft]
        e.g. w2g64-vq (vector codebooks, methods/vq.py), w3g64-rot-gptq, w4g64-signround, w2g64-rot-signround, w8-rtn (per channel), w3g128-gptq, w2g64-gptq-actorder, w4g128-sym-rtn,
        w4g128-gptq-actorder-mse (GPTQ, act-order, MSE range search per group: the best 4-bit
        g128 point measured on the bundled model, BENCHMARKS.md), w4g128-gptq-actorder-static
  -rot       the float model is Hadamard-rotated first (transforms/rotate.py: residual stream and
             v/o heads, folded; float outputs unchanged), transforms=[{"name": "rotate", "seed": 0}]
  -actorder  gptq: columns by descending Hessian diagonal (g_idx stored with groups)
  -static    gptq with -actorder: group qparams fixed up front on the original columns (no g_idx)
  -mse       rtn / gptq: each group's range shrunk to the ratio that minimises its (Hessian-
             weighted, for gptq) squared error, instead of the full min-max range
  -ft        then every scale, codebook and norm fine-tuned end to end on the KL to the float
             model over the calibration windows, codes fixed (lowbit.train.tune), e.g. w2g64-vq-ft
Other preset families (GGUF mixes such as q4_k_m) register themselves with `register_preset`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lowbit.errors import LowbitError
from lowbit.numerics.scheme import Scheme, int_scheme

RECIPE_VERSION = 1


@dataclass
class Rule:
    targets: str
    scheme: Scheme | None
    method: str = "rtn"
    method_args: dict = field(default_factory=dict)
    # input-activation quantization of the matched linears (numerics/activation.py ActScheme
    # fields: format, dynamic, granularity, calibrator, outlier_threshold); None: float inputs
    input_activations: dict | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.targets)
        except re.error as e:
            raise LowbitError(f"Rule.targets: {self.targets!r} is not a valid regex ({e})") from None
        if self.input_activations is not None:
            from lowbit.numerics.activation import ActScheme
            ActScheme.from_dict(self.input_activations)       # validated up front

    def to_dict(self) -> dict:
        d = {"targets": self.targets, "scheme": None if self.scheme is None else self.scheme.to_dict(),
             "method": self.method, "method_args": dict(self.method_args)}
        if self.input_activations is not None:
            d["input_activations"] = dict(self.input_activations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        missing = {"targets", "scheme"} - set(d)
        if missing:
            raise LowbitError(f"Rule: missing keys {sorted(missing)} in {d!r}")
        scheme = None if d["scheme"] is None else Scheme.from_dict(d["scheme"])
        act = d.get("input_activations")
        return cls(d["targets"], scheme, d.get("method", "rtn"), dict(d.get("method_args", {})),
                   None if act is None else dict(act))


@dataclass
class Recipe:
    name: str
    rules: list[Rule]
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    calibration: dict = field(default_factory=dict)   # n_samples, seq_len, seed, text
    description: str = ""
    # equivalent rewrites (lowbit.transforms), in order: model-level ones applied to the float model
    # before any rule (e.g. {"name": "rotate", "seed": 0}); block-level ones applied to each float
    # block before it is quantized ({"name": "awq" | "smoothquant", **options})
    transforms: list[dict] = field(default_factory=list)
    # end-to-end fine-tuning after every code is chosen (lowbit.train.tune TuneConfig options:
    # epochs, batch_size, lr, norm_lr, ...): scales, codebooks and norms on the float model's KL,
    # over the calibration windows; empty: none
    finetune: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.finetune:
            from lowbit.train.tune import TuneConfig
            TuneConfig.from_dict(self.finetune)      # validated up front

    def rule_for(self, module_name: str) -> Rule | None:
        """The rule that decides `module_name`, or None to keep it in float."""
        if any(re.search(p, module_name) for p in self.ignore):
            return None
        for rule in self.rules:
            if re.search(rule.targets, module_name):
                return rule if rule.scheme is not None else None
        return None

    @property
    def methods(self) -> set[str]:
        return {r.method for r in self.rules if r.scheme is not None}

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"lowbit_recipe_version": RECIPE_VERSION, "name": self.name, "description": self.description,
             "rules": [r.to_dict() for r in self.rules], "ignore": list(self.ignore),
             "calibration": dict(self.calibration)}
        if self.transforms:       # absent when empty: recipes without transforms keep their bytes
            d["transforms"] = [dict(t) for t in self.transforms]
        if self.finetune:         # likewise absent when empty
            d["finetune"] = dict(self.finetune)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        v = d.get("lowbit_recipe_version")
        if v != RECIPE_VERSION:
            raise LowbitError(f"recipe: expected lowbit_recipe_version {RECIPE_VERSION}, got {v!r}")
        return cls(name=d.get("name", "custom"), rules=[Rule.from_dict(r) for r in d.get("rules", [])],
                   ignore=list(d.get("ignore", [])), calibration=dict(d.get("calibration", {})),
                   description=d.get("description", ""),
                   transforms=[dict(t) for t in d.get("transforms", [])],
                   finetune=dict(d.get("finetune") or {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        from lowbit.io import atomic_file
        with atomic_file(Path(path), "w") as fh:
            fh.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LowbitError(f"recipe file {p}: not readable JSON ({e})") from e
        if isinstance(d, dict) and "lowbit_recipe" in d:  # a manifest with the recipe embedded
            d = d["lowbit_recipe"]
        if not isinstance(d, dict):
            raise LowbitError(f"recipe file {p}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except LowbitError as e:
            raise LowbitError(f"recipe file {p}: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, re.error) as e:
            raise LowbitError(f"recipe file {p}: malformed recipe ({type(e).__name__}: {e})") from None


# ---- presets ----------------------------------------------------------------------------------
_PRESETS: dict[str, tuple[Callable[[], Recipe], str]] = {}
_GRAMMAR = re.compile(r"^w(?P<bits>[2-8])(?:g(?P<group>\d+))?(?P<sym>-sym)?(?P<rot>-rot)?-(?P<method>[a-z0-9_]+)"
                      r"(?P<actorder>-actorder(?P<static>-static)?)?(?P<mse>-mse)?(?P<ft>-ft)?$")
# modules that register more presets when imported (kept lazy: importing lowbit stays cheap)
PRESET_MODULES: list[str] = ["lowbit.presets.gguf_mixes", "lowbit.presets.activations"]
# name -> Recipe | None parsers for preset families with a grammar of their own (AWQ, W8A8, ...),
# tried after the named presets and before the weight-only grammar
PRESET_RESOLVERS: list[Callable[[str], "Recipe | None"]] = []


def register_preset(name: str, description: str = "") -> Callable:
    def deco(fn: Callable[[], Recipe]) -> Callable[[], Recipe]:
        _PRESETS[name] = (fn, description)
        return fn
    return deco


def _load_preset_modules() -> None:
    import importlib
    for mod in PRESET_MODULES:
        importlib.import_module(mod)


def grammar_recipe(name: str) -> Recipe | None:
    m = _GRAMMAR.match(name)
    if not m:
        return None
    bits = int(m["bits"])
    group = int(m["group"]) if m["group"] else None
    if group == 0:
        raise LowbitError(f"recipe {name!r}: group size 0 is not a scheme; write w{bits}-{m['method']} "
                          f"for one scale per output channel, or w{bits}g128-{m['method']} for groups")
    sym = bool(m["sym"]) or (bits == 8 and group is None)
    args: dict = {}
    if m["actorder"]:
        args["act_order"] = True
    if m["static"]:
        args["static_groups"] = True
    if m["mse"]:
        args["clip"] = "mse"
    extras = [t for k, t in (("act_order", "act-order"), ("static_groups", "static groups"),
                             ("clip", "MSE range search")) if k in args]
    desc = (f"{bits}-bit {'symmetric' if sym else 'asymmetric'} "
            f"{'group ' + str(group) if group else 'per output channel'}, {m['method']}"
            f"{' with ' + ', '.join(extras) if extras else ''}; lm_head and embeddings stay in float")
    transforms = [{"name": "rotate", "seed": 0}] if m["rot"] else []
    if transforms:
        desc = "Hadamard-rotated (lowbit.transforms.rotate), " + desc
    scheme = int_scheme(bits, group, sym)
    if m["method"] == "vq":
        if m["sym"] or args:
            raise LowbitError(f"recipe {name!r}: vq takes no -sym / -actorder / -mse (its codebook is "
                              f"learned); write w{bits}g{group or 64}-vq")
        from lowbit.methods.vq import VQConfig, vector_dim
        from lowbit.numerics.vq import vq_scheme
        scheme = vq_scheme(bits, group or 64)
        d = vector_dim(bits, VQConfig())
        desc = (f"vector codebooks ({bits} index bits per weight: {1 << (bits * d)} learned codewords of {d} "
                f"columns, GPTQ error feedback, scales per group of {group or 64}); lm_head and embeddings "
                "stay in float")
        if transforms:
            desc = "Hadamard-rotated (lowbit.transforms.rotate), " + desc
    finetune = {}
    if m["ft"]:
        from dataclasses import asdict
        from lowbit.train.tune import TuneConfig
        finetune = asdict(TuneConfig())
        desc += ("; then scales, codebooks and norms fine-tuned end to end on the float model's KL "
                 f"({finetune['epochs']} epochs over the calibration windows, codes fixed)")
    return Recipe(name=name, rules=[Rule(r".*", scheme, m["method"], args)],
                  description=desc, transforms=transforms, finetune=finetune)


def get_recipe(spec: str | Path | Recipe) -> Recipe:
    """A preset name, a path to a recipe JSON (or a manifest that embeds one), or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    s = str(spec)
    _load_preset_modules()
    if s in _PRESETS:
        return _PRESETS[s][0]()
    for resolve in PRESET_RESOLVERS:
        r = resolve(s)
        if r is not None:
            return r
    r = grammar_recipe(s)
    if r is not None:
        return r
    if Path(s).is_file():
        return Recipe.load(s)
    raise LowbitError(f"recipe {s!r}: not a preset, preset grammar match or file. Presets: "
                      f"{', '.join(sorted(_PRESETS)) or '(none registered)'}; grammar: "
                      "w{bits}[g{group}][-sym][-rot]-{method}[-actorder[-static]][-mse][-ft], e.g. w4g128-gptq, "
                      "w4g128-gptq-actorder-mse, w8-rtn")


def list_presets() -> dict[str, str]:
    _load_preset_modules()
    out = {k: d for k, (_, d) in _PRESETS.items()}
    for ex in ("w8-rtn", "w4g128-rtn", "w4g128-gptq", "w3g128-gptq", "w2g64-gptq-actorder",
               "w4g128-gptq-actorder-mse", "w4g128-gptq-actorder-static", "w4g64-signround",
               "w3g64-rot-gptq", "w3g64-rot-signround", "w2g64-rot-signround", "w2g64-vq", "w3g64-vq"):
        out.setdefault(ex, grammar_recipe(ex).description)
    return out
