"""Source adapters (good and bad input) and the cleaning rules of anime_prep / user_interactions."""

from __future__ import annotations

import sqlite3

import polars as pl
import pytest

from animind_assets.lib.data import prep, sources
from animind_assets.lib.data.demo import DemoUserConfig, read_demo_catalog, simulate_users

from animind_assets_tests.conftest import write_kaggle


def _clean_both(kaggle_dir, sqlite_path):
    a = sources.read_kaggle_catalog(kaggle_dir / "anime.csv", kaggle_dir / "anime_with_synopsis.csv")
    b = sources.read_sqlite_catalog(sqlite_path)
    return prep.clean_anime(a.frame), prep.clean_anime(b.frame)


def test_sqlite_and_csv_give_identical_anime_prep(kaggle_dir, sqlite_path):
    ra, rb = _clean_both(kaggle_dir, sqlite_path)
    assert ra.frame.equals(rb.frame)
    assert ra.dropped_by_reason == rb.dropped_by_reason


def test_zipped_csv_matches_plain(tmp_path, kaggle_dir):
    zdir = write_kaggle(tmp_path / "zipped", zipped=True)
    plain = sources.read_kaggle_catalog(kaggle_dir, kaggle_dir)
    zipped = sources.read_kaggle_catalog(zdir, zdir)
    assert plain.frame.equals(zipped.frame)
    assert sources.read_kaggle_interactions(zdir).frame.equals(sources.read_kaggle_interactions(kaggle_dir).frame)


def test_cleaning_rules(kaggle_dir, sqlite_path):
    res, _ = _clean_both(kaggle_dir, sqlite_path)
    df = res.frame
    assert df["anime_id"].to_list() == [1, 5, 6, 7, 15]
    assert res.dropped_by_reason == {"adult_excluded": 1, "duplicate_anime_id": 1, "null_name": 1}
    assert set(res.quarantine["reason"]) == {"adult_excluded", "duplicate_anime_id", "null_name"}
    # the quarantine keeps the source row so the user can find it
    assert res.quarantine.filter(pl.col("reason") == "null_name")["source_row"].to_list() == [7]
    row5 = df.filter(pl.col("anime_id") == 5).row(0, named=True)
    assert row5["english_name"] is None and row5["title"] == "Cowboy Bebop: Tengoku no Tobira"
    assert row5["premiered"] is None and row5["year"] is None
    row6 = df.filter(pl.col("anime_id") == 6).row(0, named=True)
    assert row6["score"] is None and row6["episodes"] is None
    assert row6["synopsis"] is None and row6["has_synopsis"] is False  # MAL placeholder -> missing
    row7 = df.filter(pl.col("anime_id") == 7).row(0, named=True)
    assert row7["score"] is None and row7["episodes"] is None  # 'abc' / '2x'
    assert res.cleaned_values["score:not_a_number"] == 1
    assert res.cleaned_values["episodes:not_a_number"] == 1
    assert res.cleaned_values["synopsis:placeholder"] == 1
    row15 = df.filter(pl.col("anime_id") == 15).row(0, named=True)
    assert row15["synopsis"] == "Sena is like any other shy kid."
    assert row15["genres"] == ["Action", "Sports", "Comedy", "Shounen"]
    assert row15["year"] == 2005
    for text in df["anime_text"]:
        assert "Unknown" not in text and "\n" not in text
        assert "1251960" not in text and "8.78" not in text  # no popularity counters / scores
    assert row5["missing_core_fields"] == ["year"]


def test_adult_titles_kept_when_configured(kaggle_dir):
    raw = sources.read_kaggle_catalog(kaggle_dir, kaggle_dir)
    res = prep.clean_anime(raw.frame, include_adult=True)
    assert 8 in res.frame["anime_id"].to_list()
    assert "adult_excluded" not in res.dropped_by_reason


def test_anime_text_is_deterministic(kaggle_dir):
    raw = sources.read_kaggle_catalog(kaggle_dir, kaggle_dir)
    raw.frame = raw.frame.filter(pl.col("name") != "Trigun duplicate")  # duplicates resolve by source order
    t1 = prep.clean_anime(raw.frame).frame["anime_text"].to_list()
    shuffled = raw.frame.sample(fraction=1.0, shuffle=True, seed=3)
    t2 = prep.clean_anime(shuffled).frame["anime_text"].to_list()
    assert sorted(t1) == sorted(t2)
    first = prep.clean_anime(raw.frame).frame.filter(pl.col("anime_id") == 1)["anime_text"][0]
    assert first == (
        "Title: Cowboy Bebop. Type: TV. Genres: Action, Adventure, Sci-Fi. Episodes: 26. Premiered: Spring 1998. "
        "Studios: Sunrise. Source: Original. Rating: R - 17+ (violence & profanity). "
        "Synopsis: In the year 2071, humanity has colonized several of the planets."
    )


def test_interactions_quarantine_by_reason(kaggle_dir, sqlite_path):
    cat = sources.read_kaggle_catalog(kaggle_dir, kaggle_dir)
    clean = prep.clean_anime(cat.frame).frame
    catalog_ids = {int(x) for x in cat.frame["anime_id"].to_list()}
    excluded = catalog_ids - set(clean["anime_id"].to_list())
    results = []
    for raw in (sources.read_kaggle_interactions(kaggle_dir), sources.read_sqlite_interactions(sqlite_path)):
        results.append(prep.clean_interactions(raw.frame, catalog_ids, excluded))
    a, b = results
    assert a.frame.equals(b.frame)
    assert a.dropped_by_reason == {
        "score_out_of_range": 1,
        "unknown_anime": 1,
        "excluded_anime": 1,
        "score_not_a_number": 1,
        "invalid_status": 1,
        "duplicate_user_anime": 1,
    }
    assert a.frame.height + a.quarantine.height == 12  # nothing lost silently
    q = a.quarantine.filter(pl.col("reason") == "score_not_a_number").row(0, named=True)
    assert q["source_row"] == 8 and q["column"] == "score" and q["value"] == "x"
    assert a.frame.filter(pl.col("user_id") == 3)["seq"].to_list() == [0, 1]
    assert a.frame.filter(pl.col("user_id") == 3)["status"].to_list() == [1, 6]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.sqlite"
    with pytest.raises(sources.SourceError, match=str(missing)):
        sources.read_sqlite_catalog(missing)
    with pytest.raises(sources.SourceError, match="anime.csv not found"):
        sources.read_kaggle_catalog(tmp_path, None)


def test_missing_table_and_column_are_named(tmp_path, kaggle_dir):
    db = tmp_path / "bad.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE anime(anime_id INTEGER, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(sources.SourceError) as err:
        sources.read_sqlite_catalog(db)
    msg = str(err.value)
    assert "bad.sqlite" in msg and "'anime'" in msg and "english_name" in msg and "found columns" in msg
    with pytest.raises(sources.SourceError, match=r"table 'user_anime' not found; found tables: \['anime'\]"):
        sources.read_sqlite_interactions(db)
    bad_csv = tmp_path / "k2"
    bad_csv.mkdir()
    (bad_csv / "anime.csv").write_text("MAL_ID,Name,Score\n1,A,5\n")
    with pytest.raises(sources.SourceError) as err:
        sources.read_kaggle_catalog(bad_csv, None)
    assert "Genders" in str(err.value) and "anime.csv" in str(err.value) and "MAL_ID" in str(err.value)


def test_demo_catalog_and_simulation_are_deterministic():
    cat = read_demo_catalog()
    assert cat.frame.height == 17562
    small = cat.frame.head(300)
    a = simulate_users(small, DemoUserConfig(n_users=20, seed=7))
    b = simulate_users(small, DemoUserConfig(n_users=20, seed=7))
    c = simulate_users(small, DemoUserConfig(n_users=20, seed=8))
    assert a.frame.equals(b.frame) and not a.frame.equals(c.frame)
    assert a.simulated and "SIMULATED" in a.notes["simulated"]
    clean = prep.clean_interactions(a.frame, {int(x) for x in small["anime_id"].to_list()})
    assert clean.quarantine.height == 0
    assert set(clean.frame["status"].unique().to_list()) <= {1, 2, 3, 4, 6}
    scored = clean.frame.filter(pl.col("score") > 0)["score"]
    assert scored.min() >= 1 and scored.max() <= 10


@pytest.mark.slow
@pytest.mark.shared_data
def test_shared_mal_sqlite_and_csv_identical(mal2020_dir):
    a = sources.read_sqlite_catalog(mal2020_dir / "anilist.sqlite")
    b = sources.read_kaggle_catalog(mal2020_dir / "anime.csv.zip", mal2020_dir / "anime_with_synopsis.csv.zip")
    assert a.fingerprint() == b.fingerprint()
    ra, rb = prep.clean_anime(a.frame), prep.clean_anime(b.frame)
    assert ra.frame.equals(rb.frame)
    assert ra.frame.height == 16214 and ra.dropped_by_reason == {"adult_excluded": 1348}
    catalog_ids = {int(x) for x in a.frame["anime_id"].to_list()}
    excluded = catalog_ids - set(ra.frame["anime_id"].to_list())
    ia = prep.clean_interactions(sources.read_sqlite_interactions(mal2020_dir / "anilist.sqlite").frame, catalog_ids, excluded)
    ib = prep.clean_interactions(sources.read_kaggle_interactions(mal2020_dir / "animelist.csv").frame, catalog_ids, excluded)
    assert ia.frame.equals(ib.frame)
    assert ia.frame.height + ia.quarantine.height == 390704
    assert ra.frame.filter(pl.col("synopsis").str.starts_with("No synopsis")).height == 0
