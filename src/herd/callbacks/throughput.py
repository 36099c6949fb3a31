"""Throughput (tokens, images, ... per second) and model FLOPs utilisation, logged every
training step."""

from __future__ import annotations

import time
from collections import deque

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.flop_counter import FlopCounterMode

# Dense peak FLOP/s of an H100 SXM by NVIDIA's datasheet (the H200 has the same compute).
H100_SXM_DENSE_FLOPS = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}


class StepRate(L.Callback):
    """Times each training step and logs `metric`: the items of `items(batch, pl_module)`
    (tokens, images, seconds of audio) per second per device, over the last `window` steps.

    Beside it, `perf/tflops`: achieved TFLOP/s per device, on any device (how far a CPU run
    is from the machine's peak), and `perf/mfu` where the device's peak is known (CUDA
    datacenter cards; not CPUs). A system that counts its own FLOPs (`training_flops(batch)`,
    the language stage's PaLM accounting) is asked every step. For any other, every
    `flops_every_n_steps`-th logged step (rounded up to whole logging intervals) runs under
    torch's FlopCounterMode, which counts the matmuls and convolutions that step really ran,
    forward and backward, frozen parts and skipped layers included; that step is left out of
    the timing (counting slows it), and from then on the figure is the items per second
    times the FLOPs per item of the latest counted step (an estimate where batches differ in
    kind, as the fusion stage's tasks do). FlopCounterMode has no formula for CPU's fused
    attention kernel, so on CPU attention scores are not counted there: a floor."""

    metric = ""  # what a subclass logs, e.g. "perf/tokens_per_sec"

    def __init__(self, window: int = 10, flops_every_n_steps: int = 50):
        self.window = window
        self.flops_every_n_steps = flops_every_n_steps
        self._times: deque = deque(maxlen=window)
        self._counts: deque = deque(maxlen=window)
        self._start = 0.0
        self._counter: FlopCounterMode | None = None
        self._flops_per_item: float | None = None  # of the latest counted step
        self._peak_flops: float | None = None

    def items(self, batch, pl_module) -> float:
        raise NotImplementedError

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

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

    def _count_flops_now(self, trainer, pl_module) -> bool:
        if hasattr(pl_module, "training_flops") or not self.flops_every_n_steps:
            return False
        every = max(trainer.log_every_n_steps, 1)
        interval = every * -(-self.flops_every_n_steps // every)  # whole logging intervals
        return (trainer.global_step + 1) % interval == 0  # a step whose metrics are logged

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        if self._count_flops_now(trainer, pl_module):
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._start = time.perf_counter()

    def rate(self, trainer, count: float, record: bool = True) -> float:
        """Items per second over the window, with this step's `count` unless not `record`."""
        self._sync(trainer)
        if record:
            self._times.append(time.perf_counter() - self._start)
            self._counts.append(count)
        return sum(self._counts) / max(sum(self._times), 1e-9)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        count = self.items(batch, pl_module)
        counted = self._stop_counting()
        rate = self.rate(trainer, count, record=counted is None)
        if not self._times:  # the first step was counted: nothing timed yet
            return
        pl_module.log(self.metric, rate, on_step=True, on_epoch=False)
        if hasattr(pl_module, "training_flops"):
            flops_per_item = pl_module.training_flops(batch) / max(count, 1e-9)
        else:
            if counted is not None:
                self._flops_per_item = counted / max(count, 1e-9)
            if self._flops_per_item is None:
                return
            flops_per_item = self._flops_per_item
        achieved = rate * flops_per_item  # FLOP/s
        pl_module.log("perf/tflops", achieved / 1e12, on_step=True, on_epoch=False)
        if self._peak_flops:
            pl_module.log("perf/mfu", achieved / self._peak_flops, on_step=True, on_epoch=False)

    def _stop_counting(self) -> float | None:
        counter, self._counter = self._counter, None
        if counter is None:
            return None
        counter.__exit__(None, None, None)
        return float(counter.get_total_flops())

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_counting()  # a step that failed under the counter leaves no mode behind


class TokenThroughput(StepRate):
    """`perf/tokens_per_sec` (see StepRate)."""

    metric = "perf/tokens_per_sec"

    def __init__(self, window: int = 10, token_key: str = "input_ids", flops_every_n_steps=50):
        super().__init__(window, flops_every_n_steps)
        self.token_key = token_key

    def items(self, batch, pl_module) -> float:
        return batch[self.token_key].numel()
