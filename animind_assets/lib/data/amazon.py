"""Amazon review-data source adapter (McAuley et al. 5-core files and the prepared TIGER/P5 split).

Domain-generic output, the same for every Amazon category:

* items: ``item_id`` Int64 (0..n-1 = rank of the ASIN in sorted ASIN order, the tiger-cf convention),
  ``asin`` Utf8, ``text`` Utf8 (deterministic single line to embed), ``title``/``brand``/``description``
  Utf8, ``categories`` List(Utf8), ``price`` Float64, ``has_text`` Bool.
* interactions: ``user_id`` Int64 (rank of the reviewerID in sorted order), ``item_id`` Int64,
  ``rating`` Float64 (null when the source has none), ``timestamp`` Int64 (unix seconds, null when the
  source has none), ``seq`` Int64 (0-based position in the user's chronological sequence),
  ``reviewer_id`` Utf8 and ``asin`` Utf8 (null when unknown).

Two sources:

* raw Amazon files: reviews (``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``, ...) and metadata
  (``asin``, ``title``, ``brand``, ``categories``, ``price``, ``description``), one record a line, as JSON
  or as Python dict literals (the 2014 metadata files are written with ``str(dict)``: parsed with
  ``ast.literal_eval``, never ``eval``), gzipped or not. Bad lines (not a record, duplicate keys, nesting
  too deep for the parser, RecursionError / MemoryError) are counted with their line numbers and skipped,
  never fatal; bytes that are not UTF-8 are decoded with U+FFFD and the line counted (``invalid_utf8``).
  Rows dropped (no reviewerID / ASIN, repeated pairs) are counted by reason with line numbers, values set
  to null (a rating ``"five"``, a timestamp ``"yesterday"``) per column and reason.
* the prepared split in ``../shared/data/beauty`` (``inter.json`` + ``items.csv`` + optionally
  ``user_sequence.txt``): item ids are tiger-cf's (sorted-ASIN rank). The order inside a user's sequence
  differs between ``inter.json`` and the P5 ``user_sequence.txt`` for ~73 % of users (same-day timestamp
  ties); ``order="inter_json"`` (default) uses inter.json's order, ``order="user_sequence"`` P5's.
  Its ids are positional (rank), so a non-integer user key / item id, a duplicate key or reviewer line is a
  ``SourceError`` naming the file, the line or key, and the value (nothing can be renumbered safely).

Ids and timestamps are parsed exactly by ``animind_assets.lib.data.ids`` (never through float64).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from animind_assets.lib.data.ids import parse_id
from animind_assets.lib.data.amazon_records import FORMATS, MAX_BAD_EXAMPLES, ParseReport, iter_records, open_binary, open_text, read_records, parse_record  # noqa: F401
from animind_assets.lib.data.sources import EmptyResultError, shared_data_dir

ORDERS = ("inter_json", "user_sequence")

ITEMS_SCHEMA = {
    "item_id": pl.Int64,
    "asin": pl.Utf8,
    "text": pl.Utf8,
    "title": pl.Utf8,
    "brand": pl.Utf8,
    "categories": pl.List(pl.Utf8),
    "price": pl.Float64,
    "description": pl.Utf8,
    "has_text": pl.Boolean,
}
INTERACTIONS_SCHEMA = {
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "rating": pl.Float64,
    "timestamp": pl.Int64,
    "seq": pl.Int64,
    "reviewer_id": pl.Utf8,
    "asin": pl.Utf8,
}


def beauty_dir() -> Path:
    """``../shared/data/beauty`` (or ``$ANIMIND_SHARED_DATA/beauty``)."""
    return shared_data_dir() / "beauty"


# ------------------------------------------------------------------------------------------ values
def _clean_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v is not None)
    text = " ".join(str(value).split())
    return text or None


_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _number(value: Any, currency: bool = False) -> tuple[float | None, str | None]:
    """``(float, None)`` or ``(None, problem)``; problem ``missing``, ``not_a_number`` or ``not_finite``.
    ``currency=True`` also reads ``"$1,299.00"``."""
    if value is None:
        return None, "missing"
    if isinstance(value, bool):
        return None, "not_a_number"
    if isinstance(value, (int, float)):
        out = float(value)
        return (out, None) if math.isfinite(out) else (None, "not_finite")
    text = str(value).strip()
    if currency:
        text = text.replace("$", "").replace(",", "").strip()
    if not text:
        return None, "missing"
    if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return None, "not_finite"
    if not _DECIMAL_TEXT.fullmatch(text):
        return None, "not_a_number"
    out = float(text)
    return (out, None) if math.isfinite(out) else (None, "not_finite")


def _to_float(value: Any) -> float | None:
    return _number(value, currency=True)[0]


def _to_int(value: Any) -> int | None:
    """Exact integer (``ids.parse_id``: never through float64) or ``None``."""
    return parse_id(value)[0]


class _Counts:
    """Counter + first line numbers per key (rows dropped by reason, values set to null per column)."""

    def __init__(self, counts: Counter, examples: dict[str, list[int]] | None) -> None:
        self.counts = counts
        self.examples = examples if examples is not None else {}

    def add(self, key: str, lineno: int | None) -> None:
        self.counts[key] += 1
        if lineno is not None:
            ex = self.examples.setdefault(key, [])
            if len(ex) < MAX_BAD_EXAMPLES:
                ex.append(int(lineno))


def flatten_categories(value: Any) -> list[str]:
    """``[['Beauty', 'Makeup', 'Face'], ['Beauty', 'Tools']]`` -> ``['Beauty', 'Makeup', 'Face', 'Tools']``
    (order of first appearance, duplicates dropped). A flat list or a single string also works."""
    out: list[str] = []

    def walk(v: Any) -> None:
        if v is None:
            return
        if isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
            return
        s = _clean_str(v)
        if s and s not in out:
            out.append(s)

    walk(value)
    return out


def item_text(
    title: str | None,
    brand: str | None = None,
    categories: Iterable[str] | None = None,
    price: float | None = None,
    description: str | None = None,
    max_description_chars: int = 0,
) -> str:
    """Deterministic single-line item text in TIGER's spirit (title, brand, categories, price;
    description optional and truncated). Missing fields are left out, never written as 'Unknown'."""
    parts: list[str] = []
    if title:
        parts.append(title.rstrip(". "))
    if brand:
        parts.append(f"Brand: {brand}")
    cats = [c for c in (categories or []) if c]
    if cats:
        parts.append("Categories: " + ", ".join(cats))
    if price is not None:
        parts.append(f"Price: ${price:.2f}")
    if description and max_description_chars > 0:
        d = " ".join(description.split())
        if len(d) > max_description_chars:
            d = d[: max_description_chars - 1].rstrip() + "…"
        parts.append(f"Description: {d}")
    return ". ".join(parts)


# ------------------------------------------------------------------------------------ raw Amazon
@dataclass
class AmazonData:
    items: pl.DataFrame  # ITEMS_SCHEMA
    interactions: pl.DataFrame  # INTERACTIONS_SCHEMA
    origin: str
    order: str  # how seq was decided
    has_timestamps: bool
    reports: list[ParseReport] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows (or pairs) left out
    notes: dict[str, Any] = field(default_factory=dict)
    cleaned_values: dict[str, int] = field(default_factory=dict)  # "file: column:problem" -> values set to null
    examples: dict[str, list[int]] = field(default_factory=dict)  # key of dropped/cleaned_values -> first line numbers


def reviews_frame(
    records: Iterable[tuple[int, dict]],
    dropped: Counter | None = None,
    cleaned: Counter | None = None,
    examples: dict[str, list[int]] | None = None,
) -> pl.DataFrame:
    """Review records -> ``reviewer_id, asin, rating, timestamp, line`` (Utf8, Utf8, Float64, Int64, Int64).

    Rows lacking a reviewer or an ASIN are dropped and counted in ``dropped``; an ``overall`` that is not
    a finite number or a ``unixReviewTime`` that is not an exact integer is set to null and counted in
    ``cleaned`` as ``"reviews: overall:<problem>"`` / ``"reviews: unixReviewTime:<problem>"``; the first
    line numbers of every key go to ``examples``."""
    drops = _Counts(dropped if dropped is not None else Counter(), examples)
    nulls = _Counts(cleaned if cleaned is not None else Counter(), drops.examples)
    rows = {"reviewer_id": [], "asin": [], "rating": [], "timestamp": [], "line": []}
    for lineno, rec in records:
        reviewer = _clean_str(rec.get("reviewerID"))
        asin = _clean_str(rec.get("asin"))
        if not reviewer:
            drops.add("review: missing reviewerID", lineno)
            continue
        if not asin:
            drops.add("review: missing asin", lineno)
            continue
        ts, ts_problem = parse_id(rec.get("unixReviewTime"))
        if ts_problem and ts_problem != "missing":
            nulls.add(f"reviews: unixReviewTime:{ts_problem}", lineno)
        rating, r_problem = _number(rec.get("overall"))
        if r_problem and r_problem != "missing":
            nulls.add(f"reviews: overall:{r_problem}", lineno)
        rows["reviewer_id"].append(reviewer)
        rows["asin"].append(asin)
        rows["rating"].append(rating)
        rows["timestamp"].append(ts)
        rows["line"].append(lineno)
    return pl.DataFrame(
        rows,
        schema={"reviewer_id": pl.Utf8, "asin": pl.Utf8, "rating": pl.Float64, "timestamp": pl.Int64, "line": pl.Int64},
    )


def metadata_frame(
    records: Iterable[tuple[int, dict]],
    dropped: Counter | None = None,
    cleaned: Counter | None = None,
    examples: dict[str, list[int]] | None = None,
) -> pl.DataFrame:
    """Metadata records -> ``asin, title, brand, categories, price, description`` (one row per ASIN,
    first record wins; duplicates and records without an ASIN counted in ``dropped`` with their lines; a
    price that is not a number is set to null and counted as ``"metadata: price:<problem>"``)."""
    drops = _Counts(dropped if dropped is not None else Counter(), examples)
    nulls = _Counts(cleaned if cleaned is not None else Counter(), drops.examples)
    seen: set[str] = set()
    rows = {"asin": [], "title": [], "brand": [], "categories": [], "price": [], "description": []}
    for lineno, rec in records:
        asin = _clean_str(rec.get("asin"))
        if not asin:
            drops.add("metadata: missing asin", lineno)
            continue
        if asin in seen:
            drops.add("metadata: duplicate asin", lineno)
            continue
        seen.add(asin)
        price, p_problem = _number(rec.get("price"), currency=True)
        if p_problem and p_problem != "missing":
            nulls.add(f"metadata: price:{p_problem}", lineno)
        rows["asin"].append(asin)
        rows["title"].append(_clean_str(rec.get("title")))
        rows["brand"].append(_clean_str(rec.get("brand")))
        rows["categories"].append(flatten_categories(rec.get("categories")))
        rows["price"].append(price)
        rows["description"].append(_clean_str(rec.get("description")))
    return pl.DataFrame(
        rows,
        schema={
            "asin": pl.Utf8,
            "title": pl.Utf8,
            "brand": pl.Utf8,
            "categories": pl.List(pl.Utf8),
            "price": pl.Float64,
            "description": pl.Utf8,
        },
    )


def interactions_from_reviews(
    reviews: pl.DataFrame, dropped: Counter | None = None, examples: dict[str, list[int]] | None = None
) -> tuple[pl.DataFrame, list[str]]:
    """Reviews -> (interactions, sorted ASINs). Users/items are numbered by sorted reviewerID/ASIN rank;
    each user's rows are ordered by ``timestamp`` with ties (same day) kept in file order; repeated
    (user, item) pairs keep the first occurrence in that order and are counted."""
    dropped = dropped if dropped is not None else Counter()
    asins = sorted(reviews["asin"].unique().to_list())
    users = sorted(reviews["reviewer_id"].unique().to_list())
    item_ix = pl.DataFrame({"asin": asins, "item_id": list(range(len(asins)))}, schema={"asin": pl.Utf8, "item_id": pl.Int64})
    user_ix = pl.DataFrame(
        {"reviewer_id": users, "user_id": list(range(len(users)))}, schema={"reviewer_id": pl.Utf8, "user_id": pl.Int64}
    )
    df = (
        reviews.join(user_ix, on="reviewer_id", how="left")
        .join(item_ix, on="asin", how="left")
        .sort(["user_id", "timestamp", "line"], nulls_last=True)
    )
    first = df.select(pl.struct("user_id", "item_id").is_first_distinct()).to_series()
    repeated = df.filter(~first)
    if repeated.height:
        key = "review: repeated (user, item) pair"
        dropped[key] += repeated.height
        if examples is not None:
            examples.setdefault(key, []).extend(sorted(repeated["line"].to_list())[:MAX_BAD_EXAMPLES])
    df = df.filter(first)
    df = df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("user_id").alias("seq"))
    out = df.select(list(INTERACTIONS_SCHEMA)).cast(INTERACTIONS_SCHEMA)
    return out, asins


def build_items(asins: list[str], meta: pl.DataFrame | None, max_description_chars: int = 0) -> pl.DataFrame:
    """One row per ASIN (``item_id`` = position in ``asins``), joined with metadata where present."""
    base = pl.DataFrame({"item_id": list(range(len(asins))), "asin": asins}, schema={"item_id": pl.Int64, "asin": pl.Utf8})
    if meta is None:
        meta = pl.DataFrame(schema={k: v for k, v in ITEMS_SCHEMA.items() if k not in ("item_id", "text", "has_text")})
    df = base.join(meta, on="asin", how="left")
    texts = [
        item_text(r["title"], r["brand"], r["categories"], r["price"], r["description"], max_description_chars)
        for r in df.iter_rows(named=True)
    ]
    df = df.with_columns(
        pl.Series("text", texts, dtype=pl.Utf8),
        pl.col("categories").fill_null(pl.lit([], dtype=pl.List(pl.Utf8))),
    )
    df = df.with_columns((pl.col("text").str.len_chars() > 0).alias("has_text"))
    return df.select(list(ITEMS_SCHEMA)).cast(ITEMS_SCHEMA)


def load_raw_amazon(
    reviews_path: str | os.PathLike,
    metadata_path: str | os.PathLike | None = None,
    fmt: str = "auto",
    max_description_chars: int = 0,
) -> AmazonData:
    """Raw 5-core reviews (+ optional metadata) -> items and interactions."""
    dropped: Counter = Counter()
    cleaned: Counter = Counter()
    examples: dict[str, list[int]] = {}
    reviews_report = ParseReport(str(reviews_path))
    reviews = reviews_frame(iter_records(reviews_path, fmt, reviews_report), dropped, cleaned, examples)
    if reviews.height == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))
        raise EmptyResultError(
            f"source has 0 usable reviews: {reviews_report.summary()}" + (f"; dropped: {reasons}" if reasons else "")
        )
    interactions, asins = interactions_from_reviews(reviews, dropped, examples)
    reports = [reviews_report]
    meta = None
    notes: dict[str, Any] = {}
    if metadata_path:
        meta_report = ParseReport(str(metadata_path))
        meta = metadata_frame(iter_records(metadata_path, fmt, meta_report), dropped, cleaned, examples)
        reports.append(meta_report)
        known = set(meta["asin"].to_list())
        notes["items_without_metadata"] = sum(1 for a in asins if a not in known)
        notes["metadata_rows_not_reviewed"] = len(known - set(asins))
    items = build_items(asins, meta, max_description_chars)
    has_ts = interactions["timestamp"].null_count() < interactions.height
    return AmazonData(
        items=items,
        interactions=interactions,
        origin=f"raw Amazon: {reviews_path}" + (f" + {metadata_path}" if metadata_path else ""),
        order="unixReviewTime, ties in file order",
        has_timestamps=bool(has_ts),
        reports=reports,
        dropped=dict(dropped),
        notes=notes,
        cleaned_values=dict(cleaned),
        examples=examples,
    )


def sequences_from_interactions(interactions: pl.DataFrame, user_col: str = "user_id", item_col: str = "item_id") -> dict[int, list[int]]:
    """``{user: [item, ...]}`` in ``seq`` order."""
    missing = [c for c in (user_col, item_col, "seq") if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions frame lacks columns {missing} (have {interactions.columns})")
    grouped = interactions.sort([user_col, "seq"]).group_by(user_col, maintain_order=True).agg(pl.col(item_col))
    return {int(u): [int(x) for x in items] for u, items in grouped.iter_rows()}

