"""Issue 12, data readers: every bad input ends in the right value or a clear error.

Three layers:
* the one exact id parser (``lib/data/ids.py``);
* our own bad inputs of every kind, built in a temp folder (always run);
* the failing inputs in ``../shared/cases`` (README there), each with its right result (skipped when the
  folder is absent).
Every reader test also checks the accounting: rows read = rows kept + rows quarantined.
"""

from __future__ import annotations

import gzip
import json
import re
import sqlite3
import zipfile
from decimal import Decimal
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from animind_assets.lib.data import prep, sources
from animind_assets.lib.data.amazon import load_raw_amazon
from animind_assets.lib.data.amazon_records import parse_record, read_records
from animind_assets.lib.data.amazon_split import load_prepared_split
from animind_assets.lib.data.ids import parse_id, parse_ids
from animind_assets.lib.data.sources import EmptyResultError, SourceError

from animind_assets_tests.conftest import ANIME_HEADER, CATALOG, write_kaggle, write_sqlite

ANIMELIST_HEADER = "user_id,anime_id,rating,watching_status,watched_episodes"


def _accounted(res: prep.CleanResult) -> None:
    assert res.input_rows == res.frame.height + res.quarantine.height
    assert sum(res.dropped_by_reason.values()) == res.quarantine.height


def _clean_source(cat: sources.RawCatalog, inter: sources.RawInteractions | None = None):
    ra = prep.clean_anime(cat)
    _accounted(ra)
    if inter is None:
        return ra, None
    known = prep.catalog_ids(cat)
    ri = prep.clean_interactions(inter, known, known - set(ra.frame["anime_id"].to_list()))
    _accounted(ri)
    return ra, ri


# ------------------------------------------------------------------------------------------ id parser
@pytest.mark.parametrize(
    "value, expected",
    [
        ("1", (1, None)),
        (" 5", (5, None)),
        ("+7", (7, None)),
        ("-3", (-3, None)),
        ("1.0", (1, None)),
        ("12.000", (12, None)),
        ("1e3", (1000, None)),
        ("1.0e+15", (10**15, None)),  # SQLite's CAST(REAL AS TEXT) spelling
        ("9223372036854775807", (2**63 - 1, None)),
        (1.0, (1, None)),
        (Decimal("5.0"), (5, None)),
        (7, (7, None)),
        ("9223372036854775808", (None, "out_of_range")),
        ("1.0e+20", (None, "out_of_range")),
        (1e20, (None, "out_of_range")),
        ("1e999999999", (None, "out_of_range")),
        ("inf", (None, "not_finite")),
        ("-Infinity", (None, "not_finite")),
        ("NaN", (None, "not_finite")),
        (float("nan"), (None, "not_finite")),
        ("2.5", (None, "not_integral")),
        (2.5, (None, "not_integral")),
        ("1e-3", (None, "not_integral")),
        ("abc", (None, "not_a_number")),
        ("1,000", (None, "not_a_number")),
        ("1_000", (None, "not_a_number")),
        ("0x10", (None, "not_a_number")),
        (True, (None, "not_a_number")),
        ("", (None, "missing")),
        ("   ", (None, "missing")),
        (None, (None, "missing")),
    ],
)
def test_parse_id_is_exact(value, expected):
    assert parse_id(value) == expected


def test_parse_ids_vectorised_matches_scalar_and_never_uses_floats():
    values = ["1", " 5", "abc", None, "1.0", "2.5", "1e20", "9007199254740993", "9007199254740993.0"]
    ids, problems = parse_ids(pl.Series("x", values))
    assert list(zip(ids.to_list(), problems.to_list())) == [parse_id(v) for v in values]
    # 2**53 + 1 is not representable in float64: an exact parser keeps it
    assert ids[7] == ids[8] == 9007199254740993
    assert parse_ids(pl.Series("x", [1.0, 2.5]))[1].to_list() == [None, "not_integral"]


# ------------------------------------------------------------------------- own cases: SQLite adapter
def _sqlite_with(tmp_path: Path, anime_rows: list[tuple], user_rows: list[tuple], anime_id_type: str = "INTEGER") -> Path:
    db = tmp_path / "case.sqlite"
    conn = sqlite3.connect(db)
    conn.execute(
        f"CREATE TABLE anime(anime_id {anime_id_type}, name TEXT, english_name TEXT, score REAL, genres TEXT, synopsis TEXT,"
        " type TEXT, episodes INTEGER, premiered TEXT, studios TEXT, source TEXT, rating TEXT, members INTEGER)"
    )
    conn.execute("CREATE TABLE user_anime(user_id, anime_id, score, watching_status, watched_episodes)")
    for r in anime_rows:
        conn.execute("INSERT INTO anime VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", r)
    for r in user_rows:
        conn.execute("INSERT INTO user_anime VALUES (?,?,?,?,?)", r)
    conn.commit()
    conn.close()
    return db


def _anime(aid, name="Title", rating="PG-13 - Teens 13 or older", genres="Action"):
    return (aid, name, None, 7.5, genres, "A story.", "TV", 12, "Spring 2001", "Sunrise", "Original", rating, 1000)


def test_sqlite_real_and_textual_ids_are_one_id(tmp_path):
    db = _sqlite_with(
        tmp_path,
        [_anime(1.0, "A"), _anime(2.0, "B"), _anime(3.0, "C")],
        [(10, 1, 8, 2, 12), (10, 2, 7, 2, 12), ("11", "3.0", "9", "2", "12"), (" 12", "+1", 5, 2, 1), (13, "1e0", 5, 2, 1)],
        anime_id_type="REAL",
    )
    ra, ri = _clean_source(sources.read_sqlite_catalog(db), sources.read_sqlite_interactions(db))
    assert ra.frame["anime_id"].to_list() == [1, 2, 3]
    assert ri.quarantine.height == 0 and ri.frame.height == 5
    assert sorted(ri.frame["user_id"].unique().to_list()) == [10, 11, 12, 13]


def test_sqlite_bad_ids_quarantined_with_reason_never_crash(tmp_path):
    db = _sqlite_with(
        tmp_path,
        [_anime(1, "A"), _anime(1e20, "Huge"), _anime("inf", "Inf"), _anime("NaN", "Nan"), _anime("abc", "Abc"), _anime(2.5, "Half"), _anime(1, "Again")],
        [(1e20, 1, 8, 2, 1), ("-inf", 1, 8, 2, 1), ("x", 1, 8, 2, 1), (1, 2.5, 8, 2, 1), (1, 1, "9.0", 2, 1), (1, 1, 8, 2, 1)],
    )
    cat, inter = sources.read_sqlite_catalog(db), sources.read_sqlite_interactions(db)
    ra, ri = _clean_source(cat, inter)
    assert ra.frame["anime_id"].to_list() == [1]
    assert ra.dropped_by_reason == {
        "anime_id_out_of_range": 1,
        "anime_id_not_finite": 2,
        "anime_id_not_a_number": 1,
        "anime_id_not_integral": 1,
        "duplicate_anime_id": 1,
    }
    dup = ra.quarantine.filter(pl.col("reason") == "duplicate_anime_id").row(0, named=True)
    assert dup["source_row"] == 7 and dup["value"] == "1 (first at row 1)"
    assert ri.dropped_by_reason == {
        "user_id_out_of_range": 1,
        "user_id_not_finite": 1,
        "user_id_not_a_number": 1,
        "anime_id_not_integral": 1,
        "duplicate_user_anime": 1,
    }
    assert ri.frame.height == 1 and ri.frame.row(0, named=True)["score"] == 9  # "9.0" is the integer 9
    d = ri.quarantine.filter(pl.col("reason") == "duplicate_user_anime").row(0, named=True)
    assert d["source_row"] == 6 and d["value"] == "conflicts with row 5"  # score 8 vs 9: never overwritten


def test_sqlite_undecodable_text_quarantined_rest_kept(tmp_path):
    db = _sqlite_with(tmp_path, [_anime(1, "A"), _anime(2, "B"), _anime(3, "C\ufffdD")], [(1, 1, 8, 2, 1), (1, 2, 8, 2, 1)])
    conn = sqlite3.connect(db)
    conn.execute("UPDATE anime SET name = CAST(x'43686fe9' AS TEXT) WHERE anime_id = 2")  # latin-1 'Chové'
    conn.commit()
    conn.close()
    cat = sources.read_sqlite_catalog(db)
    assert cat.rows_read == 3 and cat.frame.height == 2
    rej = cat.rejected.row(0, named=True)
    assert rej["reason"] == "undecodable_text" and rej["column"] == "name" and rej["source_row"] == 2
    assert rej["value"] == "Cho\\xe9"
    report = cat.reports[0]
    assert report.rejected == {"undecodable_text": 1} and report.examples["undecodable_text"] == [2]
    assert report.values == {"name:replacement_character": 1} and report.examples["name:replacement_character"] == [3]
    assert "table anime" in report.summary() and "rows 2" in report.summary()
    ra, ri = _clean_source(cat, sources.read_sqlite_interactions(db))
    assert ra.dropped_by_reason == {"undecodable_text": 1}
    # its interactions are 'excluded' (the catalog has the row) rather than 'unknown'
    assert ri.dropped_by_reason == {"excluded_anime": 1}


def test_sqlite_not_a_database_names_the_file(tmp_path):
    bad = tmp_path / "notes.sqlite"
    bad.write_bytes(b"this is a text file, not SQLite\n" * 100)
    for read in (sources.read_sqlite_catalog, sources.read_sqlite_interactions):
        with pytest.raises(SourceError, match=r"notes\.sqlite: not a readable SQLite database"):
            read(bad)


def test_sqlite_empty_tables_read_as_zero_rows(tmp_path):
    db = _sqlite_with(tmp_path, [], [])
    assert sources.read_sqlite_catalog(db).rows_read == 0
    with pytest.raises(EmptyResultError, match=r"anime_prep: source has 0 rows \(.*case\.sqlite \(table anime\)\)"):
        sources.require_rows(0, "anime_prep", sources.read_sqlite_catalog(db).origin)


def test_interaction_value_problems_counted(tmp_path):
    db = _sqlite_with(
        tmp_path,
        [_anime(1), _anime(2), _anime(3), _anime(4)],
        [(1, 1, 8, 2, "abc"), (1, 2, 8, 2, 2.5), (1, 3, 8, 2, None), (1, 4, 8, 2, "1e20"), (2, 1, "", 2, 1), (2, 2, 8, None, 1)],
    )
    _, ri = _clean_source(sources.read_sqlite_catalog(db), sources.read_sqlite_interactions(db))
    assert ri.cleaned_values == {
        "watched_episodes:not_a_number": 1,
        "watched_episodes:not_integral": 1,
        "watched_episodes:missing": 1,
        "watched_episodes:out_of_range": 1,
    }
    assert ri.frame.filter(pl.col("user_id") == 1)["watched_episodes"].to_list() == [None] * 4  # null, never 0 or 2
    assert ri.dropped_by_reason == {"score_missing": 1, "watching_status_missing": 1}


# ---------------------------------------------------------------------------- own cases: Kaggle CSV
def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_csv_bad_lines_quarantined_with_rows_rest_kept(tmp_path):
    folder = tmp_path / "k"
    lines = [
        ANIMELIST_HEADER,
        "1,1,9,2,26",
        "1,5,8,2",  # short: watched_episodes missing -> null, counted
        "",  # blank line: not a row
        "1,6,7,2,1,EXTRA",  # too many fields: alignment unknown -> quarantined
        "2,1,8,2,26",
    ]
    data = ("\n".join(lines) + "\n").encode() + b"2,\xff\xfe6,8,2,1\n" + b"2,15,8,2,1\n"  # invalid UTF-8 in anime_id
    _write(folder / "animelist.csv", data)
    inter = sources.read_kaggle_interactions(folder)
    rep = inter.reports[0]
    assert rep.rows_read == 6 and rep.rows_kept == 4 and inter.rows_read == 6
    assert rep.rejected == {"too_many_fields": 1, "undecodable_text": 1}
    assert rep.examples["too_many_fields"] == [3] and rep.examples["undecodable_text"] == [5]
    assert rep.values == {"watched_episodes:missing_field": 1} and rep.notes == {"blank_lines": 1}
    q = inter.rejected.filter(pl.col("reason") == "undecodable_text").row(0, named=True)
    assert q["column"] == "anime_id" and q["value"] == "line 7: \\xff\\xfe6"
    assert inter.rejected.filter(pl.col("reason") == "too_many_fields")["value"].to_list() == ["line 5: 6 fields, header has 5"]
    known = {1, 5, 6, 15}
    res = prep.clean_interactions(inter, known)
    _accounted(res)
    assert res.frame.height == 4 and res.cleaned_values == {"watched_episodes:missing": 1}
    assert res.dropped_by_reason == {"too_many_fields": 1, "undecodable_text": 1}


def test_csv_empty_file_and_header_only(tmp_path):
    _write(tmp_path / "a" / "animelist.csv", "")
    with pytest.raises(SourceError, match=r"animelist\.csv: file is empty \(no header line\)"):
        sources.read_kaggle_interactions(tmp_path / "a")
    _write(tmp_path / "b" / "animelist.csv", ANIMELIST_HEADER + "\n")
    inter = sources.read_kaggle_interactions(tmp_path / "b")
    assert inter.rows_read == 0
    with pytest.raises(EmptyResultError, match=r"user_interactions: source has 0 rows \(.*animelist\.csv\)"):
        sources.require_rows(inter.rows_read, "user_interactions", inter.origin)


def test_corrupt_zip_names_the_file(tmp_path):
    folder = write_kaggle(tmp_path / "z", zipped=True)
    good = (folder / "anime.csv.zip").read_bytes()
    (folder / "anime.csv.zip").write_bytes(good[: len(good) // 2])  # truncated: no central directory
    with pytest.raises(SourceError, match=r"anime\.csv\.zip: not a valid zip archive"):
        sources.read_kaggle_catalog(folder, folder)
    # a zip whose member data is damaged (CRC / deflate error) is also a source error naming file and member
    buf = tmp_path / "crc.zip"
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("animelist.csv", ANIMELIST_HEADER + "\n" + "\n".join(f"{i},1,5,2,1" for i in range(5000)) + "\n")
    raw = bytearray(buf.read_bytes())
    raw[200:260] = bytes(60)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "animelist.csv.zip").write_bytes(bytes(raw))
    with pytest.raises(SourceError, match=r"animelist\.csv\.zip!animelist\.csv: corrupt"):
        sources.read_kaggle_interactions(tmp_path / "c")


def test_synopsis_join_uses_the_id_parser_and_counts_every_row(tmp_path):
    folder = tmp_path / "k"
    rows = [list(r) for r in CATALOG if r[1] != "Trigun duplicate"]
    rows[0][0] = "1.0"  # Cowboy Bebop written as 1.0
    rows[1][0] = " 5"
    import csv

    folder.mkdir()
    with open(folder / "anime.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(ANIME_HEADER)
        w.writerows(rows)
    _write(
        folder / "anime_with_synopsis.csv",
        "MAL_ID,Name,Score,Genders,sypnopsis\n"
        "1,Cowboy Bebop,8.78,Action,Space.\n"
        "5.0,Tengoku,8.39,Action,Bounty.\n"
        "5,Tengoku,8.39,Action,Bounty.\n"  # same id again, same text
        "1,Cowboy Bebop,8.78,Action,Other text.\n"  # same id, different text: first kept, counted
        "424242,Not in catalog,1,Action,Orphan.\n"
        "abc,Broken,1,Action,Broken id.\n",
    )
    cat = sources.read_kaggle_catalog(folder, folder)
    syn = cat.reports[1]
    assert syn.rows_read == 6 and syn.rows_kept == 6
    assert syn.notes == {
        "invalid_id:not_a_number": 1,
        "duplicate_id": 1,
        "conflicting_duplicate_id": 1,
        "matched": 2,
        "unmatched": 1,
    }
    assert syn.examples["unmatched"] == [5] and syn.examples["conflicting_duplicate_id"] == [4]
    ra = prep.clean_anime(cat)
    got = dict(zip(ra.frame["anime_id"].to_list(), ra.frame["synopsis"].to_list()))
    assert got[1] == "Space." and got[5] == "Bounty."


def test_sqlite_and_csv_identical_with_id_spellings(tmp_path, kaggle_dir):
    """Both adapters give byte-identical anime_prep / user_interactions when ids are spelled differently."""
    db = write_sqlite(tmp_path / "s.sqlite")
    conn = sqlite3.connect(db)
    conn.execute("UPDATE anime SET anime_id = CAST(anime_id AS REAL)")  # REAL 1.0 ...
    conn.commit()
    conn.close()
    text = (kaggle_dir / "animelist.csv").read_text().replace("\n1,1,", "\n1, 1.0,")
    (kaggle_dir / "animelist.csv").write_text(text)
    ca, cb = sources.read_kaggle_catalog(kaggle_dir, kaggle_dir), sources.read_sqlite_catalog(db)
    ra, ia = _clean_source(ca, sources.read_kaggle_interactions(kaggle_dir))
    rb, ib = _clean_source(cb, sources.read_sqlite_interactions(db))
    assert ra.frame.equals(rb.frame) and ia.frame.equals(ib.frame)
    assert ra.frame.height == 5 and ia.frame.height == 6


# -------------------------------------------------------------------------------- own cases: Amazon
def test_amazon_deep_nesting_duplicate_keys_and_bad_bytes_are_bad_lines(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = [
        b'{"asin": "A1", "title": "ok"}',
        deep.encode(),
        ("{" + '"a":' * 50_000 + "1" + "}" * 50_000).encode(),
        b'{"asin": "A2", "asin": "A3", "title": "which?"}',  # duplicate key: never guess
        b"{'asin': 'A4', 'asin': 'A5'}",
        b'{"asin": "A6", "title": "Caf\xe9"}',  # latin-1 byte: decoded with U+FFFD, line kept, counted
    ]
    path = tmp_path / "meta.json.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    records, report = read_records(path)
    assert [n for n, _ in records] == [1, 6]
    assert report.lines == 6 and report.parsed == 2 and report.bad == 4
    assert [n for n, _ in report.bad_examples] == [2, 3, 4, 5]
    assert "RecursionError" in dict(report.bad_examples)[2] and "duplicate key 'asin'" in dict(report.bad_examples)[4]
    assert report.decode_issues == {"invalid_utf8": 1} and report.decode_examples["invalid_utf8"] == [6]
    assert "invalid_utf8 1 (lines 6)" in report.summary()
    with pytest.raises(ValueError, match="duplicate key"):
        parse_record('{"asin": "A2", "asin": "A3"}')


def test_amazon_values_set_to_null_are_counted_with_lines(tmp_path):
    reviews = [
        {"reviewerID": "u1", "asin": "A", "overall": 5.0, "unixReviewTime": 100},
        {"reviewerID": "u1", "asin": "B", "overall": "five", "unixReviewTime": "yesterday"},
        {"reviewerID": "u2", "asin": "A", "overall": "NaN", "unixReviewTime": 1.5e9},
        {"reviewerID": "u2", "asin": "B", "overall": True, "unixReviewTime": "1e20"},
    ]
    path = _write(tmp_path / "r.json", "\n".join(json.dumps(r) for r in reviews) + "\n")
    d = load_raw_amazon(path)
    assert d.cleaned_values == {
        "reviews: overall:not_a_number": 2,
        "reviews: overall:not_finite": 1,
        "reviews: unixReviewTime:not_a_number": 1,
        "reviews: unixReviewTime:out_of_range": 1,
    }
    assert d.examples["reviews: overall:not_a_number"] == [2, 4]
    assert d.interactions.filter(pl.col("reviewer_id") == "u2").sort("asin")["timestamp"].to_list() == [1_500_000_000, None]
    empty = _write(tmp_path / "empty.json", '{"asin": "A"}\n\n')
    with pytest.raises(EmptyResultError, match=r"source has 0 usable reviews.*review: missing reviewerID 1"):
        load_raw_amazon(empty)


def _prepared(folder: Path, inter: str, items: str = "item_id,asin,text\n0,A1,red\n1,A2,blue\n") -> Path:
    _write(folder / "inter.json", inter)
    _write(folder / "items.csv", items)
    return folder


def test_prepared_split_ids_exact_and_bad_keys_are_source_errors(tmp_path):
    ok = load_prepared_split(_prepared(tmp_path / "a", '{"0": [0, 1.0], "1": [1]}'))
    assert ok.interactions["item_id"].to_list() == [0, 1, 1]
    with pytest.raises(SourceError, match=r"inter\.json: line 3: user key 'x7' is not an integer user index \(not_a_number\)"):
        load_prepared_split(_prepared(tmp_path / "b", '{\n "0": [0],\n "x7": [1]\n}'))
    with pytest.raises(SourceError, match=r"user key '0' repeats user 0 \(duplicate key\)"):
        load_prepared_split(_prepared(tmp_path / "c", '{"0": [0], "0": [1]}'))
    with pytest.raises(SourceError, match=r"item id True is not an integer"):
        load_prepared_split(_prepared(tmp_path / "d", '{"0": [true]}'))
    with pytest.raises(SourceError, match=r"item id Decimal\('1.5'\) is not an integer \(not_integral\)"):
        load_prepared_split(_prepared(tmp_path / "e", '{"0": [1.5]}'))
    with pytest.raises(SourceError, match=r"items\.csv: line 3, column 'item_id': value '1x' is not an integer id"):
        load_prepared_split(_prepared(tmp_path / "f", '{"0": [0]}', "item_id,asin,text\n0,A1,red\n1x,A2,blue\n"))
    with pytest.raises(EmptyResultError, match="source has 0 rows"):
        load_prepared_split(_prepared(tmp_path / "g", "{}"))


# ------------------------------------------------------- empty result never replaces a good artifact
def _materialize(source, selection):
    from animind_assets.defs.sources.anime_catalog_source import anime_catalog_source
    from animind_assets.defs.prep.anime_prep import anime_prep, anime_prep_is_valid
    from animind_assets.defs.prep.user_interactions import user_interactions
    from animind_assets.defs.sources.watchlist_source import watchlist_source
    from animind_assets.definitions import build_resources

    return dg.materialize(
        [anime_catalog_source, watchlist_source, anime_prep, user_interactions, anime_prep_is_valid],
        resources=build_resources(anime_source=source, mlflow_enabled=False),
        instance=dg.DagsterInstance.ephemeral(),
        selection=selection,
        raise_on_error=False,
    )


def _failure_message(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "expected a failed step"
    messages = []
    for e in failures:
        err = e.event_specific_data.error
        while err is not None:  # dagster wraps the asset's exception: read the whole cause chain
            messages.append(err.message)
            err = err.cause
    return "\n".join(messages)


def _snapshot(data_dir: Path) -> dict:
    from animind_assets.resources import DuckDBWarehouse, default_duckdb_path

    wh = DuckDBWarehouse(database=default_duckdb_path(), schema="main")
    out = {}
    for name in ("anime_prep", "user_interactions"):
        table = wh.read_table(name)
        export = data_dir / "exports" / f"{name}.parquet"
        out[name] = (table, pl.read_parquet(export), export.stat().st_mtime_ns)
    return out


def _bad_sources(tmp_path: Path, cases: Path | None):
    from animind_assets.resources import AnimeSource

    for sub in ("adult", "ec", "eu"):
        (tmp_path / sub).mkdir()
    adult = _sqlite_with(tmp_path / "adult", [_anime(i, f"T{i}", rating="Rx - Hentai") for i in range(1, 6)], [(1, 1, 8, 2, 1)])
    empty_cat = _sqlite_with(tmp_path / "ec", [], [(1, 1, 8, 2, 1)])
    empty_users = _sqlite_with(tmp_path / "eu", [_anime(1)], [])
    header_only = write_kaggle(tmp_path / "ho")
    (header_only / "animelist.csv").write_text(ANIMELIST_HEADER + "\n")
    both, inter = ["anime_prep", "user_interactions"], ["user_interactions"]  # inter: anime_prep loaded from DuckDB
    out = [
        (AnimeSource(kind="sqlite", sqlite_path=str(adult)), both, r"anime_prep: 0 of 5 rows kept \(adult_excluded 5\)"),
        (AnimeSource(kind="sqlite", sqlite_path=str(empty_cat)), both, r"anime_prep: source has 0 rows \(.*ec/case\.sqlite \(table anime\)\)"),
        (AnimeSource(kind="sqlite", sqlite_path=str(empty_users)), inter, r"user_interactions: source has 0 rows \(.*eu/case\.sqlite \(table user_anime\)\)"),
        (AnimeSource(kind="kaggle_csv", kaggle_dir=str(header_only)), inter, r"user_interactions: source has 0 rows \(.*ho/animelist\.csv\)"),
    ]
    if cases is not None:
        sq = cases / "sqlite"
        out += [
            (AnimeSource(kind="sqlite", sqlite_path=str(sq / "e13_all_excluded.sqlite")), both, r"anime_prep: 0 of 5 rows kept \(adult_excluded 5\)"),
            (AnimeSource(kind="sqlite", sqlite_path=str(sq / "s09_empty_catalog.sqlite")), both, r"source has 0 rows \(.*s09_empty_catalog\.sqlite \(table anime\)\)"),
            (AnimeSource(kind="sqlite", sqlite_path=str(sq / "s10_empty_userlist.sqlite")), inter, r"source has 0 rows \(.*s10_empty_userlist\.sqlite \(table user_anime\)\)"),
            (
                AnimeSource(kind="kaggle_csv", kaggle_dir=str(cases / "kaggle" / "k09_header_only_animelist")),
                inter,
                r"user_interactions: source has 0 rows \(.*k09_header_only_animelist/animelist\.csv\)",
            ),
        ]
    return out


def _empty_after_good(tmp_path, animind_env, sqlite_path, cases):
    from animind_assets.resources import AnimeSource

    good = _materialize(AnimeSource(kind="sqlite", sqlite_path=str(sqlite_path)), ["anime_prep", "user_interactions"])
    assert good.success
    before = _snapshot(animind_env)
    assert before["anime_prep"][0].height == 5 and before["user_interactions"][0].height == 6
    for source, selection, message in _bad_sources(tmp_path, cases):
        result = _materialize(source, selection)
        assert not result.success
        msg = _failure_message(result)
        assert re.search(message, msg), msg
        assert "previous table and export are kept" in msg
        after = _snapshot(animind_env)
        for name, (table, export, mtime) in before.items():
            assert after[name][0].equals(table), f"{name} table replaced by {source.describe()}"
            assert after[name][1].equals(export) and after[name][2] == mtime, f"{name} export replaced by {source.describe()}"


def test_empty_source_after_good_run_keeps_table_and_export(tmp_path, animind_env, sqlite_path):
    _empty_after_good(tmp_path, animind_env, sqlite_path, None)


@pytest.mark.slow
@pytest.mark.shared_cases
def test_shared_empty_cases_after_good_run_keep_table_and_export(tmp_path, animind_env, sqlite_path, cases_dir):
    _empty_after_good(tmp_path, animind_env, sqlite_path, cases_dir)


# ------------------------------------------------------------------------------ ../shared/cases
@pytest.mark.shared_cases
def test_case_e01_real_ids_all_rows_kept(cases_dir, animind_env):
    from animind_assets.resources import AnimeSource, DuckDBWarehouse, default_duckdb_path

    src = AnimeSource(kind="sqlite", sqlite_path=str(cases_dir / "sqlite" / "e01_real_ids.sqlite"))
    result = _materialize(src, ["anime_prep", "user_interactions"])
    assert result.success
    mats = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert mats["anime_prep"]["dagster/row_count"].value == 12
    assert mats["user_interactions"]["dagster/row_count"].value == 36
    assert mats["user_interactions"]["quarantined_rows"].value == 0
    table = DuckDBWarehouse(database=default_duckdb_path(), schema="main").read_table("user_interactions")
    assert table.height == 36 and sorted(table["anime_id"].unique().to_list()) == list(range(1, 13))


def _sq(cases_dir: Path, name: str):
    db = cases_dir / "sqlite" / name
    return _clean_source(sources.read_sqlite_catalog(db), sources.read_sqlite_interactions(db))


@pytest.mark.shared_cases
@pytest.mark.parametrize(
    "name, kept, reason, rows",
    [
        ("s13_huge_ids.sqlite", 2361, "user_id_out_of_range", [5]),
        ("s14_nan_inf_ids.sqlite", 2359, "user_id_not_finite", [1, 2, 3]),
    ],
)
def test_case_huge_nan_inf_user_ids_quarantined(cases_dir, name, kept, reason, rows):
    ra, ri = _sq(cases_dir, name)
    assert ra.frame.height == 300
    assert ri.frame.height == kept and ri.dropped_by_reason == {reason: len(rows)}
    assert ri.quarantine["source_row"].to_list() == rows and set(ri.quarantine["column"]) == {"user_id"}


@pytest.mark.shared_cases
def test_case_s22_huge_catalog_id_quarantined(cases_dir):
    ra, ri = _sq(cases_dir, "s22_huge_catalog_id.sqlite")
    assert ra.frame.height == 299 and ra.dropped_by_reason == {"anime_id_out_of_range": 1}
    q = ra.quarantine.row(0, named=True)
    assert q["source_row"] == 9 and q["value"] == "1.0e+20"
    assert ri.frame.height + ri.quarantine.height == 2362 and set(ri.dropped_by_reason) == {"unknown_anime"}


@pytest.mark.shared_cases
def test_case_s16_text_watched_episodes_null_and_counted(cases_dir):
    _, ri = _sq(cases_dir, "s16_text_watched_eps.sqlite")
    assert ri.frame.height == 2362 and ri.quarantine.height == 0
    assert ri.cleaned_values == {"watched_episodes:not_a_number": 2, "watched_episodes:not_integral": 1}
    assert ri.frame["watched_episodes"].null_count() == 3


@pytest.mark.shared_cases
def test_case_s12_non_utf8_rows_quarantined_rest_kept(cases_dir):
    db = cases_dir / "sqlite" / "s12_non_utf8.sqlite"
    cat = sources.read_sqlite_catalog(db)
    assert cat.rows_read == 300 and cat.frame.height == 298
    assert cat.rejected["source_row"].to_list() == [7, 8] and set(cat.rejected["reason"]) == {"undecodable_text"}
    assert "Chob\\xe9ts latin1" in cat.rejected["value"].to_list()
    assert "s12_non_utf8.sqlite (table anime)" in cat.reports[0].summary()
    ra, ri = _sq(cases_dir, "s12_non_utf8.sqlite")
    assert ra.frame.height == 298 and ri.frame.height == 2352 and ri.dropped_by_reason == {"excluded_anime": 10}


@pytest.mark.shared_cases
def test_case_s19_not_a_database(cases_dir):
    with pytest.raises(SourceError, match=r"s19_not_a_db\.sqlite: not a readable SQLite database \(file is not a database\)"):
        sources.read_sqlite_catalog(cases_dir / "sqlite" / "s19_not_a_db.sqlite")


@pytest.mark.shared_cases
def test_case_k05b_short_row_null_and_counted(cases_dir):
    folder = cases_dir / "kaggle" / "k05b_short_row"
    inter = sources.read_kaggle_interactions(folder)
    assert inter.reports[0].values == {"watched_episodes:missing_field": 2, "watching_status:missing_field": 1}
    assert inter.reports[0].examples["watched_episodes:missing_field"] == [5, 9]
    _, ri = _clean_source(sources.read_kaggle_catalog(folder, folder), inter)
    assert ri.cleaned_values == {"watched_episodes:missing": 1}
    assert ri.dropped_by_reason == {"watching_status_missing": 1}
    assert ri.quarantine["source_row"].to_list() == [9]
    assert ri.frame.height == 2361


@pytest.mark.shared_cases
def test_case_k07_corrupt_zip(cases_dir):
    folder = cases_dir / "kaggle" / "k07_corrupt_zip"
    with pytest.raises(SourceError, match=r"k07_corrupt_zip/anime\.csv\.zip: not a valid zip archive \(File is not a zip file\)"):
        sources.read_kaggle_catalog(folder, folder)


@pytest.mark.shared_cases
def test_case_k16_id_formats_one_parser(cases_dir):
    folder = cases_dir / "kaggle" / "k16_id_format"
    cat = sources.read_kaggle_catalog(folder, folder)
    assert cat.reports[1].notes == {"matched": 300}
    ra, ri = _clean_source(cat, sources.read_kaggle_interactions(folder))
    rows = ra.frame.filter(pl.col("anime_id").is_in([1, 5]))
    assert rows["has_synopsis"].to_list() == [True, True]
    assert ri.quarantine.height == 0 and ri.frame.height == 2362
    assert ri.frame.filter(pl.col("anime_id").is_in([1, 5])).height > 0


@pytest.mark.shared_cases
def test_case_amazon_deep_metadata_and_reviews(cases_dir):
    d = load_raw_amazon(cases_dir / "amazon" / "reviews.json", cases_dir / "amazon" / "metadata_deep_min.txt")
    meta = d.reports[1]
    assert meta.parsed == 1 and meta.bad == 1 and meta.bad_examples[0][0] == 2
    assert "RecursionError" in meta.bad_examples[0][1]
    assert d.items.filter(pl.col("asin") == "B000AAA001")["title"].to_list() == ["ok"]
    assert d.cleaned_values["reviews: overall:not_a_number"] == 1 and d.examples["reviews: overall:not_a_number"] == [26]
    rev = d.reports[0]
    assert rev.lines == rev.parsed + rev.blank + rev.bad
    assert rev.parsed == d.interactions.height + sum(d.dropped.values()) - d.dropped.get("metadata: duplicate asin", 0)


@pytest.mark.shared_cases
def test_case_amazon_prepared_non_integer_keys(cases_dir):
    with pytest.raises(SourceError, match=r"p03_non_int_user_key/inter\.json: line 563: user key 'abc' is not an integer"):
        load_prepared_split(cases_dir / "amazon" / "p03_non_int_user_key")
    with pytest.raises(SourceError, match=r"p04_items_non_int_id/items\.csv: line 7, column 'item_id': value 'five'"):
        load_prepared_split(cases_dir / "amazon" / "p04_items_non_int_id")


def test_truncated_gzip_and_oversized_csv_field(tmp_path):
    lines = "\n".join(json.dumps({"reviewerID": f"u{i}", "asin": f"A{i % 50}", "overall": 5, "unixReviewTime": i}) for i in range(20000))
    data = gzip.compress((lines + "\n").encode())
    path = _write(tmp_path / "reviews.json.gz", data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"reviews\.json\.gz: corrupt or truncated after line \d+ \(EOFError"):
        load_raw_amazon(path)
    _write(tmp_path / "f" / "animelist.csv", f'{ANIMELIST_HEADER}\n1,1,5,2,1\n1,"{"x" * 200_000}",5,2,1\n2,1,5,2,1\n')
    inter = sources.read_kaggle_interactions(tmp_path / "f")
    assert inter.rows_read == 3 and inter.frame.height == 2
    q = inter.rejected.row(0, named=True)
    assert q["reason"] == "csv_error" and q["source_row"] == 2 and q["value"].startswith("line 3: field larger than field limit")


def test_csv_fast_path_and_exact_reader_agree(tmp_path):
    rows = [["1", "1", "9", "2", "26"], ["1", "5", "", "2", "1"], ["2", " 6", "8", "2", "0"], ["3", "15", "7", "6", "x"]]
    _write(tmp_path / "fast" / "animelist.csv", ANIMELIST_HEADER + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    quoted = "\r\n".join(",".join(f'"{v}"' for v in r) for r in [ANIMELIST_HEADER.split(","), *rows]) + "\r\n"
    _write(tmp_path / "exact" / "animelist.csv", quoted)  # quotes + CRLF: record-by-record reader
    fast = sources.read_kaggle_interactions(tmp_path / "fast")
    exact = sources.read_kaggle_interactions(tmp_path / "exact")
    assert fast.frame.equals(exact.frame)
    assert (fast.reports[0].rows_read, fast.reports[0].rejected) == (exact.reports[0].rows_read, exact.reports[0].rejected) == (4, {})


def test_amazon_memory_error_on_one_line_is_a_bad_line(tmp_path, monkeypatch):
    import animind_assets.lib.data.amazon_records as amazon

    real_loads = json.loads

    def loads(text, *args, **kwargs):
        if "HUGE" in text:
            raise MemoryError()
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(amazon.json, "loads", loads)
    path = _write(tmp_path / "meta.json", '{"asin": "A1"}\n{"asin": "HUGE"}\n{"asin": "A2"}\n')
    records, report = read_records(path, fmt="json")
    assert [n for n, _ in records] == [1, 3]
    assert report.bad == 1 and report.bad_examples[0][0] == 2 and "MemoryError" in report.bad_examples[0][1]
