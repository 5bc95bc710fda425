"""Amazon source adapter: JSON / Python-dict line parsing (bad lines counted, never fatal; gzip and
plain), raw 5-core files -> items + interactions, the prepared TIGER/P5 split (both orders), and the
beauty_items / beauty_interactions assets in-process."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from animind_assets.lib.data.amazon import flatten_categories, item_text, load_raw_amazon, sequences_from_interactions
from animind_assets.lib.data.amazon_records import parse_record, read_records
from animind_assets.lib.data.amazon_split import load_prepared_split
from animind_assets.lib.data.sources import SourceError

# reviews as JSON lines; B and A reviewed on the same day by u1 (tie kept in file order)
REVIEWS = [
    {"reviewerID": "u2", "asin": "B0002", "overall": 4.0, "unixReviewTime": 300, "reviewText": "ok"},
    {"reviewerID": "u1", "asin": "B0003", "overall": 5.0, "unixReviewTime": 200},
    {"reviewerID": "u1", "asin": "B0001", "overall": 3.0, "unixReviewTime": 100},
    {"reviewerID": "u1", "asin": "B0002", "overall": 2.0, "unixReviewTime": 200},
    {"reviewerID": "u2", "asin": "B0001", "overall": 1.0, "unixReviewTime": 100},
    {"reviewerID": "u1", "asin": "B0001", "overall": 4.0, "unixReviewTime": 400},  # repeated (u1, B0001)
    {"asin": "B0009", "overall": 1.0, "unixReviewTime": 1},  # no reviewer
]
# metadata as the 2014 files hold it: Python dict literals (single quotes, nested lists)
METADATA_LINES = [
    "{'asin': 'B0001', 'title': 'Rose Lip Balm', 'price': 4.5, 'brand': 'Acme', 'categories': [['Beauty', 'Skin Care', 'Lips'], ['Beauty', 'Makeup']], 'salesRank': {'Beauty': 10}}",
    "{'asin': 'B0002', 'title': \"Men's Shave Gel\", 'categories': [['Beauty', 'Shave']], 'description': 'A gel.'}",
    "this is not a record",
    "__import__('os').system('echo pwned')",
    "",
    "['a', 'list']",
    '{"asin": "B0003", "title": "Nail Polish", "brand": "Zed", "price": "$7.00"}',
    "{'asin': 'B0001', 'title': 'duplicate entry'}",
]


def write_lines(path: Path, lines: list[str], gz: bool) -> Path:
    data = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.fixture()
def raw_files(tmp_path):
    reviews = write_lines(tmp_path / "reviews_Beauty_5.json.gz", [json.dumps(r) for r in REVIEWS], gz=True)
    meta = write_lines(tmp_path / "meta_Beauty.json", METADATA_LINES, gz=False)
    return reviews, meta


def test_parse_record_json_and_python_literals():
    assert parse_record('{"a": 1}') == ({"a": 1}, "json")
    rec, kind = parse_record("{'asin': 'X', 'categories': [['A', 'B']], 'price': 1.5, 'ok': True, 'n': None}")
    assert kind == "python" and rec["categories"] == [["A", "B"]] and rec["ok"] is True and rec["n"] is None
    with pytest.raises(ValueError, match="Python literal"):
        parse_record("__import__('os').system('echo pwned')")
    with pytest.raises(ValueError, match="not a dict"):
        parse_record("[1, 2]")
    with pytest.raises(ValueError):
        parse_record("{'a': 1}", fmt="json")  # Python literal refused when JSON is required


@pytest.mark.parametrize("gz", [False, True])
def test_bad_lines_counted_with_line_numbers_not_fatal(tmp_path, gz, capfd):
    path = write_lines(tmp_path / ("meta.json.gz" if gz else "meta.json"), METADATA_LINES, gz=gz)
    records, report = read_records(path)
    assert [n for n, _ in records] == [1, 2, 7, 8]
    assert report.lines == 8 and report.parsed == 4 and report.blank == 1 and report.bad == 3
    assert report.python_lines == 3 and report.json_lines == 1
    assert [n for n, _ in report.bad_examples] == [3, 4, 6]
    assert "3 bad" in report.summary() and "4 (" in report.summary()
    assert "pwned" not in capfd.readouterr().out  # literal_eval never runs code


def test_raw_amazon_to_items_and_interactions(raw_files):
    reviews, meta = raw_files
    data = load_raw_amazon(reviews, meta)
    items, inter = data.items, data.interactions
    # item_id = rank of the ASIN in sorted order (only reviewed ASINs)
    assert items["asin"].to_list() == ["B0001", "B0002", "B0003"]
    assert items["item_id"].to_list() == [0, 1, 2]
    b1 = items.row(0, named=True)
    assert b1["title"] == "Rose Lip Balm" and b1["brand"] == "Acme" and b1["price"] == 4.5
    assert b1["categories"] == ["Beauty", "Skin Care", "Lips", "Makeup"]
    assert b1["text"] == "Rose Lip Balm. Brand: Acme. Categories: Beauty, Skin Care, Lips, Makeup. Price: $4.50"
    assert items.row(2, named=True)["price"] == 7.0  # "$7.00" parsed
    # users by sorted reviewerID; order by timestamp, same-day tie (B0003 before B0002) in file order
    u1 = inter.filter(pl.col("reviewer_id") == "u1").sort("seq")
    assert u1["user_id"].unique().to_list() == [0]
    assert u1["asin"].to_list() == ["B0001", "B0003", "B0002"]
    assert u1["seq"].to_list() == [0, 1, 2]
    assert u1["rating"].to_list() == [3.0, 5.0, 2.0] and u1["timestamp"].to_list() == [100, 200, 200]
    assert sequences_from_interactions(inter) == {0: [0, 2, 1], 1: [0, 1]}
    assert data.dropped["review: missing reviewerID"] == 1
    assert data.dropped["review: repeated (user, item) pair"] == 1
    assert data.dropped["metadata: duplicate asin"] == 1
    assert data.reports[1].bad == 3 and data.has_timestamps
    assert list(inter.schema) == ["user_id", "item_id", "rating", "timestamp", "seq", "reviewer_id", "asin"]


def test_helpers_are_deterministic():
    assert flatten_categories([["A", "B"], ["A", "C"], "D"]) == ["A", "B", "C", "D"]
    assert item_text(None, None, [], None) == ""
    assert item_text("T.", "B", ["x"], 1, "long description here", max_description_chars=8).endswith("Description: long de…")


def write_prepared(folder: Path) -> Path:
    folder.mkdir()
    (folder / "items.csv").write_text("item_id,asin,text\n0,A1,red lipstick\n1,A2,\n2,B1,nail file\n", encoding="utf-8")
    (folder / "inter.json").write_text(json.dumps({"0": [2, 0, 1], "1": [1, 2]}), encoding="utf-8")
    # users sorted by reviewerID: RA -> 0, RB -> 1; RA's order differs (tie broken the other way)
    (folder / "user_sequence.txt").write_text("RB A2 B1\nRA B1 A2 A1\n", encoding="utf-8")
    return folder


def test_prepared_split_orders_and_reviewers(tmp_path):
    folder = write_prepared(tmp_path / "beauty")
    d = load_prepared_split(folder)
    assert sequences_from_interactions(d.interactions) == {0: [2, 0, 1], 1: [1, 2]}
    assert d.interactions.filter(pl.col("user_id") == 0)["reviewer_id"].unique().to_list() == ["RA"]
    assert d.notes["user_sequence_same_item_multiset_pct"] == 100.0
    assert d.notes["user_sequence_same_order_pct"] == 50.0
    assert "inter.json" in d.order
    assert d.items["has_text"].to_list() == [True, False, True] and d.items["title"][1] is None
    p5 = load_prepared_split(folder, order="user_sequence")
    assert sequences_from_interactions(p5.interactions) == {0: [2, 1, 0], 1: [1, 2]}
    with pytest.raises(SourceError, match="order"):
        load_prepared_split(folder, order="random")
    (folder / "inter.json").write_text(json.dumps({"0": [7]}), encoding="utf-8")
    with pytest.raises(SourceError, match="outside items.csv"):
        load_prepared_split(folder)


@pytest.mark.shared_data
def test_real_prepared_beauty_split(beauty_dir):
    d = load_prepared_split(beauty_dir)
    assert d.items.height == 12101 and d.interactions.height == 198502
    assert d.interactions["user_id"].n_unique() == 22363
    assert d.notes["user_sequence_same_item_multiset_pct"] == 100.0
    assert d.notes["user_sequence_same_order_pct"] == pytest.approx(26.7, abs=0.01)
    assert d.notes["user_sequence_same_last_item_pct"] == pytest.approx(71.16, abs=0.01)
    assert d.items.filter(~pl.col("has_text"))["asin"].to_list() == ["B001LTVF7G"]


@pytest.mark.slow
def test_beauty_source_assets_in_process(raw_files, animind_env):
    from animind_assets.defs.beauty.beauty_interactions import beauty_interactions, beauty_interactions_valid
    from animind_assets.defs.beauty.beauty_items import beauty_items
    from animind_assets.resources import AniMindDuckDBIOManager, DuckDBWarehouse, ParquetExports

    reviews, meta = raw_files
    db = str(animind_env / "animind.duckdb")
    src = {"source": "raw", "reviews_path": str(reviews), "metadata_path": str(meta)}
    res = dg.materialize(
        [beauty_items, beauty_interactions, beauty_interactions_valid],
        resources={
            "io_manager": AniMindDuckDBIOManager(database=db, schema="main"),
            "exports": ParquetExports(root=str(animind_env / "exports")),
        },
        run_config={"ops": {"beauty_items": {"config": src}, "beauty_interactions": {"config": src}}},
    )
    assert res.success
    md = res.asset_materializations_for_node("beauty_items")[0].metadata
    assert md["dagster/row_count"].value == 3 and md["metadata_file_bad_lines"].value == 3
    checks = res.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)
    inter = DuckDBWarehouse(database=db, schema="main").read_table("beauty_interactions")
    assert inter.height == 5 and (animind_env / "exports" / "beauty_interactions.parquet").exists()
