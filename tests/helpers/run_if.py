"""RunIf: skip a test unless the machine can run it (CUDA, a minimum GPU count, a package)."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def RunIf(min_gpus: int = 0, packages: tuple[str, ...] = ()):  # noqa: N802 - reads like a marker
    reasons = []
    if min_gpus and torch.cuda.device_count() < min_gpus:
        reasons.append(f"needs {min_gpus} CUDA GPU(s)")
    for pkg in packages:
        if importlib.util.find_spec(pkg) is None:
            reasons.append(f"needs the {pkg} package")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))
