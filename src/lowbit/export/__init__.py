"""File formats, one module each with write() and read(): gguf, gptq, compressed-tensors, lowbit native; manifest."""
