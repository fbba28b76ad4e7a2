"""Model structure as data: where the decoder blocks are, which linears share an input, per HF model_type."""
