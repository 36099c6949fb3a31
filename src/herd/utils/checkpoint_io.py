"""Checkpoint files that are never half-written.

A checkpoint is written to a temporary file beside its target, flushed to disk, and renamed
over the target in one step: a run killed while saving leaves the previous `last.ckpt`
whole, and a full disk stops the run with one sentence instead of a truncated file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from herd.errors import HerdError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class CheckpointWriteError(HerdError, OSError):
    """A checkpoint could not be written; the previous file at that path is intact."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if exc.errno in DISK_FULL else f"{exc.strerror or exc}"
        kept = "the previous checkpoint there is intact" if path.exists() else "nothing was kept"
        raise CheckpointWriteError(
            f"Could not save checkpoint {path}: {reason}; {kept}. Free space (or set "
            "paths.log_dir elsewhere) and resume with ckpt_path=last."
        ) from exc
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with atomic, fsync'ed writes (trainer plugin)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options.")
        atomic_torch_save(checkpoint, path)
