from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from herd.train import compose_config as compose_cfg  # noqa: F401 (the tests import it from here)

REPO = Path(__file__).resolve().parents[1]

# Small and quick: a tiny decoder on the pydoc corpus, a handful of steps, no progress bars.
FAST = [
    "model.llama.flavor=tiny",
    "data.source=pydoc",
    "data.batch_size=4",
    "trainer.enable_progress_bar=false",
    "callbacks.model_summary=null",
]


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def train_cfg(tmp_path):
    def make(*overrides: str):
        return compose_cfg("train", [*FAST, *overrides], tmp_path / "run")

    yield make
    GlobalHydra.instance().clear()


def run_cli(
    module: str, *args: str, log_dir: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, in a fresh process."""
    env = {**os.environ, "HERD_LOG_DIR": str(log_dir), "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
