"""Input-activation quantization (W8A8, W4A8, ...) of a streamed run, one decoder block at a time.

api.quantize calibrates static input scales after the weights are quantized
(calibration/activations.py): the calibration batches run through the quantized model with
activation quantization off, and a range observer per layer sees every input. A streamed run
never holds that model, so the same pass goes block by block:

    X_0 = the embedding's output for each batch             (capture_block_inputs)
    for each block b up to the last one with such a layer:
        b's float tensors and quantized layers              (block_layers(b): the resume state's
                                                             spool, or re-quantized from the source)
        QuantLinear modules in, their ActQuant attached as the recipe's rule says
        every batch of X_b through b, each layer's observer fed (in batch order, as the
        whole-model pass feeds it), X_{b+1} = b(X_b)
        each layer's scale computed; the block back to the meta device

Each layer's observer sees the same inputs in the same order as in the whole-model pass, so the
scales are the same floats (tests/test_streaming.py). Dynamic schemes need no pass.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from lowbit.errors import LowbitError


def activation_rules(recipe, names: list[str]) -> dict[str, dict]:
    """name -> its rule's input_activations, for the quantized linears that have one."""
    out = {}
    for name in names:
        rule = recipe.rule_for(name)
        if rule is not None and rule.input_activations:
            out[name] = rule.input_activations
    return out


def needs_pass(wanted: dict[str, dict]) -> bool:
    from lowbit.numerics.activation import ActScheme
    return any(not (s := ActScheme.from_dict(d)).dynamic or s.outlier_threshold is not None
               for d in wanted.values())


def stream_activations(model: nn.Module, recipe, wanted: dict[str, dict], tokens: torch.Tensor,
                       batch_size: int, block_layers: Callable[[int], tuple[dict, dict]],
                       log=None) -> dict[str, dict]:
    """The static input scales (and outlier counts) of `wanted` (activation_rules), as
    calibration.activations.quantize_activations computes them on the whole model. model: the
    streamed skeleton with its embedding read; block_layers(b) -> (float tensors of block b by
    full name, {full layer name: QuantizedWeight}). -> name -> row (the report's)."""
    from lowbit.arch import get_blocks, spec_for
    from lowbit.calibration.activations import LayerObserver, activation_row
    from lowbit.calibration.capture import capture_block_inputs, run_block
    from lowbit.calibration.paused import trim_heap
    from lowbit.export.common import set_tensor
    from lowbit.nn.actquant import ActQuant
    from lowbit.nn.qlinear import make_quant_module, set_submodule
    from lowbit.numerics.activation import ActScheme
    log = log or (lambda _m: None)
    rows = {}
    if not needs_pass(wanted):          # dynamic schemes: nothing to calibrate
        for name, d in wanted.items():
            s = ActScheme.from_dict(d)
            rows[name] = {"input_activations": s.short_name(), "input_scheme": s.to_dict()}
        return rows
    arch = spec_for(model)
    prefix = arch.blocks
    per_block: dict[int, list[str]] = {}
    for name in wanted:
        idx = name[len(prefix) + 1:].partition(".")[0] if name.startswith(prefix + ".") else ""
        if not idx.isdigit():
            raise LowbitError(f"streaming: layer {name}: calibrated input activations outside the "
                              "decoder blocks are not streamed")
        per_block.setdefault(int(idx), []).append(name)
    blocks = get_blocks(model, arch)
    with torch.no_grad():
        acts = capture_block_inputs(model, blocks[0], tokens, batch_size)
        last = max(per_block)
        for b, block in enumerate(blocks[:last + 1]):
            floats, qws = block_layers(b)
            for key, t in floats.items():
                if key.rpartition(".")[0] not in qws:        # a quantized layer's bias goes with it
                    set_tensor(model, key, t, f"block {b}")
            obs, handles = {}, []
            for name, qw in qws.items():
                bias = floats.get(f"{name}.bias")
                mod = make_quant_module(qw, bias)
                set_submodule(model, name, mod)
                if name in wanted:
                    mod.act_quant = ActQuant(ActScheme.from_dict(wanted[name]))
                    obs[name] = LayerObserver(name, mod)
                    handles.append(mod.register_forward_pre_hook(obs[name].hook))
            try:
                acts = [run_block(block, a) for a in acts]
            finally:
                for h in handles:
                    h.remove()
            for name, o in obs.items():
                rows[name] = activation_row(o.mod, o.result())
            block.to("meta")
            del floats, qws, obs
            trim_heap()
            log(f"input activations: block {b + 1}/{last + 1}")
    return rows


def requantized_blocks(files, where: str, model: nn.Module, prefix: str, rules: dict, dtype: torch.dtype):
    """block_layers for a data-free streamed run: block b's tensors (the ones the skeleton `model`
    expects) read from the source and its targeted linears quantized again by their rules (the
    values the write pass makes)."""
    from lowbit.streaming import quantize_from_source

    def block_layers(b: int) -> tuple[dict, dict]:
        base = f"{prefix}.{b}"
        keys = [f"{base}.{k}" for k, t in model.get_submodule(base).state_dict(keep_vars=True).items() if t.is_meta]
        floats, qws = {}, {}
        for layer, rule in rules.items():
            if not layer.startswith(base + "."):
                continue
            qws[layer] = quantize_from_source(files, layer, rule, dtype)
        for key in keys:
            owner, _, leaf = key.rpartition(".")
            if owner in qws and leaf == "weight":
                continue
            if key not in files:
                raise LowbitError(f"{where}: tensor {key} is missing")
            t = files.read(key)
            floats[key] = t.to(dtype) if t.is_floating_point() else t
        return floats, qws
    return block_layers

