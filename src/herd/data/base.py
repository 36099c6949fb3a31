"""What every stage's DataModule shares: the check of `data.source`, one DataLoader builder,
the validation and test loaders, and the trivial-baseline hook.

A subclass fills `self.datasets` {split: Dataset} in `setup()`, writes its own
`train_dataloader()` (samplers differ: resumable, length-bucketed, staged context) and
overrides `collate_fn` when its samples need one, and `reference_metrics()`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import lightning as L
from torch.utils.data import DataLoader, Dataset

from herd.errors import ConfigError


def check_source(
    source: str,
    known: Collection[str],
    path: str | None,
    needs_path: Collection[str] = ("manifest",),
    path_key: str = "manifest",
    path_kind: str = "a JSONL file",
) -> None:
    """Refuse an unknown `data.source`, or one that reads a file or folder without its path."""
    if source not in known:
        raise ConfigError(f"data.source={source!r} is unknown; use one of {list(known)}.")
    if source in needs_path and not path:
        raise ConfigError(f"data.source={source} needs data.{path_key}=PATH to {path_kind}.")


class HerdDataModule(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.datasets: dict[str, Dataset] = {}

    def collate_fn(self) -> Callable | None:
        """The batch function of the loaders (None: torch's default)."""
        return None

    def loader(self, split: str, **kwargs) -> DataLoader:
        """A loader over `split` with the module's batch size, workers and collate function;
        `kwargs` add a sampler, a batch_sampler (then no batch size) or drop_last."""
        workers = self.hparams.num_workers
        if "batch_sampler" not in kwargs:
            kwargs.setdefault("batch_size", self.hparams.batch_size)
        return DataLoader(
            self.datasets[split],
            collate_fn=self.collate_fn(),
            num_workers=workers,
            persistent_workers=workers > 0,
            **kwargs,
        )

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        # a source without a test split (a small folder, a corpus) is tested on val
        test = self.datasets.get("test")
        return self.loader("test" if test is not None and len(test) else "val")

    def reference_metrics(self) -> dict[str, float]:
        """Trivial baselines, written to metrics.json beside the trained model's figures."""
        return {}


__all__ = ["HerdDataModule", "check_source"]
