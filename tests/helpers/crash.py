"""Callbacks that kill the training process the hard way (SIGKILL: no cleanup, no atexit),
for the kill-and-resume tests. Added to a run with `+callbacks.crash._target_=...`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process once `step` optimiser steps have been taken."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(L.Callback):
    """SIGKILL this process half-way through writing its `save`-th checkpoint file."""

    def __init__(self, save: int = 2):
        self.save, self.saves = save, 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        if self.saves < self.save:
            return
        import torch

        def half_write_then_die(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")  # the start of a zip, then nothing
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_write_then_die  # the process dies inside it, so no restore needed


class LossRecorder(L.Callback):
    """Append `step loss` lines to `path` after every optimiser step (flushed at once, so a
    killed run leaves what it did)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:  # a skipped batch
            return
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(loss)!r}\n")


class KillInJob(L.Callback):
    """SIGKILL the whole multirun once, in job number `job` after `step` steps: the first
    run that gets there leaves `marker` behind, so rerunning the same command goes through."""

    def __init__(self, job: int, step: int, marker: str):
        self.job, self.step, self.marker = job, step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num != self.job or trainer.global_step < self.step:
            return
        if not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def recorded_steps(path: Path) -> list[int]:
    if not path.is_file():
        return []
    return [int(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]


def kill_at_random_after_checkpoint(
    command: list[str], env: dict, cwd: Path, losses: Path, after: int, before: int
) -> int:
    """Start `command` (a herd-train run recording its losses to `losses`), and SIGKILL it from
    outside once it has recorded a step drawn at random in (after, before) -- `after` being
    its first checkpoint's step -- wherever it then is (a step, validation, a checkpoint
    save). Returns the drawn step."""
    target = random.randint(after + 1, before - 1)
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        while proc.poll() is None:
            steps = recorded_steps(losses)
            if steps and steps[-1] >= target:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(f"the run was not killed (exit {proc.returncode}): {err[-2000:]}")
    return target


def herd_train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "herd.train", *args]
