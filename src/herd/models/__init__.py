from herd.models.fusion import FusionModel, build_fusion_model
from herd.models.llama import FLAVORS, Llama, LlamaConfig, RopeScaling, generate
from herd.models.pretrained import load_pretrained_llama, save_hf_checkpoint
from herd.models.speech import (
    SpeechAdapter,
    SpeechAdapterConfig,
    SpeechEncoder,
    SpeechEncoderConfig,
)

__all__ = [
    "FLAVORS",
    "FusionModel",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "SpeechAdapter",
    "SpeechAdapterConfig",
    "SpeechEncoder",
    "SpeechEncoderConfig",
    "build_fusion_model",
    "generate",
    "load_pretrained_llama",
    "save_hf_checkpoint",
]
