"""The input_activations of a compressed-tensors checkpoint, from a recipe's ActSchemes (W8A8).

    recipe rule input_activations (numerics/activation.py)   ->  QuantizationArgs (vLLM reads it)
        int8, dynamic, per token                                {num_bits 8, type int, strategy token, dynamic true}
        int8, static, per tensor (calibrated)                   {..., strategy tensor, dynamic false}
                                                                + "<layer>.input_scale" (1,) float32 per layer
        fp8_e4m3 dynamic / static                               type float, same strategies

compressed-tensors' static input_scale is the per-tensor scale (x_q = round(x / input_scale)),
exactly ActQuant.scale. LLM.int8()'s outlier decomposition has no compressed-tensors form: refused.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def recipe_activation_args(qm) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(QuantizationArgs dict or None, {name.input_scale: tensor}) for the model's quantized layers."""
    recipe = qm.recipe
    rules = [] if recipe is None else [r for r in recipe.rules if r.scheme is not None]
    acts = {None if r.input_activations is None else tuple(sorted(r.input_activations.items())) for r in rules}
    if not acts or acts == {None}:
        return None, {}
    if len(acts) > 1:
        raise LowbitError(f"compressed-tensors format: recipe {recipe.name!r} mixes input-activation schemes "
                          "across rules; one input_activations per checkpoint is written")
    from lowbit.numerics.activation import ActScheme
    s = ActScheme.from_dict(dict(next(iter(acts))))
    if s.outlier_threshold is not None:
        raise LowbitError("compressed-tensors format: LLM.int8() outlier decomposition has no "
                          "compressed-tensors form; export the int8 weights with a plain w8a8 / w8a16 recipe")
    args = {"num_bits": 8, "type": "int" if s.format == "int8" else "float", "symmetric": True,
            "strategy": s.granularity, "dynamic": s.dynamic}
    scales = {}
    if not s.dynamic:
        rows = qm.provenance.get("layers", {})
        for name in qm.qweights:
            v = rows.get(name, {}).get("input_scale")
            if v is None:
                raise LowbitError(f"compressed-tensors format: {name} has no calibrated input_scale; "
                                  "quantize with calibration data first")
            scales[f"{name}.input_scale"] = torch.tensor([float(v)], dtype=torch.float32)
    return args, scales
