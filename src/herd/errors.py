"""Errors a user can fix. The entry points print these as one line and exit non-zero;
set HYDRA_FULL_ERROR=1 to see the traceback instead."""


class HerdError(Exception):
    """Base class for expected, user-fixable errors."""


class ConfigError(HerdError, ValueError):
    """An option, or a combination of options, that cannot run (names the option and a fix)."""


class DataError(HerdError, ValueError):
    """A data file or sample that cannot be used (names the file and, where known, the line)."""
