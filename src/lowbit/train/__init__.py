"""Training through quantized weights: the shared loop (loop.py) and, one file each, the methods
that train (QAT, LoRA on a frozen quantized base, BitNet b1.58) and the 8-bit optimizers."""
