"""Entry-point glue: expected errors become one line on stderr and exit status 1."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

from herd.errors import HerdError


def _herd_error(exc: BaseException | None) -> HerdError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:  # Hydra wraps errors raised in instantiate
        if isinstance(exc, HerdError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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
            error = _herd_error(exc)
            if error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"herd: error: {error}", file=sys.stderr)
            sys.exit(1)

    return wrapper
