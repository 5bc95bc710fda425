"""Cleaning of raw catalog and interaction frames into ``anime_prep`` and ``user_interactions``.

Rules (improving on the original AniMind prep):

* ``'Unknown'``, ``'nan'``, ``'None'``, ``'N/A'``, empty/whitespace strings and MAL placeholder synopses
  ("No synopsis information has been added to this title…", "No synopsis has been added for this series
  yet…") are *missing*: they are null in the table and left out of ``anime_text`` (never written as
  'Unknown').
* ``anime_text`` is a deterministic single line made of content fields only: no ids, no popularity
  counters (members, score).
* Adult titles (rating ``Rx - Hentai``) are excluded by default (``include_adult=True`` keeps them).
* Nothing is lost silently: rows that cannot be kept are returned in a quarantine frame with a
  ``reason`` and their ``source_row``; values that were cleaned (non-numeric or out of range) are counted
  by column and reason.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import polars as pl

MISSING_TOKENS = {"", "unknown", "nan", "none", "null", "n/a", "na", "-", "?"}
PLACEHOLDER_SYNOPSIS = re.compile(
    r"^\s*(no synopsis (information )?(has been|yet)|no synopsis available|synopsis not available)",
    re.IGNORECASE,
)
ADULT_RATINGS = ("Rx - Hentai",)
ADULT_GENRE = "Hentai"  # catalogs without a rating column (the demo) mark adult titles by genre
VALID_STATUSES = {1: "watching", 2: "completed", 3: "on_hold", 4: "dropped", 6: "plan_to_watch"}
CORE_FIELDS = ["genres", "type", "episodes", "year", "studios", "source"]

ANIME_PREP_SCHEMA = {
    "anime_id": pl.Int64,
    "name": pl.Utf8,
    "english_name": pl.Utf8,
    "title": pl.Utf8,
    "genres": pl.List(pl.Utf8),
    "synopsis": pl.Utf8,
    "type": pl.Utf8,
    "episodes": pl.Int64,
    "year": pl.Int64,
    "premiered": pl.Utf8,
    "studios": pl.List(pl.Utf8),
    "source": pl.Utf8,
    "rating": pl.Utf8,
    "score": pl.Float64,
    "members": pl.Int64,
    "has_synopsis": pl.Boolean,
    "missing_core_fields": pl.List(pl.Utf8),
    "anime_text": pl.Utf8,
}
INTERACTIONS_SCHEMA = {
    "user_id": pl.Int64,
    "anime_id": pl.Int64,
    "score": pl.Int64,
    "status": pl.Int64,
    "watched_episodes": pl.Int64,
    "seq": pl.Int64,
}
QUARANTINE_SCHEMA = {"source_row": pl.Int64, "reason": pl.Utf8, "column": pl.Utf8, "value": pl.Utf8, "record": pl.Utf8}


@dataclass
class CleanResult:
    frame: pl.DataFrame
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA: rows that were dropped, one per row with its reason
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    cleaned_values: dict[str, int] = field(default_factory=dict)  # "column:reason" -> count (kept rows)
    input_rows: int = 0


# ------------------------------------------------------------------------------------------ helpers
def clean_str(value: object) -> str | None:
    if value is None:
        return None
    text = re.sub(r"\s+", " ", str(value)).strip()
    if text.casefold() in MISSING_TOKENS:
        return None
    return text


def clean_synopsis(value: object) -> str | None:
    text = clean_str(value)
    if text is None or PLACEHOLDER_SYNOPSIS.match(text):
        return None
    return text


def split_list(value: object) -> list[str]:
    text = clean_str(value)
    if text is None:
        return []
    out: list[str] = []
    for part in text.split(","):
        item = clean_str(part)
        if item is not None and item not in out:
            out.append(item)
    return out


def parse_int(value: object) -> tuple[int | None, str | None]:
    """(value, problem) where problem is None, 'missing' or 'non_numeric'."""
    text = clean_str(value)
    if text is None:
        return None, "missing"
    try:
        as_float = float(text)
    except ValueError:
        return None, "non_numeric"
    if as_float != as_float or as_float in (float("inf"), float("-inf")) or not as_float.is_integer():
        return None, "non_numeric"
    return int(as_float), None


def parse_float(value: object) -> tuple[float | None, str | None]:
    text = clean_str(value)
    if text is None:
        return None, "missing"
    try:
        number = float(text)
    except ValueError:
        return None, "non_numeric"
    if number != number or number in (float("inf"), float("-inf")):
        return None, "non_numeric"
    return number, None


_YEAR = re.compile(r"(19[0-9]{2}|20[0-9]{2})")


def parse_year(premiered: str | None) -> int | None:
    if not premiered:
        return None
    m = _YEAR.search(premiered)
    return int(m.group(1)) if m else None


def build_anime_text(row: dict) -> str:
    """Deterministic single-line text of an anime's content fields (missing fields left out)."""
    parts: list[str] = [f"Title: {row['name']}."]
    if row.get("english_name") and row["english_name"] != row["name"]:
        parts.append(f"English title: {row['english_name']}.")
    if row.get("type"):
        parts.append(f"Type: {row['type']}.")
    if row.get("genres"):
        parts.append(f"Genres: {', '.join(row['genres'])}.")
    if row.get("episodes"):
        parts.append(f"Episodes: {row['episodes']}.")
    if row.get("premiered"):
        parts.append(f"Premiered: {row['premiered']}.")
    elif row.get("year"):
        parts.append(f"Year: {row['year']}.")
    if row.get("studios"):
        parts.append(f"Studios: {', '.join(row['studios'])}.")
    if row.get("source"):
        parts.append(f"Source: {row['source']}.")
    if row.get("rating"):
        parts.append(f"Rating: {row['rating']}.")
    if row.get("synopsis"):
        parts.append(f"Synopsis: {row['synopsis']}")
    return re.sub(r"\s+", " ", " ".join(parts)).strip()


def _record(row: dict) -> str:
    import json

    return json.dumps({k: v for k, v in row.items() if k != "source_row"}, ensure_ascii=False, default=str)[:2000]


# ----------------------------------------------------------------------------------------- catalog
def clean_anime(raw: pl.DataFrame, include_adult: bool = False, limit: int | None = None) -> CleanResult:
    """Clean a raw catalog frame (see ``sources.CATALOG_COLUMNS``) into ``anime_prep`` rows.

    ``limit`` keeps the first N valid rows in source order (after exclusions), for fast demos.
    """
    if "source_row" not in raw.columns:
        raw = raw.with_row_index("source_row", offset=1).with_columns(pl.col("source_row").cast(pl.Int64))
    rows_out: list[dict] = []
    quarantine: list[dict] = []
    dropped: Counter[str] = Counter()
    cleaned: Counter[str] = Counter()
    seen_ids: set[int] = set()

    def drop(row: dict, reason: str, column: str | None = None, value: object = None) -> None:
        dropped[reason] += 1
        quarantine.append(
            {
                "source_row": row.get("source_row"),
                "reason": reason,
                "column": column,
                "value": None if value is None else str(value)[:200],
                "record": _record(row),
            }
        )

    for row in raw.iter_rows(named=True):
        anime_id, problem = parse_int(row.get("anime_id"))
        if anime_id is None:
            drop(row, "invalid_anime_id", "anime_id", row.get("anime_id"))
            continue
        if anime_id in seen_ids:
            drop(row, "duplicate_anime_id", "anime_id", anime_id)
            continue
        name = clean_str(row.get("name"))
        if name is None:
            drop(row, "null_name", "name", row.get("name"))
            continue
        rating = clean_str(row.get("rating"))
        genres = split_list(row.get("genres"))
        if not include_adult and (rating in ADULT_RATINGS or ADULT_GENRE in genres):
            drop(row, "adult_excluded", "rating" if rating in ADULT_RATINGS else "genres", rating or ADULT_GENRE)
            continue
        seen_ids.add(anime_id)

        score, p = parse_float(row.get("score"))
        if p == "non_numeric":
            cleaned["score:non_numeric"] += 1
        elif score is not None and not (1.0 <= score <= 10.0):
            cleaned["score:out_of_range"] += 1
            score = None
        episodes, p = parse_int(row.get("episodes"))
        if p == "non_numeric":
            cleaned["episodes:non_numeric"] += 1
        elif episodes is not None and episodes < 0:
            cleaned["episodes:out_of_range"] += 1
            episodes = None
        members, p = parse_int(row.get("members"))
        if p == "non_numeric":
            cleaned["members:non_numeric"] += 1
        elif members is not None and members < 0:
            cleaned["members:out_of_range"] += 1
            members = None
        raw_syn = row.get("synopsis")
        synopsis = clean_synopsis(raw_syn)
        if synopsis is None and clean_str(raw_syn) is not None:
            cleaned["synopsis:placeholder"] += 1
        english = clean_str(row.get("english_name"))
        premiered = clean_str(row.get("premiered"))
        rec = {
            "anime_id": anime_id,
            "name": name,
            "english_name": english,
            "title": english or name,
            "genres": genres,
            "synopsis": synopsis,
            "type": clean_str(row.get("type")),
            "episodes": episodes,
            "year": parse_year(premiered),
            "premiered": premiered,
            "studios": split_list(row.get("studios")),
            "source": clean_str(row.get("source")),
            "rating": rating,
            "score": score,
            "members": members,
            "has_synopsis": synopsis is not None,
        }
        rec["missing_core_fields"] = [f for f in CORE_FIELDS if rec.get(f) in (None, [], "")]
        rec["anime_text"] = build_anime_text(rec)
        rows_out.append(rec)
        if limit is not None and len(rows_out) >= limit:
            break

    frame = pl.DataFrame(rows_out, schema=ANIME_PREP_SCHEMA, orient="row") if rows_out else pl.DataFrame(schema=ANIME_PREP_SCHEMA)
    frame = frame.sort("anime_id")
    qframe = pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA, orient="row") if quarantine else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    return CleanResult(frame, qframe, dict(dropped), dict(cleaned), input_rows=raw.height)


# ------------------------------------------------------------------------------------ interactions
def clean_interactions(
    raw: pl.DataFrame,
    known_anime: pl.DataFrame | set[int] | None,
    excluded_anime: set[int] | None = None,
) -> CleanResult:
    """Validate raw interaction rows (see ``sources.INTERACTION_COLUMNS``).

    Quarantined with a reason: non-numeric ids, scores or statuses; scores outside 0..10; statuses not in
    {1,2,3,4,6}; negative episode counts; duplicate (user, anime) pairs (first kept); interactions for anime
    excluded by ``anime_prep`` (e.g. adult titles: ``excluded_anime``) or not in the catalog at all.
    ``seq`` is the 0-based position of the row within its user's list in source order.
    """
    if "source_row" not in raw.columns:
        raw = raw.with_row_index("source_row", offset=1).with_columns(pl.col("source_row").cast(pl.Int64))
    if isinstance(known_anime, pl.DataFrame):
        known = set(known_anime["anime_id"].to_list())
    else:
        known = set(known_anime) if known_anime is not None else None
    excluded = excluded_anime or set()

    df = raw.with_columns(
        [
            pl.col(c).str.strip_chars().cast(pl.Float64, strict=False).alias(f"_{c}")
            for c in ["user_id", "anime_id", "score", "watching_status", "watched_episodes"]
        ]
    )
    reasons: list[tuple[str, str, pl.Expr]] = []
    for col in ["user_id", "anime_id", "score", "watching_status"]:
        reasons.append((f"non_numeric_{col}", col, pl.col(f"_{col}").is_null() | (pl.col(f"_{col}") != pl.col(f"_{col}").round(0))))
    reasons.append(("score_out_of_range", "score", (pl.col("_score") < 0) | (pl.col("_score") > 10)))
    reasons.append(("invalid_status", "watching_status", ~pl.col("_watching_status").is_in(list(VALID_STATUSES))))
    reasons.append(("invalid_watched_episodes", "watched_episodes", pl.col("_watched_episodes") < 0))
    if excluded:
        reasons.append(("excluded_anime", "anime_id", pl.col("_anime_id").is_in(list(excluded))))
    if known is not None:
        reasons.append(("unknown_anime", "anime_id", ~pl.col("_anime_id").is_in(list(known))))

    reason_expr = pl.lit(None, dtype=pl.Utf8)
    column_expr = pl.lit(None, dtype=pl.Utf8)
    value_expr = pl.lit(None, dtype=pl.Utf8)
    for name, col, cond in reversed(reasons):  # first matching reason wins
        hit = cond.fill_null(False)
        reason_expr = pl.when(hit).then(pl.lit(name)).otherwise(reason_expr)
        column_expr = pl.when(hit).then(pl.lit(col)).otherwise(column_expr)
        value_expr = pl.when(hit).then(pl.col(col)).otherwise(value_expr)
    df = df.with_columns(reason_expr.alias("_reason"), column_expr.alias("_column"), value_expr.alias("_value"))

    valid = df.filter(pl.col("_reason").is_null())
    dup_mask = valid.select(pl.struct("_user_id", "_anime_id").is_duplicated() & ~pl.struct("_user_id", "_anime_id").is_first_distinct()).to_series()
    duplicates = valid.filter(dup_mask).with_columns(
        pl.lit("duplicate_user_anime").alias("_reason"), pl.lit("anime_id").alias("_column"), pl.col("anime_id").alias("_value")
    )
    valid = valid.filter(~dup_mask)
    bad = pl.concat([df.filter(pl.col("_reason").is_not_null()), duplicates], how="vertical")

    out = (
        valid.sort("source_row")
        .select(
            pl.col("_user_id").cast(pl.Int64).alias("user_id"),
            pl.col("_anime_id").cast(pl.Int64).alias("anime_id"),
            pl.col("_score").cast(pl.Int64).alias("score"),
            pl.col("_watching_status").cast(pl.Int64).alias("status"),
            pl.col("_watched_episodes").fill_nan(None).cast(pl.Int64, strict=False).fill_null(0).alias("watched_episodes"),
        )
        .with_columns(pl.int_range(pl.len()).over("user_id").cast(pl.Int64).alias("seq"))
        .sort(["user_id", "seq"])
    )
    raw_cols = [c for c in raw.columns if c != "source_row"]
    quarantine = bad.select(
        pl.col("source_row").cast(pl.Int64),
        pl.col("_reason").alias("reason"),
        pl.col("_column").alias("column"),
        pl.col("_value").alias("value"),
        pl.struct(raw_cols).struct.json_encode().alias("record"),
    ).select(list(QUARANTINE_SCHEMA))
    dropped = dict(Counter(quarantine["reason"].to_list()))
    return CleanResult(out, quarantine.sort("source_row"), dropped, {}, input_rows=raw.height)
