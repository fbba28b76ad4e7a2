"""BitLinear (BitNet b1.58) as a trainable layer, the swap that puts it into a model, and the
freeze that turns the trained model into an ordinary lowbit quantized model.

    n = swap_to_bitlinear(model)             # every block linear of the arch spec -> BitLinear
    ... train (lowbit.train.loop.train; the latent fp32 weights have requires_grad) ...
    report = freeze_bitlinear(model)         # BitLinear -> QuantLinear(ternary, per tensor) with
                                             # ActQuant(int8, dynamic, per token): a QuantizeReport
                                             # that lowbit.api.export writes like any other

Embeddings and lm_head stay in full precision, as in the paper (arXiv:2402.17764, sec. 2). The
math is methods/bitnet.py. BitLinear's forward computes exactly what the frozen model computes
(same scale, same codes, same activation rounding): freezing changes the container, not the
function, up to float summation order.

Scale grid. A frozen scale must be a number the file formats store exactly. GGUF's TQ1_0/TQ2_0
hold one fp16 scale per 256 weights, so a per-tensor fp16 scale is exact there, but only for rows
whose length is a multiple of 256 (llama.cpp's rule). SmolLM2's 576-column linears cannot be TQ
(576 = 2.25 x 256); llama-quantize's own TQ mixes fall back to Q4_0 there, which holds ternary
values with an error (d = -max/8 stores +-s as 8 d and 7 d). lowbit writes those tensors as Q8_0
instead, exact when s = 127 * d with d an fp16 number (Q8_0: 32 int8 codes and one fp16 d). So
`gguf_scale` puts each layer's absmean on the grid its GGUF type holds exactly:

    in_features % 256 == 0    s = fp16(absmean)                 -> TQ1_0 / TQ2_0, exact
    otherwise                 s = 127 * fp16(absmean / 127)     -> Q8_0, exact

Both round the absmean by at most 2^-11 relative, well inside what training moves it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.methods.bitnet import absmean_scale, act_quant_8bit, ste, ternary_codes

TQ_BLOCK = 256
Q8_0_QMAX = 127.0


def gguf_scale(absmean: torch.Tensor, in_features: int) -> torch.Tensor:
    """The per-tensor scale on the grid its GGUF type stores exactly (module docstring)."""
    a = absmean.float()
    if in_features % TQ_BLOCK == 0:
        return _fp16_positive(a)
    return (_fp16_positive(a / Q8_0_QMAX) * Q8_0_QMAX).float()


def _fp16_positive(a: torch.Tensor) -> torch.Tensor:
    out = a.to(torch.float16).float()
    if not bool(torch.isfinite(out).all()):
        raise LowbitError(f"BitLinear scale {float(a):.4g} is outside the fp16 range")
    return out.clamp_min(2.0 ** -24)


class BitLinear(nn.Module):
    """y = Q_a(x) @ (s * RoundClip(W / s, -1, 1))^T + b, trained through the STE on the latent W.

    weight  (out, in) float32 Parameter: the latent weight the optimizer updates
    lam     weight mixing factor in [0, 1] (1: ternary; below: W + lam (Q(W) - W), warm-up)
    quant_act  per-token int8 absmax activations (BitNet's 8-bit activations)
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, quant_act: bool = True):
        super().__init__()
        if weight.dim() != 2:
            raise LowbitError(f"BitLinear: expected a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.lam = 1.0
        self.quant_act = quant_act

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_act: bool = True) -> "BitLinear":
        return cls(linear.weight, linear.bias, quant_act=quant_act)

    def scale(self) -> torch.Tensor:
        """0-d: the current absmean of the latent weight on the file's grid (gguf_scale)."""
        return gguf_scale(absmean_scale(self.weight), self.in_features)

    def codes(self) -> torch.Tensor:
        """(out, in) int8 in {-1, 0, 1}: the ternary weight the current latent weight freezes to."""
        return ternary_codes(self.weight.detach(), self.scale())

    def quantized_weight(self) -> torch.Tensor:
        return self.codes().float() * self.scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_q = self.quantized_weight()
        if self.lam != 1.0:
            w_q = w.detach() + self.lam * (w_q - w.detach())
        x_q = act_quant_8bit(x) if self.quant_act else x
        if torch.is_grad_enabled():
            w_hat, x_hat = ste(w, w_q), ste(x, x_q) if self.quant_act else x
        else:       # no STE without gradients: w + (w_q - w) can be 1 ulp off w_q, and an ulp can
            w_hat, x_hat = w_q, x_q     # flip a later activation's int8 rounding

        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x_hat, w_hat.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ternary absmean per tensor, "
                f"act={'int8 per token' if self.quant_act else 'float'}, lam={self.lam:g}")


def bitlinear_targets(model: nn.Module) -> list[str]:
    """Dotted names of every block linear the arch spec lists (not embeddings, not lm_head)."""
    from lowbit.arch import get_blocks, get_module, spec_for
    spec = spec_for(model)
    blocks = get_blocks(model, spec)
    out = []
    for i, block in enumerate(blocks):
        for rel in spec.linears:
            mod = get_module(block, rel)
            if mod is None:
                continue
            out.append(f"{spec.blocks}.{i}.{rel}")
    if not out:
        raise LowbitError(f"swap_to_bitlinear: the {spec.name} spec found no block linear in this model")
    return out


def swap_to_bitlinear(model: nn.Module, *, quant_act: bool = True, train_others: bool = False) -> list[str]:
    """Replace each block linear (arch spec) of `model` by a BitLinear holding its weight; every
    other parameter is frozen unless train_others. Returns the swapped names."""
    from lowbit.nn.qlinear import set_submodule
    names = bitlinear_targets(model)
    for p in model.parameters():
        p.requires_grad_(train_others)
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, BitLinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise LowbitError(f"swap_to_bitlinear: {name} is {type(mod).__name__}, expected a float nn.Linear")
        set_submodule(model, name, BitLinear.from_linear(mod, quant_act=quant_act))
    return names


def set_lam(model: nn.Module, lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise LowbitError(f"BitLinear lam: expected a weight-mixing factor in [0, 1], got {lam!r}")
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.lam = float(lam)


BITNET_RULE_ACT = {"format": "int8", "dynamic": True, "granularity": "token"}


def bitnet_recipe():
    """The Recipe a frozen BitNet model carries: ternary per-tensor codes on the block linears,
    int8 dynamic per-token input activations (the BitNet b1.58 W1.58A8 scheme)."""
    from lowbit.numerics.scheme import Scheme
    from lowbit.recipe import Recipe, Rule
    rule = Rule(r".*\.(self_attn|mlp)\.[a-z_]+_proj$", Scheme(bits=2, format="ternary", granularity="tensor"),
                "rtn", {}, input_activations=dict(BITNET_RULE_ACT))
    return Recipe(name="bitnet-b1.58", rules=[rule], ignore=[r"^lm_head$"],
                  description="BitNet b1.58: ternary absmean weights per tensor (scale on the GGUF grid), "
                              "int8 per-token absmax activations; embeddings and lm_head in float")


@torch.no_grad()
def freeze_bitlinear(model: nn.Module):
    """BitLinear -> QuantLinear(ternary QuantizedWeight, per-tensor scale) + ActQuant(int8 per
    token), in place; -> api.QuantizeReport (qweights, layers, recipe) for evaluate / export."""
    from lowbit.api import QuantizeReport, layer_row
    from lowbit.nn.actquant import ActQuant
    from lowbit.nn.qlinear import QuantLinear, set_submodule
    from lowbit.numerics.activation import ActScheme
    from lowbit.numerics.qweight import QuantizedWeight
    recipe = bitnet_recipe()
    scheme = recipe.rules[0].scheme
    report = QuantizeReport(recipe, notes=["frozen from BitLinear (lowbit.nn.bitlinear)"])
    acts = ActScheme(**BITNET_RULE_ACT)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, BitLinear):
            continue
        if not bool(torch.isfinite(mod.weight).all()):
            raise LowbitError(f"freeze_bitlinear: {name}.weight contains NaN/inf")
        s = mod.scale()
        codes = (mod.codes() + 1).to(torch.uint8)                    # TernaryCodec: code = W_q + 1
        qw = QuantizedWeight(codes, s.reshape(1, 1), None, scheme, info={"absmean_grid": "gguf"})
        ql = QuantLinear(qw, mod.bias)
        if mod.quant_act:
            ql.act_quant = ActQuant(acts)
        set_submodule(model, name, ql)
        report.qweights[name] = qw
        report.layers.append(layer_row(name, qw, "bitnet"))
        if mod.quant_act:
            report.activations[name] = {"input_scheme": acts.short_name()}
    if not report.qweights:
        raise LowbitError("freeze_bitlinear: the model has no BitLinear (call swap_to_bitlinear first)")
    for p in model.parameters():
        p.requires_grad_(False)
    return report
