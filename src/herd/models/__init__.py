from herd.models.fusion import FusionModel, build_fusion_model
from herd.models.llama import FLAVORS, Llama, LlamaConfig, RopeScaling, generate
from herd.models.mllama import MllamaConfig, MllamaModel
from herd.models.pretrained import load_pretrained_llama, save_hf_checkpoint
from herd.models.pretrained_mllama import load_pretrained_mllama, save_hf_mllama
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
    "MllamaConfig",
    "MllamaModel",
    "RopeScaling",
    "SpeechAdapter",
    "SpeechAdapterConfig",
    "SpeechEncoder",
    "SpeechEncoderConfig",
    "build_fusion_model",
    "generate",
    "load_pretrained_llama",
    "load_pretrained_mllama",
    "save_hf_checkpoint",
    "save_hf_mllama",
]
