"""Entry-point glue: expected errors become one line on stderr and exit status 1."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from herd.errors import HerdError


def _herd_error(exc: BaseException | None) -> HerdError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:  # Hydra wraps errors raised in instantiate
        if isinstance(exc, HerdError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _path_error(exc: BaseException | None) -> OSError | None:
    """An operating-system error about a file or directory (it names the path), however
    deeply wrapped."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.filename is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def path_message(exc: OSError) -> str:
    """`PATH: reason` in one line, e.g. `/data/logs: Permission denied`."""
    reason = exc.strerror or type(exc).__name__
    other = f" -> {exc.filename2}" if exc.filename2 else ""
    return f"{exc.filename}{other}: {reason}; check that the path exists and is writable."


def expected_error(exc: BaseException) -> str | None:
    """The one line to show for an error the user can fix (a HerdError, or an OS error
    naming a path, however deeply wrapped); None for a bug, whose traceback should show.
    Every herd command reports through this (`report_errors`, herd-export, herd-report)."""
    error = _herd_error(exc)
    if error is not None:
        return str(error)
    os_error = _path_error(exc)
    return None if os_error is None else path_message(os_error)


def print_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def report_error(prog: str, exc: Exception) -> int:
    """In a command's `except`: an error the user can fix becomes one line `{prog}: error:
    ...` and exit status 1; anything else is a bug and is raised again, traceback and all."""
    message = expected_error(exc)
    if message is None:
        raise exc
    print_error(prog, message)
    return 1


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_library_noise() -> None:
    """Silence messages users can do nothing about: Lightning's product tip and a
    deprecation inside Lightning's own pytree helper."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def report_errors(task):
    """Decorate a Hydra task: print a HerdError as `herd: error: ...` and exit 1.
    With HYDRA_FULL_ERROR=1 the full traceback is shown instead."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        quiet_library_noise()
        try:
            return task(*args, **kwargs)
        except Exception as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            sys.exit(report_error("herd", exc))

    return wrapper


class RunDirectories(Callback):
    """Hydra callback: create the run (or sweep) directory before Hydra does, so a log
    directory that cannot be created is one line naming it, not Hydra's traceback."""

    def _make(self, path: str, what: str) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print_error(
                "herd",
                f"cannot create the {what} {path} ({exc.strerror or exc}); set HERD_LOG_DIR "
                f"(or hydra.{what.split()[0]}.dir) to a writable directory.",
            )
            sys.exit(1)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._make(config.hydra.run.dir, "run directory")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._make(config.hydra.sweep.dir, "sweep directory")
