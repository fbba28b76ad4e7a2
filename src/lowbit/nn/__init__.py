"""QuantLinear and CPU kernels on packed weights."""
