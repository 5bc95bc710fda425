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

import ast
import gzip
import json
import math
import os
import re
import zlib
from decimal import Decimal
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from animind_assets.lib.data.ids import parse_id, parse_ids
from animind_assets.lib.data.sources import EmptyResultError, SourceError, read_csv_table, shared_data_dir

ORDERS = ("inter_json", "user_sequence")
FORMATS = ("auto", "json", "python")
MAX_BAD_EXAMPLES = 20

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


# ------------------------------------------------------------------------------------- line parsing
@dataclass
class ParseReport:
    """What happened to every line of one file: parsed, blank, or bad (with line numbers)."""

    path: str
    lines: int = 0
    parsed: int = 0
    blank: int = 0
    bad: int = 0
    json_lines: int = 0
    python_lines: int = 0
    bad_examples: list[tuple[int, str]] = field(default_factory=list)  # (1-based line, reason)
    # decoding problems in lines that were still parsed: "invalid_utf8" (bytes replaced by U+FFFD),
    # "replacement_character" (U+FFFD already in the file) -> count, with the first line numbers
    decode_issues: dict[str, int] = field(default_factory=dict)
    decode_examples: dict[str, list[int]] = field(default_factory=dict)

    def add_bad(self, lineno: int, reason: str) -> None:
        self.bad += 1
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            self.bad_examples.append((lineno, reason[:200]))

    def add_decode_issue(self, lineno: int, kind: str) -> None:
        self.decode_issues[kind] = self.decode_issues.get(kind, 0) + 1
        ex = self.decode_examples.setdefault(kind, [])
        if len(ex) < MAX_BAD_EXAMPLES:
            ex.append(lineno)

    def summary(self) -> str:
        text = (
            f"{self.path}: {self.lines} lines, {self.parsed} parsed "
            f"({self.json_lines} JSON, {self.python_lines} Python literal), {self.blank} blank, {self.bad} bad"
        )
        if self.bad_examples:
            text += "; bad lines: " + ", ".join(f"{n} ({r})" for n, r in self.bad_examples[:5])
        for kind, n in sorted(self.decode_issues.items()):
            text += f"; {kind} {n} (lines {', '.join(map(str, self.decode_examples.get(kind, [])[:5]))})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "lines": self.lines,
            "parsed": self.parsed,
            "blank": self.blank,
            "bad": self.bad,
            "json_lines": self.json_lines,
            "python_lines": self.python_lines,
            "bad_examples": [list(x) for x in self.bad_examples],
            "decode_issues": dict(self.decode_issues),
            "decode_examples": {k: list(v) for k, v in self.decode_examples.items()},
        }


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _checked_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"Amazon file not found: {p.resolve()}")
    if not p.is_file():
        raise SourceError(f"Amazon path is not a file: {p.resolve()}")
    return p


def open_binary(path: str | os.PathLike) -> Any:
    """Open a file for reading bytes, transparently gunzipping it (by magic bytes, not by suffix)."""
    p = _checked_path(path)
    return gzip.open(p, "rb") if _is_gzip(p) else open(p, "rb")


def open_text(path: str | os.PathLike) -> Any:
    """Open a text file (UTF-8, strict: undecodable bytes raise ``UnicodeDecodeError``), transparently
    gunzipping it (by magic bytes, not by suffix)."""
    p = _checked_path(path)
    if _is_gzip(p):
        return gzip.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, OSError)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"duplicate key {k!r}")
        out[k] = v
    return out


def _literal_dict(line: str) -> Any:
    """``ast.literal_eval`` of one line, refusing dict literals that repeat a key."""
    tree = ast.parse(line, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if dup is not None:
                raise _DuplicateKey(f"duplicate key {dup!r}")
    return ast.literal_eval(tree)


def parse_record(line: str, fmt: str = "auto") -> tuple[dict, str]:
    """One line -> (dict, "json" | "python"). Raises ``ValueError`` on anything that is not a dict.

    Python literals are parsed with ``ast.literal_eval`` (literals only: no names, calls or attribute
    access can run).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}; expected one of {FORMATS}")
    errors = []
    if fmt in ("auto", "json"):
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            if isinstance(obj, dict):
                return obj, "json"
            errors.append(f"JSON value is {type(obj).__name__}, not an object")
        except _DuplicateKey as exc:
            raise ValueError(f"JSON: {exc}") from None  # valid JSON with a repeated key: never guess which wins
        except json.JSONDecodeError as exc:
            errors.append(f"JSON: {exc.msg}")
        except (RecursionError, MemoryError) as exc:  # nesting too deep for the parser
            errors.append(f"JSON: {type(exc).__name__} (nesting too deep or value too large)")
    if fmt in ("auto", "python"):
        try:
            obj = _literal_dict(line)
            if isinstance(obj, dict):
                return obj, "python"
            errors.append(f"Python literal is {type(obj).__name__}, not a dict")
        except _DuplicateKey as exc:
            errors.append(f"Python literal: {exc}")
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            errors.append(f"Python literal: {type(exc).__name__}: {str(exc)[:80]}")
    raise ValueError("; ".join(errors) or "unparseable")


def iter_records(path: str | os.PathLike, fmt: str = "auto", report: ParseReport | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for every parseable line; bad lines go to ``report``."""
    report = report if report is not None else ParseReport(str(path))
    lineno = 0
    with open_binary(path) as fh:
        lines = iter(fh)
        while True:
            try:
                raw_bytes = next(lines)
            except StopIteration:
                break
            except _GZIP_ERRORS as exc:
                raise SourceError(f"{path}: corrupt or truncated after line {lineno} ({type(exc).__name__}: {exc})") from exc
            lineno += 1
            report.lines += 1
            try:
                raw = raw_bytes.decode("utf-8")
                if "\ufffd" in raw:
                    report.add_decode_issue(lineno, "replacement_character")
            except UnicodeDecodeError:
                raw = raw_bytes.decode("utf-8", errors="replace")
                report.add_decode_issue(lineno, "invalid_utf8")
            line = raw.strip()
            if not line:
                report.blank += 1
                continue
            try:
                rec, kind = parse_record(line, fmt)
            except (ValueError, RecursionError, MemoryError) as exc:
                report.add_bad(lineno, str(exc) or type(exc).__name__)
                continue
            report.parsed += 1
            if kind == "json":
                report.json_lines += 1
            else:
                report.python_lines += 1
            yield lineno, rec


def read_records(path: str | os.PathLike, fmt: str = "auto") -> tuple[list[tuple[int, dict]], ParseReport]:
    report = ParseReport(str(path))
    records = list(iter_records(path, fmt, report))
    return records, report


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


# ------------------------------------------------------------------------------- prepared split
def read_user_sequences(path: str | os.PathLike) -> dict[str, list[str]]:
    """P5 ``user_sequence.txt``: ``reviewerID ASIN1 ASIN2 ...`` per line (chronological)."""
    out: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    with open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SourceError(f"{path}: line {lineno} is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise SourceError(f"{path}: line {lineno} has a reviewer but no item")
            if parts[0] in out:
                raise SourceError(
                    f"{path}: line {lineno}: reviewer {parts[0]!r} already listed on line {first_line[parts[0]]} "
                    "(one line per reviewer expected)"
                )
            out[parts[0]] = parts[1:]
            first_line[parts[0]] = lineno
    return out


def _json_line_of(text: str, key: str) -> int | None:
    """1-based line where ``"key":`` first appears in a JSON text (for error messages)."""
    m = re.search(r'"' + re.escape(json.dumps(key)[1:-1]) + r'"\s*:', text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid item id")


def _read_inter_json(path: Path) -> dict[int, list[Any]]:
    """``inter.json`` -> ``{user_index: [raw item ids]}``. Every key must be an exact integer (parsed by
    ``ids.parse_id``) and unique; numbers stay exact (``Decimal``, never float). Raises ``SourceError``
    naming the file, the line and the key otherwise."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    pairs_seen: list[list[tuple[str, Any]]] = []

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict:
        pairs_seen.append(pairs)
        return dict(pairs)

    try:
        obj = json.loads(text, object_pairs_hook=keep_pairs, parse_float=Decimal, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except ValueError as exc:
        raise SourceError(f"{path}: {exc}") from exc
    except (RecursionError, MemoryError) as exc:
        raise SourceError(f"{path}: JSON nested too deeply or too large to parse ({type(exc).__name__})") from exc
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: expected an object {{user_index: [item ids]}}, found {type(obj).__name__}")
    top = pairs_seen[-1]  # the outermost object is finished last
    out: dict[int, list[Any]] = {}
    for key, seq in top:
        user, problem = parse_id(key)
        if problem:
            raise SourceError(
                f"{path}: line {_json_line_of(text, key)}: user key {key!r} is not an integer user index ({problem})"
            )
        if user in out:
            raise SourceError(f"{path}: line {_json_line_of(text, key)}: user key {key!r} repeats user {user} (duplicate key)")
        out[user] = seq
    return out


def _read_items_csv(path: Path) -> pl.DataFrame:
    """``items.csv`` (``item_id,asin,text``) -> frame with ``item_id`` Int64 parsed exactly. Ids are
    positional (0..n-1), so any unreadable row or non-integer id is a ``SourceError`` naming the line,
    the column and the value."""
    table = read_csv_table(path, {"item_id": "item_id", "asin": "asin", "text": "text"}, "items")
    if table.rejected.height:
        bad = table.rejected.row(0, named=True)
        raise SourceError(
            f"{path}: data row {bad['source_row']} unreadable ({bad['reason']}: {bad['value']}); "
            f"item ids are positional, so no row can be skipped"
        )
    ids, problems = parse_ids(table.frame["item_id"])
    bad_at = problems.is_not_null().arg_true()
    if len(bad_at):
        i = int(bad_at[0])
        raise SourceError(
            f"{path}: line {table.line_of(i)}, column 'item_id': value {table.frame['item_id'][i]!r} is not an integer id "
            f"({problems[i]}); {len(bad_at)} such row(s)"
        )
    frame = table.frame.with_columns(ids.alias("item_id")).select("item_id", "asin", "text")
    n = frame.height
    wrong = (frame["item_id"] != pl.int_range(n, eager=True)).arg_true()
    if len(wrong):
        i = int(wrong[0])
        raise SourceError(
            f"{path}: item_id must be 0..{n - 1} in order; line {table.line_of(i)} has {frame['item_id'][i]} where {i} is expected"
        )
    return frame


def load_prepared_split(folder: str | os.PathLike | None = None, order: str = "inter_json") -> AmazonData:
    """The prepared TIGER/P5 split: ``inter.json`` (+ ``items.csv``, + ``user_sequence.txt`` when present).

    ``user_id`` = inter.json's user index (= rank of the reviewerID in sorted order); ``item_id`` =
    tiger-cf's id (= rank of the ASIN in sorted order). ``rating``/``timestamp`` are null (not shipped).
    ``reviewer_id`` is filled from ``user_sequence.txt`` (sorted rank) when that file is present, and the
    per-user item multisets of both files are checked against each other.
    """
    if order not in ORDERS:
        raise SourceError(f"order={order!r}; expected one of {ORDERS}")
    folder = Path(folder) if folder else beauty_dir()
    inter_path = folder / "inter.json"
    items_path = folder / "items.csv"
    seq_path = folder / "user_sequence.txt"
    for p in (inter_path, items_path):
        if not p.exists():
            raise SourceError(f"prepared Amazon split: {p} not found")
    inter = _read_inter_json(inter_path)
    items_raw = _read_items_csv(items_path).with_columns(pl.col("text").fill_null(""))
    n_items = items_raw.height
    if n_items == 0:
        raise EmptyResultError(f"prepared Amazon split: source has 0 rows ({items_path})")
    if not inter:
        raise EmptyResultError(f"prepared Amazon split: source has 0 rows ({inter_path} holds no user)")
    asin_of = items_raw["asin"].to_list()

    dropped: Counter = Counter()
    users = sorted(inter)
    sequences: dict[int, list[int]] = {}
    for u in users:
        seq = inter[u]
        if not isinstance(seq, list) or not seq:
            dropped["inter.json: user with empty/non-list sequence"] += 1
            continue
        parsed = [parse_id(x) for x in seq]
        not_int = [(x, p) for x, (_, p) in zip(seq, parsed) if p]
        if not_int:
            raise SourceError(
                f"{inter_path}: user {u} (line {_json_line_of(inter_path.read_text(encoding='utf-8'), str(u))}): "
                f"item id {not_int[0][0]!r} is not an integer ({not_int[0][1]})"
            )
        ids = [v for v, _ in parsed]
        bad = [x for x in ids if not 0 <= x < n_items]
        if bad:
            raise SourceError(f"{inter_path}: user {u} has item ids outside items.csv (0..{n_items - 1}): {bad[:5]}")
        sequences[u] = ids

    notes: dict[str, Any] = {}
    reviewer_of: dict[int, str] = {}
    if seq_path.exists():
        p5 = read_user_sequences(seq_path)
        reviewers = sorted(p5)
        if len(reviewers) == len(users):
            reviewer_of = {u: reviewers[i] for i, u in enumerate(users)}
            row_of = {a: i for i, a in enumerate(asin_of)}
            same_set = same_order = same_last = 0
            for u, seq in sequences.items():
                p5_ids = [row_of.get(a, -1) for a in p5[reviewer_of[u]]]
                same_set += Counter(p5_ids) == Counter(seq)
                same_order += p5_ids == seq
                same_last += p5_ids[-1] == seq[-1]
                if order == "user_sequence" and Counter(p5_ids) == Counter(seq):
                    sequences[u] = p5_ids
            n = max(1, len(sequences))
            notes.update(
                {
                    "user_sequence_same_item_multiset_pct": round(100.0 * same_set / n, 2),
                    "user_sequence_same_order_pct": round(100.0 * same_order / n, 2),
                    "user_sequence_same_last_item_pct": round(100.0 * same_last / n, 2),
                }
            )
        else:
            notes["user_sequence_mismatch"] = f"{len(reviewers)} reviewers vs {len(users)} users: reviewer ids not filled"
    elif order == "user_sequence":
        raise SourceError(f"order='user_sequence' needs {seq_path}")

    uids, iids, seqs = [], [], []
    for u, seq in sequences.items():
        uids.extend([u] * len(seq))
        iids.extend(seq)
        seqs.extend(range(len(seq)))
    interactions = pl.DataFrame(
        {
            "user_id": uids,
            "item_id": iids,
            "rating": [None] * len(uids),
            "timestamp": [None] * len(uids),
            "seq": seqs,
            "reviewer_id": [reviewer_of.get(u) for u in uids],
            "asin": [asin_of[i] for i in iids],
        },
        schema=INTERACTIONS_SCHEMA,
    )
    before = interactions.height
    interactions = interactions.unique(subset=["user_id", "item_id"], keep="first", maintain_order=True)
    if before - interactions.height:
        dropped["inter.json: repeated (user, item) pair"] += before - interactions.height
        interactions = interactions.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("user_id").alias("seq"))

    items = items_raw.with_columns(
        pl.col("text").alias("title"),
        pl.lit(None, dtype=pl.Utf8).alias("brand"),
        pl.lit([], dtype=pl.List(pl.Utf8)).alias("categories"),
        pl.lit(None, dtype=pl.Float64).alias("price"),
        pl.lit(None, dtype=pl.Utf8).alias("description"),
        (pl.col("text").str.len_chars() > 0).alias("has_text"),
    ).with_columns(pl.when(pl.col("title") == "").then(None).otherwise(pl.col("title")).alias("title"))
    items = items.select(list(ITEMS_SCHEMA)).cast(ITEMS_SCHEMA)
    order_text = (
        "inter.json order (tiger-cf; chronological, same-day ties as tiger-cf broke them)"
        if order == "inter_json"
        else "user_sequence.txt order (P5; chronological, same-day ties as P5 broke them)"
    )
    return AmazonData(
        items=items,
        interactions=interactions,
        origin=f"prepared split: {folder}",
        order=order_text,
        has_timestamps=False,
        reports=[],
        dropped=dict(dropped),
        notes=notes,
    )


def sequences_from_interactions(interactions: pl.DataFrame, user_col: str = "user_id", item_col: str = "item_id") -> dict[int, list[int]]:
    """``{user: [item, ...]}`` in ``seq`` order."""
    missing = [c for c in (user_col, item_col, "seq") if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions frame lacks columns {missing} (have {interactions.columns})")
    grouped = interactions.sort([user_col, "seq"]).group_by(user_col, maintain_order=True).agg(pl.col(item_col))
    return {int(u): [int(x) for x in items] for u, items in grouped.iter_rows()}
