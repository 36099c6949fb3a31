"""A training-order sampler whose position is a function of the step alone, so a run
killed anywhere (mid-epoch included) resumes on exactly the batches it would have seen.

The samplers yield `Draw`s: dataset indices that also carry their place in the training
stream, from which a dataset seeds its per-sample randomness (herd.utils.rng.sample_rng)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class Draw(int):
    """A dataset index (it is the int) with `key`, its place in the training stream over all
    ranks: per-sample randomness seeded by (seed, key) is the same in any worker, with any
    number of workers, and after a resume, and differs between passes over the data."""

    key: int

    def __new__(cls, index: int, key: int) -> Draw:
        draw = super().__new__(cls, index)
        draw.key = key
        return draw

    def __reduce__(self):  # DataLoader workers receive their indices pickled
        return (Draw, (int(self), self.key))


def draw_key(index: int) -> int:
    """The randomness key of a dataset index: its stream place for a Draw, else the index
    (a plain loader, e.g. samples for TensorBoard, gets a fixed draw per item)."""
    return getattr(index, "key", index)


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
            yield Draw(int(order[offset]), epoch * self.size + offset)
            offset += self.world_size
            while offset >= self.size:
                offset -= self.size
                epoch += 1
                order = self._permutation(epoch)


def _train_position(datamodule, items_per_step: int) -> tuple[int, int, int, int]:
    """(seed, items over all ranks already consumed, rank, world size) for `datamodule`'s
    training loader: its trainer's step times `items_per_step` per rank (0 outside a trainer)."""
    trainer, seed = datamodule.trainer, int(datamodule.hparams.get("seed", 0))
    if trainer is None:
        return seed, 0, 0, 1
    world = trainer.world_size
    consumed = trainer.global_step * trainer.accumulate_grad_batches * items_per_step * world
    return seed, consumed, trainer.global_rank, world


def resumable_train_sampler(datamodule, size: int, batch_size: int) -> ResumableShuffleSampler:
    """The sampler for `datamodule`'s training loader, positioned after the batches its
    trainer has already stepped through (0 outside a trainer)."""
    return ResumableShuffleSampler(size, *_train_position(datamodule, batch_size))


class LengthBucketBatches(Sampler[list[int]]):
    """An endless stream of training batches of similar-length clips, so little compute goes
    into padding.

    Each pass: shuffle, cut into pools of `pool_batches` batches, sort each pool by length
    (rounded down to a multiple of `bucket_width`; the sort is stable, so samples within one
    bucket stay in random order), cut it into batches, and shuffle the batches;
    deterministic in (seed, pass). `start` is the number of batches (over all ranks) already
    consumed, so a resumed run continues on exactly the batches it would have seen; rank r
    of `world_size` takes every world_size-th batch from r. `lead_in` batches, if given,
    come first, as they are (a curriculum: e.g. one task alone before the mixture); their
    draws carry negative keys, apart from the stream's."""

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int = 0,
        pool_batches: int = 8,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        bucket_width: int = 1,
        lead_in: list[list[int]] | None = None,
    ):
        self.lead_in = lead_in or []
        self.lengths = [n // bucket_width for n in lengths]
        self.batch_size = batch_size
        self.seed, self.pool = seed, batch_size * pool_batches
        self.start, self.rank, self.world_size = start, rank, world_size

    def batches_of_pass(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=self.lengths.__getitem__)
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        # a short last batch would be a noisy step; drop it while there are others
        batches = [b for b in batches if len(b) == self.batch_size] or batches
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        position = self.start + self.rank
        while position < len(self.lead_in):
            first = position * self.batch_size
            yield [Draw(i, -1 - first - j) for j, i in enumerate(self.lead_in[position])]
            position += self.world_size
        batches = self.batches_of_pass(0)  # every pass has as many batches
        epoch, offset = divmod(position - len(self.lead_in), len(batches))
        if epoch:
            batches = self.batches_of_pass(epoch)
        while True:
            first = (epoch * len(batches) + offset) * self.batch_size
            yield [Draw(index, first + j) for j, index in enumerate(batches[offset])]
            offset += self.world_size
            while offset >= len(batches):
                offset -= len(batches)
                epoch += 1
                batches = self.batches_of_pass(epoch)


def length_bucket_train_batches(
    datamodule,
    lengths: list[int],
    batch_size: int,
    pool_batches: int = 8,
    bucket_width: int = 1,
    lead_in: list[list[int]] | None = None,
) -> LengthBucketBatches:
    """LengthBucketBatches for `datamodule`'s training loader, positioned after the batches
    its trainer has already stepped through (0 outside a trainer)."""
    seed, start, rank, world = _train_position(datamodule, 1)
    return LengthBucketBatches(
        lengths, batch_size, seed, pool_batches, start, rank, world, bucket_width, lead_in
    )
