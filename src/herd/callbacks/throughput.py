"""Throughput (tokens, images, ... per second) and model FLOPs utilisation, logged every
training step."""

from __future__ import annotations

import time
from collections import deque

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

# Dense peak FLOP/s of an H100 SXM by NVIDIA's datasheet (the H200 has the same compute).
H100_SXM_DENSE_FLOPS = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}


class StepRate(L.Callback):
    """Times each training step; `rate(trainer, count)` records the step's count of items
    and returns items per second (per device) over the last `window` steps."""

    def __init__(self, window: int = 10):
        self.window = window
        self._times: deque = deque(maxlen=window)
        self._counts: deque = deque(maxlen=window)
        self._start = 0.0

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def rate(self, trainer, count: int) -> float:
        self._sync(trainer)
        self._times.append(time.perf_counter() - self._start)
        self._counts.append(count)
        return sum(self._counts) / max(sum(self._times), 1e-9)


class TokenThroughput(StepRate):
    """Logs `perf/tokens_per_sec` (per device, averaged over `window` steps); for systems
    that count their FLOPs (`training_flops(batch)`), `perf/tflops` (achieved TFLOP/s per
    device, on any device: how far a CPU run is from the machine's peak) and `perf/mfu` where
    the device's peak FLOPs are known (CUDA datacenter cards; not CPUs)."""

    def __init__(self, window: int = 10, token_key: str = "input_ids"):
        super().__init__(window)
        self.token_key = token_key
        self._peak_flops: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.strategy.root_device.type == "cuda":
            dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(
                str(trainer.precision).split("-")[0], torch.float32
            )
            self._peak_flops = get_available_flops(trainer.strategy.root_device, dtype)
            chip = torch.cuda.get_device_name(trainer.strategy.root_device)
            if self._peak_flops is None and "H200" in chip:
                # Lightning's table lacks the H200: an H100 SXM's compute with more memory
                self._peak_flops = H100_SXM_DENSE_FLOPS.get(dtype)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = batch[self.token_key]
        tokens_per_sec = self.rate(trainer, tokens.numel())
        pl_module.log("perf/tokens_per_sec", tokens_per_sec, on_step=True, on_epoch=False)
        if not hasattr(pl_module, "training_flops"):
            return
        achieved = tokens_per_sec * pl_module.training_flops(batch) / tokens.numel()  # FLOP/s
        pl_module.log("perf/tflops", achieved / 1e12, on_step=True, on_epoch=False)
        if self._peak_flops:
            pl_module.log("perf/mfu", achieved / self._peak_flops, on_step=True, on_epoch=False)
