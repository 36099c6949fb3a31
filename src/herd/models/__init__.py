from herd.models.llama import FLAVORS, Llama, LlamaConfig, RopeScaling, generate
from herd.models.pretrained import load_pretrained_llama, save_hf_checkpoint

__all__ = [
    "FLAVORS",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "generate",
    "load_pretrained_llama",
    "save_hf_checkpoint",
]
