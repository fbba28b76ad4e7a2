"""Quantization methods: one file per algorithm (rtn, gptq, ...), a config dataclass plus pure tensor math."""
