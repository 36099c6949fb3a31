from herd.systems.fusion import FusionSystem
from herd.systems.language import LanguageSystem
from herd.systems.speech import SpeechSystem
from herd.systems.vision import VisionSystem

__all__ = [
    "FusionSystem",
    "LanguageSystem",
    "SpeechSystem",
    "VisionSystem",
]
