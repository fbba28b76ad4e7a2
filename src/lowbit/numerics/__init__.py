"""Number formats and quantization primitives: tensors only, no nn.Module, no model."""
# importing codebooks registers the nf4 / fp4 / ternary / fp8 codecs with affine's registry
from lowbit.numerics import codebooks as _codebooks  # noqa: F401
from lowbit.numerics.affine import (QParams, choose_qparams, dequantize, fake_quantize, mse,
                                    qparams_from_range, quantize, quantize_dequantize, sqnr_db)
from lowbit.numerics.qweight import QuantizedWeight, quantize_weight
from lowbit.numerics.scheme import Scheme, int_scheme

__all__ = ["QParams", "choose_qparams", "dequantize", "fake_quantize", "mse", "qparams_from_range",
           "quantize", "quantize_dequantize", "sqnr_db", "QuantizedWeight", "quantize_weight",
           "Scheme", "int_scheme"]
