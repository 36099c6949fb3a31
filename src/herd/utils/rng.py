"""Random state a resumed run can bring back exactly.

Two kinds of randomness run in training:
- per-sample randomness of the data (augmentation, speed perturbation): drawn from a
  generator seeded by (seed, the sample's place in the training stream) alone, so it is the
  same in any DataLoader worker, with any number of workers, and after a resume;
- the process's global generators (dropout, SpecAugment, anything a model or callback draws):
  captured with `global_rng_state` and put back with `set_global_rng_state`
  (see herd.callbacks.ExactResume, which checkpoints them).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def sample_seed(seed: int, key: int) -> int:
    """A 63-bit seed for sample `key` of a run seeded `seed`; nearby keys and seeds give
    unrelated seeds (a hash, not a sum, so seed 1 / key 2 and seed 2 / key 1 differ)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(key)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_rng(seed: int, key: int) -> random.Random:
    """A Python generator for sample `key` (see `sample_seed`)."""
    return random.Random(sample_seed(seed, key))


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run a block on torch's CPU generator seeded with `seed`, then give the caller's
    generator back untouched (for library code that draws from the global generator, e.g.
    torchvision's random transforms)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def global_rng_state() -> dict:
    """Torch CPU (and CUDA, when initialised), NumPy and Python `random` states, as plain
    tensors and containers (checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": _python_state(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        # another device count: the devices both runs have get their state back
        for device, device_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def _python_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
