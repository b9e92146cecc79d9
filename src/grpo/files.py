"""Writing a file so that a kill or a full disk leaves either the old file or the new one, and never
its temporary file."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write PATH.tmp, then rename it over PATH (atomic); on any failure PATH.tmp is removed again."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding=encoding)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def read_jsonl(path: str | Path) -> list:
    """The records of a JSON-lines file (none when it does not exist); a line that is not whole JSON (the one a
    running or killed writer left cut) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
