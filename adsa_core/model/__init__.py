"""LlamaGen models: GPT (c2i/t2i), VQ tokenizer, checkpoint loading, caption encoder."""

from .checkpoint import CheckpointError, load_gpt, load_vq, parse_dtype, read_state_dict
from .llamagen import KVCache, Transformer
from .vq import VQModel

__all__ = ["CheckpointError", "KVCache", "Transformer", "VQModel", "load_gpt", "load_vq", "parse_dtype",
           "read_state_dict"]
