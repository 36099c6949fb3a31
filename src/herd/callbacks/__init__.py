from herd.callbacks.samples import TextSamples
from herd.callbacks.throughput import TokenThroughput

__all__ = ["TextSamples", "TokenThroughput"]
