"""Kaggle CSV adapter: "Anime Recommendation Database 2020" (``anime.csv``, ``anime_with_synopsis.csv``,
``animelist.csv``; zipped or not) read into the canonical raw frames, every row accounted for. No Dagster."""

from __future__ import annotations

import csv
import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from animind_assets.lib.data.ids import parse_ids
from animind_assets.lib.data.raw import (
    CATALOG_COLUMNS,
    INTERACTION_COLUMNS,
    QUARANTINE_SCHEMA,
    MAX_EXAMPLES,
    SURROGATE,
    SourceError,
    empty_frame,
    ReadReport,
    record_json,
    printable,
    RawCatalog,
    RawInteractions,
    require_file,
    flag_replacement_characters,
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
    flag_replacement_characters(out, list(mapping), report)
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
        header = [printable(h) or "" for h in header]
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
                        "record": printable(json.dumps(rec, ensure_ascii=False)[:2000]),
                    }
                )
                continue
            row = [rec[i] if i < len(rec) else None for i in pos]
            joined = "\x00".join(v for v in row if v is not None)
            if SURROGATE.search(joined):
                bad_col = next(c for c, v in zip(cols, row) if v is not None and SURROGATE.search(v))
                report.reject("undecodable_text", data_row)
                shown = {c: printable(v) for c, v in zip(cols, row)}
                rejected.append(
                    {
                        "source_row": data_row,
                        "reason": "undecodable_text",
                        "column": bad_col,
                        "value": f"line {start}: {shown[bad_col]}"[:200],
                        "record": record_json(shown),
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
    flag_replacement_characters(frame, cols, report)
    rej = pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA, orient="row") if rejected else empty_frame(QUARANTINE_SCHEMA)
    return CsvTable(frame=frame, rejected=rej, report=report, label=label, lines=lines)


def _resolve_csv(folder_or_file: str | Path, stem: str) -> Path:
    p = Path(folder_or_file).expanduser()
    if p.is_dir():
        for cand in (p / f"{stem}.csv", p / f"{stem}.csv.zip", p / f"{stem}.zip"):
            if cand.exists():
                return cand
        raise SourceError(f"{stem}.csv not found in {p.resolve()} (tried {stem}.csv, {stem}.csv.zip, {stem}.zip)")
    return require_file(p, f"{stem}.csv")


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


