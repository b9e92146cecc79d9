"""Prompt files: .jsonl (one JSON object a line) or .parquet, with a prompt column and any others."""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the column."""


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file: {e}") from None
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {line_no} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {line_no} must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def check_rows(rows: list[dict], path: str, needed: list[str]) -> None:
    """Every row has every needed column (prompt plus what the reward functions take)."""
    if not rows:
        raise DataError(f"{path}: no rows")
    for i, row in enumerate(rows, start=1):
        for column in needed:
            if column not in row or row[column] is None:
                raise DataError(
                    f"{path}: row {i} has no {column!r} column (columns: {', '.join(sorted(row))}); "
                    f"every row needs: {', '.join(needed)}"
                )
