"""Equivalent float rewrites before quantization (AWQ / SmoothQuant scales, Hadamard rotations)."""
