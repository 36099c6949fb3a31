from herd.callbacks.context import ContextSchedule
from herd.callbacks.fusion import FusionSamples
from herd.callbacks.layout import ScalarLayout
from herd.callbacks.nonfinite import NonFiniteGuard
from herd.callbacks.passkey import PasskeyRetrieval
from herd.callbacks.resume import ExactResume
from herd.callbacks.samples import TextSamples
from herd.callbacks.speech import AudioThroughput, SpeechSamples
from herd.callbacks.throughput import TokenThroughput
from herd.callbacks.trained_parameters import TrainedParameters
from herd.callbacks.vision import ConfusionMatrix, ImagePredictions, ImageThroughput

__all__ = [
    "AudioThroughput",
    "ConfusionMatrix",
    "ContextSchedule",
    "ExactResume",
    "FusionSamples",
    "ImagePredictions",
    "ImageThroughput",
    "NonFiniteGuard",
    "PasskeyRetrieval",
    "ScalarLayout",
    "SpeechSamples",
    "TextSamples",
    "TokenThroughput",
    "TrainedParameters",
]
