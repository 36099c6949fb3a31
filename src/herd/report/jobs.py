"""Collecting a sweep's jobs: each job directory's overrides, config, metrics and seed;
the jobs a sweep listed but never started; the override keys that vary."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import yaml

from herd.utils.config import sweep_choices

# The override key that names a repetition, not a setting.
SEED_KEY = "seed"
# A log line worth quoting for a failed job.
ERROR_LINE = re.compile(r"herd: error:|Error")


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """`key=value` override strings as {key: value}; `+`/`++` prefixes dropped, deletions
    (`~key`) and bare flags ignored."""
    settings = {}
    for override in overrides or []:
        if "=" not in override or override.startswith("~"):
            continue
        key, value = override.split("=", 1)
        settings[key.lstrip("+")] = value
    return settings


def read_yaml(path: Path):
    """A YAML file's content, or None when the file is missing or unreadable."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def error_line(job_dir: Path) -> str | None:
    """The last line of the job's `*.log` files that reports an error, or None."""
    found = None
    for log_file in sorted(job_dir.glob("*.log")):
        try:
            lines = log_file.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if ERROR_LINE.search(line):
                found = line.strip()
    return found


def read_job(root: Path, job_dir: Path) -> dict:
    """One job: its directory (relative to root), overrides, resolved config, metrics (None
    when metrics.json is missing or unreadable) and seed."""
    overrides = parse_overrides(read_yaml(job_dir / ".hydra" / "overrides.yaml") or [])
    config = read_yaml(job_dir / ".hydra" / "config.yaml") or {}
    metrics = None
    metrics_file = job_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = {k: float(v) for k, v in json.loads(metrics_file.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            metrics = None
    seed = overrides.get(SEED_KEY, config.get(SEED_KEY) if isinstance(config, dict) else None)
    return {
        "name": str(job_dir.relative_to(root)) if job_dir != root else ".",
        "dir": job_dir,
        "overrides": overrides,
        "config": config if isinstance(config, dict) else {},
        "metrics": metrics,
        "seed": seed,
    }


def find_jobs(root: Path) -> list[dict]:
    """Every job directory below root (a directory holding `.hydra/`), in path order."""
    job_dirs = sorted({hydra_dir.parent for hydra_dir in root.rglob(".hydra")})
    return [read_job(root, job_dir) for job_dir in job_dirs]


def never_started(root: Path, jobs: list[dict]) -> list[str]:
    """The jobs that root's multirun.yaml lists but that have no directory: a sweep cut short.

    Only Hydra's basic sweeper enumerates its jobs in advance (the job number starts the
    subdir); for other sweepers (Optuna) nothing is reported here."""
    multirun = read_yaml(root / "multirun.yaml")
    hydra_cfg = (multirun or {}).get("hydra") or {}
    sweeper = str((hydra_cfg.get("sweeper") or {}).get("_target_", ""))
    subdir = str(hydra_cfg.get("sweep", {}).get("subdir") or "${hydra.job.num}")
    if not sweeper.endswith("BasicSweeper") or not subdir.startswith(
        ("${hydra.job.num}", "${herd_job_name:${hydra.job.num}")
    ):
        return []
    task = list((hydra_cfg.get("overrides") or {}).get("task") or [])
    task += [f"{k}={v}" for k, v in ((hydra_cfg.get("sweeper") or {}).get("params") or {}).items()]
    choices = sweep_choices(task)
    if choices is None:  # an unparsable listing must not stop the report
        return []
    # the basic sweeper's order: the cartesian product of the overrides, as written
    planned = list(itertools.product(*(values for _, values in choices)))
    present = {job["name"].split("_", 1)[0] for job in jobs}  # "3" or "3_context=2k,..."
    return [
        f"{num} ({' '.join(overrides)})"
        for num, overrides in enumerate(planned)
        if str(num) not in present
    ]


def swept_keys(jobs: list[dict]) -> list[str]:
    """The override keys whose values differ between jobs (or are absent in some), in the
    order they first appear; the seed is a repetition, not a setting."""
    keys = list(dict.fromkeys(k for job in jobs for k in job["overrides"]))
    return [
        key
        for key in keys
        if key != SEED_KEY and len({job["overrides"].get(key) for job in jobs}) > 1
    ]
