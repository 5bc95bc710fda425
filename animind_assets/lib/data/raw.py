"""Canonical raw source frames (``RawCatalog``, ``RawInteractions``), the read report that accounts for every
row, and the source errors. Shared by every adapter (SQLite, Kaggle CSV, demo, Amazon). No Dagster."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from animind_assets.lib.common.fingerprint import frame_fingerprint

CATALOG_COLUMNS = [
    "anime_id",
    "name",
    "english_name",
    "score",
    "genres",
    "synopsis",
    "type",
    "episodes",
    "premiered",
    "studios",
    "source",
    "rating",
    "members",
]
INTERACTION_COLUMNS = ["user_id", "anime_id", "score", "watching_status", "watched_episodes"]
# One row per quarantined source row: its 1-based data row, why, the column and value at fault, the row as JSON.
QUARANTINE_SCHEMA = {"source_row": pl.Int64, "reason": pl.Utf8, "column": pl.Utf8, "value": pl.Utf8, "record": pl.Utf8}
MAX_EXAMPLES = 20
REPLACEMENT_CHARACTER = "\ufffd"
SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, as decoded with errors="surrogateescape"


class SourceError(ValueError):
    """Bad source input: the message names the file, table, column and row where known."""


class EmptyResultError(SourceError):
    """A step would publish 0 rows: raised *before* anything is written, with the counts by reason."""


def empty_frame(schema: dict) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass
class ReadReport:
    """What a reader did with every row of one file or table.

    ``rows_read = rows_kept + sum(rejected.values())`` always holds. ``rejected``: rows quarantined at read
    time by reason (e.g. ``undecodable_text``, ``too_many_fields``, ``csv_error``); ``values``: values in kept
    rows that were flagged or set to null, as ``"column:reason"`` (e.g. ``name:replacement_character``,
    ``watched_episodes:missing_field``); ``notes``: other counts (``blank_lines``; for a join:
    ``unmatched``, ``duplicate_id``, ``conflicting_duplicate_id``, ``invalid_id:<problem>``). ``examples``
    maps every key of the three dicts to its first ``MAX_EXAMPLES`` row (or line) numbers.
    """

    source: str
    unit: str = "row"  # what the example numbers are: "row" (1-based data row) or "line"
    rows_read: int = 0
    rows_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    values: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)

    def _add(self, bucket: dict[str, int], key: str, where: int | None, n: int = 1) -> None:
        bucket[key] = bucket.get(key, 0) + n
        if where is not None:
            ex = self.examples.setdefault(key, [])
            if len(ex) < MAX_EXAMPLES:
                ex.append(int(where))

    def reject(self, reason: str, where: int | None) -> None:
        self._add(self.rejected, reason, where)

    def value(self, key: str, where: int | None) -> None:
        self._add(self.values, key, where)

    def note(self, key: str, where: int | None = None, n: int = 1) -> None:
        self._add(self.notes, key, where, n)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> str:
        def fmt(d: dict[str, int]) -> str:
            return ", ".join(
                f"{k} {v}" + (f" ({self.unit}s {', '.join(map(str, self.examples[k][:5]))})" if self.examples.get(k) else "")
                for k, v in sorted(d.items())
            )

        text = f"{self.source}: {self.rows_read} rows read, {self.rows_kept} kept"
        if self.rejected:
            text += f", {self.rows_rejected} quarantined [{fmt(self.rejected)}]"
        if self.values:
            text += f"; values flagged [{fmt(self.values)}]"
        if self.notes:
            text += f"; notes [{fmt(self.notes)}]"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "unit": self.unit,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rejected": dict(self.rejected),
            "values": dict(self.values),
            "notes": dict(self.notes),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }


def record_json(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "source_row"}, ensure_ascii=False, default=str)[:2000]


def printable(value: Any) -> str | None:
    """A value as text for a quarantine record: undecodable bytes shown as ``\\xNN``."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    text = str(value)
    if SURROGATE.search(text):
        text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    return text


@dataclass
class RawCatalog:
    frame: pl.DataFrame  # CATALOG_COLUMNS (Utf8) + source_row
    origin: str  # human readable "file (table)"
    simulated: bool = False
    notes: dict = field(default_factory=dict)
    rejected: pl.DataFrame = field(default_factory=lambda: empty_frame(QUARANTINE_SCHEMA))  # rows quarantined at read
    reports: list[ReadReport] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        """Data rows in the source table (kept in ``frame`` + quarantined at read in ``rejected``)."""
        return self.frame.height + self.rejected.height

    def fingerprint(self) -> str:
        return frame_fingerprint(self.frame.drop("source_row"), sort_by="anime_id")


@dataclass
class RawInteractions:
    frame: pl.DataFrame  # INTERACTION_COLUMNS (Utf8) + source_row
    origin: str
    simulated: bool = False
    has_timestamps: bool = False
    notes: dict = field(default_factory=dict)
    rejected: pl.DataFrame = field(default_factory=lambda: empty_frame(QUARANTINE_SCHEMA))
    reports: list[ReadReport] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return self.frame.height + self.rejected.height

    def fingerprint(self) -> str:
        return frame_fingerprint(self.frame.drop("source_row"))


def require_rows(n_rows: int, what: str, origin: str) -> None:
    """Raise ``EmptyResultError("<what>: source has 0 rows (<origin>)")`` when a source holds no data row."""
    if n_rows == 0:
        raise EmptyResultError(f"{what}: source has 0 rows ({origin}); nothing was written, the previous table and export are kept")


def require_kept(kept: int, read: int, dropped_by_reason: dict[str, int], what: str, origin: str = "") -> None:
    """Raise ``EmptyResultError("<what>: 0 of N rows kept (reason n, ...)")`` when a step keeps no row."""
    if kept == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(dropped_by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
        where = f" from {origin}" if origin else ""
        hint = ""
        if dropped_by_reason and max(dropped_by_reason, key=dropped_by_reason.get) == "adult_excluded":
            hint = " (to keep adult titles set anime_prep's include_adult: true)"
        raise EmptyResultError(
            f"{what}: 0 of {read} rows kept ({reasons or 'no reason recorded'}){where}; "
            f"nothing was written, the previous table and export are kept{hint}"
        )


def require_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"{what} not found: {p.resolve()} (no such file)")
    if not p.is_file():
        raise SourceError(f"{what} is not a file: {p.resolve()}")
    return p


def require_columns(found: list[str], required: list[str], table: str, path: Path | str) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise SourceError(
            f"{path}: table {table!r} is missing column(s) {missing}; found columns: {found}"
        )


def flag_replacement_characters(frame: pl.DataFrame, columns: list[str], report: ReadReport) -> None:
    """Count kept values holding U+FFFD (text damaged by an earlier lossy decode), with their rows."""
    for col in columns:
        if frame.schema.get(col) != pl.Utf8:
            continue
        hit = frame.filter(pl.col(col).str.contains(REPLACEMENT_CHARACTER, literal=True).fill_null(False))
        if hit.height:
            report._add(report.values, f"{col}:replacement_character", None, hit.height)
            report.examples.setdefault(f"{col}:replacement_character", []).extend(hit["source_row"].head(MAX_EXAMPLES).to_list())


