"""JSONL manifests: one JSON object per line, read the same way for every modality."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from herd.errors import DataError

log = logging.getLogger(__name__)
Item = TypeVar("Item")


def read_jsonl_manifest(
    path: str | Path,
    parse: Callable[[dict, Path], Item],
    skip_bad: bool = False,
    what: str = "samples",
) -> list[tuple[Item, int]]:
    """(item, line number) for every line of the manifest at `path`.

    `parse(record, manifest_dir)` turns a line's object into an item, raising ValueError or
    OSError (or RuntimeError, as audio decoders do) for a bad one. A bad line raises
    DataError("MANIFEST, line N: reason."), or with `skip_bad` is skipped and counted in a
    warning. Blank lines are ignored; each line is decoded on its own, so one undecodable
    line is reported (or skipped) like any other.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Manifest {path} does not exist.")
    items, skipped = [], 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("expected a JSON object")
                items.append((parse(record, path.parent), lineno))
            except (ValueError, OSError, RuntimeError) as exc:  # JSON, fields, files
                if not skip_bad:
                    reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                    raise DataError(f"{path}, line {lineno}: {reason.rstrip('.')}.") from exc
                skipped += 1
    if skipped:
        log.warning("Skipped %d bad line(s) of %s (data.skip_bad_samples=true).", skipped, path)
    if not items:
        raise DataError(f"Manifest {path} holds no usable {what}.")
    return items
