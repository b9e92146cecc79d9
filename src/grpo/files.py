"""Writing a file so that a kill or a full disk leaves either the old file or the new one, and never
its temporary file."""

from __future__ import annotations

import contextlib
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
