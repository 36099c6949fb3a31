"""The one rule that assigns content to train/val/test when no split is given: a hash of
the content itself, so an item lands in the same split on every machine, in every run and
in every stage (a phrase held out of the fusion stage is held out of the language stage)."""

from __future__ import annotations

import zlib

SPLITS = ("train", "val", "test")


def hash_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """The split of `key`: "test" for the first `test_fraction` of the crc32 range, "val"
    for the next `val_fraction`, "train" for the rest."""
    u = zlib.crc32(key.encode("utf-8")) / 2**32
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


__all__ = ["SPLITS", "hash_split"]
