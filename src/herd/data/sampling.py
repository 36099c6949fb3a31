"""A training-order sampler whose position is a function of the step alone, so a run
killed anywhere (mid-epoch included) resumes on exactly the batches it would have seen."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    """An endless stream of dataset indices: pass e draws a fresh permutation seeded by
    (seed, e). `start` is the number of samples (over all ranks) already consumed; each of
    `world_size` ranks takes every world_size-th index of the stream, from its `rank`.

    It has no length (training is measured in steps, not epochs); Lightning's own
    distributed sampler must be off (`trainer.use_distributed_sampler=false`), since the
    sharding happens here."""

    def __init__(
        self, size: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1
    ):
        if size < 1:
            raise ValueError("ResumableShuffleSampler needs a non-empty dataset.")
        self.size, self.seed, self.start = size, seed, start
        self.rank, self.world_size = rank, world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        position = self.start + self.rank
        epoch, offset = divmod(position, self.size)
        order = self._permutation(epoch)
        while True:
            yield int(order[offset])
            offset += self.world_size
            while offset >= self.size:
                offset -= self.size
                epoch += 1
                order = self._permutation(epoch)


def resumable_train_sampler(datamodule, size: int, batch_size: int) -> ResumableShuffleSampler:
    """The sampler for `datamodule`'s training loader, positioned after the batches its
    trainer has already stepped through (0 outside a trainer)."""
    trainer = datamodule.trainer
    seed = int(datamodule.hparams.get("seed", 0))
    if trainer is None:
        return ResumableShuffleSampler(size, seed)
    world = trainer.world_size
    consumed = trainer.global_step * trainer.accumulate_grad_batches * batch_size * world
    return ResumableShuffleSampler(size, seed, consumed, trainer.global_rank, world)
