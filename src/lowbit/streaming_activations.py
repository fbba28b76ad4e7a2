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
    from lowbit.arch import get_blocks, head_input, spec_for
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
    heads: list[str] = []
    for name in wanted:
        idx = name[len(prefix) + 1:].partition(".")[0] if name.startswith(prefix + ".") else ""
        if not idx.isdigit():
            if name != arch.lm_head:
                raise LowbitError(f"streaming: layer {name}: calibrated input activations outside the "
                                  "decoder blocks are streamed for the output head only")
            heads.append(name)
            continue
        per_block.setdefault(int(idx), []).append(name)
    blocks = get_blocks(model, arch)
    with torch.no_grad():
        acts = capture_block_inputs(model, blocks[0], tokens, batch_size)
        last = len(blocks) - 1 if heads else max(per_block)
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
        if heads:                        # the output head: its input is the final norm's output
            floats, qws = block_layers(None)
            for name in heads:
                float_mod = model.get_submodule(name)
                mod = make_quant_module(qws[name], floats.get(f"{name}.bias"))
                mod.act_quant = ActQuant(ActScheme.from_dict(wanted[name]))
                o = LayerObserver(name, mod)
                handle = mod.register_forward_pre_hook(o.hook)
                set_submodule(model, name, mod)
                try:
                    for a in acts:
                        mod(head_input(model, arch, a.hidden))
                finally:
                    handle.remove()
                    set_submodule(model, name, float_mod)
                rows[name] = activation_row(o.mod, o.result())
    return rows


def requantized_blocks(files, where: str, model: nn.Module, prefix: str, rules: dict, dtype: torch.dtype):
    """block_layers for a data-free streamed run: block b's tensors (the ones the skeleton `model`
    expects) read from the source and its targeted linears quantized again by their rules (the
    values the write pass makes); b=None: the targeted layers outside the blocks (lm_head)."""
    from lowbit.streaming import quantize_from_source, source_floats, weight_key

    def block_layers(b: int | None) -> tuple[dict, dict]:
        inside = (lambda n: n.startswith(f"{prefix}.{b}.")) if b is not None else \
            (lambda n: not n.startswith(prefix + "."))
        qws = {layer: quantize_from_source(files, layer, rule, dtype, key=weight_key(model, layer, files))
               for layer, rule in rules.items() if inside(layer)}
        if b is None:
            return {k: files.read(k).to(dtype) for k in (f"{n}.bias" for n in qws) if k in files}, qws
        return source_floats(model, files, f"{prefix}.{b}", dtype, where, skip=qws), qws
    return block_layers

