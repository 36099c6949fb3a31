"""What every run leaves behind: metrics.json and the HParams entry in TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import resource
import subprocess
from functools import cache
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from herd.errors import ConfigError
from herd.utils.config import sweep_choices, swept_keys

log = logging.getLogger(__name__)

# Config subtrees whose values become HParams columns (with the chosen group options).
HPARAM_SECTIONS = ("model", "data", "trainer", "seed")
# Written after metrics.json as a run's last act: the settings of the run that finished.
FINISHED = "finished.json"
# What makes two runs the same job (a rerun with these equal is skipped when finished);
# the progress bar and the model summary change no result.
JOB_SECTIONS = ("model", "data", "trainer", "seed", "train", "test")
COSMETIC = {"trainer.enable_progress_bar", "trainer.enable_model_summary"}
# Command-line settings that say how to run a job, not what it computes.
SETTINGS_NOT_COMPUTED = COSMETIC | {"auto_resume", "ckpt_path"}


def final_metrics(*metric_dicts) -> dict[str, float]:
    """Merge Lightning metric dicts into flat {stage/name: float} (later dicts win)."""
    merged: dict[str, float] = {}
    for metrics in metric_dicts:
        for key, value in metrics.items():
            if "/" not in key:
                continue
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            if math.isfinite(value):
                merged[key] = value
    return dict(sorted(merged.items()))


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory_gb`'s count afresh (each job of a multirun shares one process)."""
    if device.type == "cuda":
        if torch.cuda.is_initialized():  # before CUDA's first use there is nothing to reset
            torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak counts from the process start


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`, in GB: on CUDA what the caching allocator
    handed out (torch.cuda.max_memory_allocated), elsewhere the process's peak resident set
    size (weights, activations, data and the Python interpreter together)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1e6  # kB
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kB


def write_metrics_json(output_dir: str | Path, metrics: dict[str, float]) -> Path:
    path = Path(output_dir) / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def flatten(value, prefix: str = "") -> dict:
    """A nested dict as {dotted key: leaf value}."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def job_settings(cfg: DictConfig) -> dict:
    """The resolved settings that identify a job, flat {dotted key: value}."""
    plain = {}
    for key in JOB_SECTIONS:
        value = cfg.get(key)
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
        plain[key] = value
    return {k: v for k, v in flatten(plain).items() if k not in COSMETIC}


def mark_finished(output_dir: str | Path, cfg: DictConfig) -> None:
    """Record that the run in output_dir finished (call after metrics.json is written)."""
    path = Path(output_dir) / FINISHED
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": job_settings(cfg)}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def finished_metrics(output_dir: str | Path, cfg: DictConfig) -> dict[str, float] | None:
    """The final metrics of a run that already finished in output_dir with cfg's settings,
    or None when none did. A finished run of other settings is refused, naming them: a
    rerun must neither skip it nor overwrite it."""
    output_dir = Path(output_dir)
    marker, metrics = output_dir / FINISHED, output_dir / "metrics.json"
    if not (marker.is_file() and metrics.is_file()):
        return None
    before = json.loads(marker.read_text()).get("settings", {})
    now = job_settings(cfg)
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if differ:
        listed = ", ".join(f"{k}={before.get(k)!r} there vs {now.get(k)!r}" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ConfigError(
            f"{output_dir} holds a run that finished with other settings: {listed}{more}; "
            "use another hydra.run.dir / hydra.sweep.dir, or continue that run's training "
            "with ckpt_path=last."
        )
    return json.loads(metrics.read_text())


@cache
def git_revision() -> str:
    """The checkout's commit (with `+dirty` for uncommitted changes), or `unknown`."""
    repo = Path(__file__).resolve().parents[3]
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+dirty" if dirty else "")) if rev else "unknown"


def provenance_of(cfg: DictConfig) -> dict:
    """What a checkpoint records about the run that wrote it: the resolved config, the data
    config with its interpolations kept (so herd-eval can rebuild the data at another
    context length), and the git revision."""
    return {
        "config": OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False),
        "data": OmegaConf.to_container(cfg.data, resolve=False) if "data" in cfg else None,
        "git": git_revision(),
    }


def hparams_of(cfg: DictConfig) -> dict:
    """The run's hyper-parameters: its command-line settings (swept ones first), chosen
    config-group options, and the resolved model, data and trainer settings (instantiation
    keys dropped)."""
    params: dict = {}
    if HydraConfig.initialized():
        params.update(command_line_settings())  # first: the HParams tab's leading columns
        choices = HydraConfig.get().runtime.choices
        params.update(
            {f"choice/{k}": str(v) for k, v in choices.items() if not k.startswith("hydra")}
        )
    container = OmegaConf.to_container(cfg, resolve=True)
    for section in HPARAM_SECTIONS:
        if section in container:
            params[section] = container[section]
    return _drop_instantiation_keys(params)


def command_line_settings() -> dict[str, str]:
    """This job's command-line settings, the keys its sweep varies first: the HParams tab's
    leading columns (paths and settings that do not change what is computed left out)."""
    hydra_cfg = HydraConfig.get()
    settings = {}
    for key, values in sweep_choices(list(hydra_cfg.overrides.task)) or []:
        value = values[0].split("=", 1)[1]
        name = key.lstrip("+~")
        if "/" not in value and name not in SETTINGS_NOT_COMPUTED and not name.startswith("hydra"):
            settings[name] = value
    multirun = hydra_cfg.mode == RunMode.MULTIRUN  # the sweep's own listing says what varies
    swept = swept_keys(hydra_cfg.sweep.dir) if multirun else []
    return {k: settings[k] for k in [*swept, *settings] if k in settings}


def _drop_instantiation_keys(value):
    if isinstance(value, dict):
        return {
            k: _drop_instantiation_keys(v)
            for k, v in value.items()
            if k not in ("_target_", "_partial_")
        }
    return value


def log_hparams(loggers, cfg: DictConfig, metrics: dict[str, float], step: int) -> None:
    """One HParams session per run holding the final metrics, so sweeps compare side by side.

    The HParams tab reads metric values from scalars; they are written once more under
    `final/...` so that the training curves themselves get no extra point."""
    headline = sorted(metrics, key=lambda k: (k.split("/")[0] not in ("test", "val"), k))
    final = {f"final/{k}": metrics[k] for k in headline}  # test/ and val/ columns first
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams_of(cfg), metrics=final, step=step)
            logger.experiment.flush()
