from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from herd.train import CONFIG_DIR

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


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path):
    """Compose a config as the entry points would, with Hydra's runtime pointing at output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent)
        del cfg.hydra
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


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
