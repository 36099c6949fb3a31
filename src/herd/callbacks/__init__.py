from herd.callbacks.context import ContextSchedule
from herd.callbacks.passkey import PasskeyRetrieval
from herd.callbacks.samples import TextSamples
from herd.callbacks.throughput import TokenThroughput

__all__ = ["ContextSchedule", "PasskeyRetrieval", "TextSamples", "TokenThroughput"]
