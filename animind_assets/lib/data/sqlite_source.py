"""SQLite adapter: an AniMind dataset-builder file (tables ``anime``, ``users``, ``user_anime``) read into the
canonical raw frames, every row accounted for. No Dagster."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import polars as pl

from animind_assets.lib.data.raw import (
    CATALOG_COLUMNS,
    QUARANTINE_SCHEMA,
    SourceError,
    empty_frame,
    ReadReport,
    record_json,
    RawCatalog,
    RawInteractions,
    require_file,
    require_columns,
    flag_replacement_characters,
)

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
                {"source_row": i, "reason": "undecodable_text", "column": bad_col, "value": row[bad_col], "record": record_json(row)}
            )
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"{path}: table {table!r} could not be read ({exc})") from exc
    frame = pl.DataFrame(kept_rows, schema={dst: pl.Utf8 for dst in mapping}, orient="row")
    frame = frame.with_columns(pl.Series("source_row", kept_index, dtype=pl.Int64)).select(["source_row", *cols])
    report.rows_read = len(kept_rows) + len(rejected)
    report.rows_kept = len(kept_rows)
    flag_replacement_characters(frame, cols, report)
    rej = pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA, orient="row") if rejected else empty_frame(QUARANTINE_SCHEMA)
    return frame, rej, report


def read_sqlite_catalog(path: str | Path) -> RawCatalog:
    """Table ``anime`` of an AniMind SQLite file -> ``RawCatalog`` (every value as text).

    Raises ``SourceError`` naming the file (and table/columns) when the file is missing, not an SQLite
    database, or lacks the table/columns. Rows with undecodable text are in ``rejected``.
    """
    p = require_file(path, "AniMind SQLite database")
    with contextlib.closing(_sqlite_connect(p)) as conn:
        cols = _sqlite_columns(conn, "anime", p)
        require_columns(cols, list(_SQLITE_ANIME.values()), "anime", p)
        frame, rejected, report = _sqlite_text_frame(conn, "anime", _SQLITE_ANIME, p)
    return RawCatalog(frame=frame, origin=f"{p} (table anime)", rejected=rejected, reports=[report])


def read_sqlite_interactions(path: str | Path) -> RawInteractions:
    """Table ``user_anime`` of an AniMind SQLite file -> ``RawInteractions`` (see ``read_sqlite_catalog``)."""
    p = require_file(path, "AniMind SQLite database")
    with contextlib.closing(_sqlite_connect(p)) as conn:
        cols = _sqlite_columns(conn, "user_anime", p)
        require_columns(cols, list(_SQLITE_USER_ANIME.values()), "user_anime", p)
        frame, rejected, report = _sqlite_text_frame(conn, "user_anime", _SQLITE_USER_ANIME, p)
        has_ts = "updated_at" in cols
    return RawInteractions(
        frame=frame, origin=f"{p} (table user_anime)", has_timestamps=has_ts, rejected=rejected, reports=[report]
    )


