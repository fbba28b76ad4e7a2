"""Model structure as data: where the decoder blocks are, which linears share an input, per HF model_type.

    spec = spec_for(model)            # the table entry for model.config.model_type (arch/specs.py),
                                      # or the generic fallback: the repeated block list, groups
                                      # discovered later by `probe_groups` on a real block run
    blocks = get_blocks(model, spec)  # the nn.ModuleList of decoder blocks

"Linear-like" modules are nn.Linear and transformers' Conv1D (GPT-2), whose weight is stored
transposed, (in_features, out_features); `linear_weight` always returns (out_features, in_features).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from lowbit.arch.specs import BY_MODEL_TYPE, SPECS, ArchSpec
from lowbit.errors import LowbitError

__all__ = ["ArchSpec", "SPECS", "spec_for", "get_blocks", "find_block_list", "probe_groups",
           "is_linear_like", "linear_weight", "get_module"]


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return None


def is_linear_like(mod: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(mod, nn.Linear) or (conv1d is not None and isinstance(mod, conv1d))


def _linear_or_quantized(mod: nn.Module) -> bool:
    from lowbit.nn.qlinear import QuantLinear
    return is_linear_like(mod) or isinstance(mod, QuantLinear)


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    if is_linear_like(mod):  # Conv1D: y = x @ W + b with W (in, out)
        return mod.weight.t()
    raise LowbitError(f"expected an nn.Linear or Conv1D, got {type(mod).__name__}")


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    blocks = get_module(model, spec.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise LowbitError(f"architecture {spec.name!r}: expected a non-empty nn.ModuleList of decoder "
                          f"blocks at {spec.blocks!r}, found {type(blocks).__name__}")
    return blocks


def head_input(model: nn.Module, spec: ArchSpec, h):
    """The output head's input from the last decoder block's output: the spec's final norm(s),
    as the model's own forward applies them (streamed passes run the blocks one at a time)."""
    if not spec.head:
        raise LowbitError(f"architecture {spec.name!r}: the modules between the decoder blocks and the "
                          "output head are not known; this pass needs the whole model (no --stream)")
    for name in spec.head:
        h = get_module(model, name)(h)
    return h


def _spec_fits(model: nn.Module, spec: ArchSpec) -> bool:
    blocks = get_module(model, spec.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return False
    return all(_linear_or_quantized(get_module(blocks[0], n) or nn.Identity()) for n in spec.linears)


def spec_for(model: nn.Module) -> ArchSpec:
    """The ArchSpec of `model`: its model_type's table entry when the modules are where the
    table says, else the generic fallback (groups to be discovered by `probe_groups`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = BY_MODEL_TYPE.get(model_type)
    if spec is not None and _spec_fits(model, spec):
        return spec
    return generic_spec(model)


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the nn.ModuleList of >= 2 same-class children that each hold
    linears, with the most parameters. Error when the model has none."""
    best, best_params = None, -1
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        kinds = {type(c) for c in mod}
        if len(kinds) != 1 or not any(_linear_or_quantized(m) for m in mod[0].modules()):
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_params:
            best, best_params = (name, mod), n
    if best is None:
        raise LowbitError(f"model {type(model).__name__} (model_type "
                          f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}): unknown "
                          "architecture with no repeated block list (an nn.ModuleList of >= 2 identical "
                          "blocks holding linears); calibrated methods need one. Add an ArchSpec in "
                          "lowbit/arch/specs.py, or use a data-free method (rtn).")
    return best


def generic_spec(model: nn.Module) -> ArchSpec:
    path, _ = find_block_list(model)
    lm_head = "lm_head" if get_module(model, "lm_head") is not None else ""
    return ArchSpec("generic", path, groups=(), head=(), lm_head=lm_head, discovered=True)


def probe_groups(block: nn.Module, run: Callable[[], object]) -> tuple[tuple[str, ...], ...]:
    """Discover a block's linear groups by watching it run once.

    Hooks every linear-like submodule, calls `run()` (which runs the block on one real batch),
    and groups the linears that received the very same input tensor object, ordered by first
    call. This is how the generic fallback learns what a spec table states for known models.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, mod in block.named_modules():
        if is_linear_like(mod):
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, _n=name: calls.append((_n, args[0]))))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[list[str], torch.Tensor]] = []
    seen = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        for names, gx in groups:
            if gx is x:
                names.append(name)
                break
        else:
            groups.append(([name], x))
    if not groups:
        raise LowbitError(f"block {type(block).__name__}: ran, but no linear inside it was called")
    return tuple(tuple(n) for n, _ in groups)
