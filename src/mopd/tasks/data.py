"""Load task rows from local JSONL or Parquet files and check their fields.

Every task that reads user data goes through `load_rows` and `field_of`, so a bad row is
reported the same way everywhere: `file:line: field 'answer': expected str, got int`.
Nothing is skipped silently; the run refuses to start on the first bad row.

Parquet needs `pyarrow` (lazy import). A `datasets.Dataset` or any sequence of mappings
can be passed instead of a path from the Python API; its rows are numbered from 1.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

__all__ = ["DataError", "Row", "field_of", "load_rows", "split_rows"]

T = TypeVar("T")


class DataError(ValueError):
    """A data file or row that a task cannot use; the message names file, line and field."""


class Row(dict[str, Any]):
    """A record plus where it came from (`source`, 1-based `line`) for error messages."""

    source: str = "<data>"
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def load_rows(data: str | Path | Iterable[Mapping[str, Any]]) -> list[Row]:
    """Rows of a `.jsonl` / `.parquet` file, or of an in-memory dataset (e.g. `datasets.Dataset`)."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        if path.suffix == ".parquet":
            return _parquet_rows(path)
        if path.suffix not in (".jsonl", ".json"):
            raise DataError(f"{path}: unsupported data file type; use .jsonl or .parquet")
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
                rows.append(_row(record, str(path), line_no))
        if not rows:
            raise DataError(f"{path}: the data file holds no rows")
        return rows
    return [_row(record, "<dataset>", i) for i, record in enumerate(data, start=1)]


@overload
def field_of(row: Row, name: str, kind: type[T], *, optional: bool = False) -> T: ...
@overload
def field_of(row: Row, name: str, kind: tuple[type, ...], *, optional: bool = False) -> Any: ...
def field_of(row: Row, name: str, kind: type[T] | tuple[type, ...], *, optional: bool = False) -> T:
    """`row[name]` checked against `kind`; a missing or mistyped field raises `DataError`."""
    if name not in row or row[name] is None:
        if optional:
            return None  # type: ignore[return-value]
        raise DataError(f"{row.where}: field {name!r} is missing (fields: {', '.join(row)})")
    value = row[name]
    # bool is an int in Python; a True where a number belongs is a data mistake.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(
            f"{row.where}: field {name!r}: expected {expected}, got {type(value).__name__}"
        )
    return value  # type: ignore[return-value]


def split_rows(items: Sequence[T], n_eval: int, seed: int) -> tuple[list[T], list[T]]:
    """Seeded disjoint (train, eval) split; eval gets `n_eval` items (0 = none)."""
    if not items:
        raise DataError("the data holds no rows")
    if not 0 <= n_eval < len(items):
        raise DataError(
            f"n_eval must be in 0..{len(items) - 1} for {len(items)} rows (the rest train), "
            f"got {n_eval}"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [x for i, x in enumerate(items) if i not in eval_idx]
    return train, [items[i] for i in sorted(eval_idx)]


def _row(record: Any, source: str, line: int) -> Row:
    if not isinstance(record, Mapping):
        raise DataError(f"{source}:{line}: expected a JSON object, got {type(record).__name__}")
    row = Row(record)
    row.source, row.line = source, line
    return row


def _parquet_rows(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    table = pq.read_table(path)
    return [_row(record, str(path), i) for i, record in enumerate(table.to_pylist(), start=1)]
