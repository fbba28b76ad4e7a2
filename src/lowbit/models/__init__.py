"""Loading checkpoints: built-in names, GGUF files and Hugging Face directories."""
from lowbit.models.load import DEFAULT_MODEL, LoadedModel, load_model, load_tokenizer, resolve_source
from lowbit.models.registry import BUILTIN_MODELS

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model", "load_tokenizer", "resolve_source", "BUILTIN_MODELS"]
