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
  ``reason`` and their ``source_row`` (``input_rows = kept + quarantined``, rows the reader already
  quarantined included); values that were set to null are counted as ``"column:reason"``.
* Every id and integer field is parsed by ``animind_assets.lib.data.ids.parse_id`` (exact, never through
  float64): ``"1"``, ``"1.0"``, ``" 5"`` and REAL ``1.0`` are all id 1; ``1e20``, ``inf``, ``NaN``, ``abc``
  and ``2.5`` are quarantined as ``<column>_<problem>`` (problems: ``ids.PROBLEMS``).
* Duplicates are never overwritten silently: the first row (source order) is kept, later ones are
  quarantined with the row they repeat (``"same as row N"`` / ``"conflicts with row N"``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from animind_assets.lib.data.ids import _NON_FINITE, _NUMBER, id_set, parse_id, parse_ids
from animind_assets.lib.data.sources import QUARANTINE_SCHEMA, empty_frame

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


@dataclass
class CleanResult:
    frame: pl.DataFrame
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA: rows that were dropped, one per row with its reason
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    cleaned_values: dict[str, int] = field(default_factory=dict)  # "column:reason" -> values set to null (kept rows)
    input_rows: int = 0  # rows read from the source = frame.height + quarantine.height (without ``limit``)
    source_rows: int = 0  # rows the source holds (= input_rows unless ``limit`` stopped the scan early)
    limit: int | None = None  # the ``limit`` applied (None = none)

    @property
    def kept_rows(self) -> int:
        return self.frame.height


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
    """(value, problem): exact int64 via ``ids.parse_id``; MAL placeholders (``'Unknown'``, ``''``...) are
    ``'missing'``; other problems: ``ids.PROBLEMS``."""
    if isinstance(value, str) and clean_str(value) is None:
        return None, "missing"
    return parse_id(value)


def parse_float(value: object) -> tuple[float | None, str | None]:
    """(value, problem) with problem None, 'missing', 'not_a_number' or 'not_finite' (decimal text only:
    no ``1_0``, no hex)."""
    text = clean_str(value)
    if text is None:
        return None, "missing"
    if _NON_FINITE.fullmatch(text):
        return None, "not_finite"
    if not _NUMBER.fullmatch(text):
        return None, "not_a_number"
    number = float(text)
    if number != number or number in (float("inf"), float("-inf")):
        return None, "not_finite"
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

    return json.dumps({k: v for k, v in row.items() if k != "source_row" and not k.startswith("_")}, ensure_ascii=False, default=str)[:2000]


def _split_raw(raw: Any) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A raw frame, or a ``RawCatalog`` / ``RawInteractions`` (frame + rows its reader quarantined)."""
    if isinstance(raw, pl.DataFrame):
        frame, rejected = raw, empty_frame(QUARANTINE_SCHEMA)
    else:
        frame, rejected = raw.frame, raw.rejected
    if "source_row" not in frame.columns:
        frame = frame.with_row_index("source_row", offset=1).with_columns(pl.col("source_row").cast(pl.Int64))
    return frame, rejected.select(list(QUARANTINE_SCHEMA)).cast(QUARANTINE_SCHEMA)


def _finish_quarantine(own: list[dict] | pl.DataFrame, rejected: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    if isinstance(own, list):
        own = pl.DataFrame(own, schema=QUARANTINE_SCHEMA, orient="row") if own else empty_frame(QUARANTINE_SCHEMA)
    q = pl.concat([rejected, own.select(list(QUARANTINE_SCHEMA)).cast(QUARANTINE_SCHEMA)], how="vertical").sort("source_row", maintain_order=True)
    return q, dict(Counter(q["reason"].to_list()))


# ----------------------------------------------------------------------------------------- catalog
def clean_anime(raw: Any, include_adult: bool = False, limit: int | None = None) -> CleanResult:
    """Clean a raw catalog (``sources.RawCatalog`` or its frame, see ``sources.CATALOG_COLUMNS``) into
    ``anime_prep`` rows (``ANIME_PREP_SCHEMA``).

    Quarantined with a reason (first match wins): ``anime_id_<problem>`` (missing, not_a_number,
    not_finite, not_integral, out_of_range), ``duplicate_anime_id`` (value: ``"<id> (first at row N)"``),
    ``null_name``, ``adult_excluded`` (unless ``include_adult``); plus whatever the reader quarantined
    (e.g. ``undecodable_text``). Values set to null in kept rows are counted in ``cleaned_values`` as
    ``score|episodes|members:<problem>``, ``...:out_of_range`` and ``synopsis:placeholder``.
    ``limit`` keeps the first N valid rows in source order (after exclusions), for fast demos; rows past
    the limit are not counted (``input_rows`` is then the number of rows examined; ``source_rows`` the
    rows the source holds, so the limit's effect is ``source_rows - input_rows`` rows not read).
    """
    frame, rejected = _split_raw(raw)
    ids, problems = parse_ids(frame["anime_id"])
    rows_out: list[dict] = []
    quarantine: list[dict] = []
    cleaned: Counter[str] = Counter()
    first_row: dict[int, int] = {}
    examined = 0

    def drop(row: dict, reason: str, column: str | None = None, value: object = None) -> None:
        quarantine.append(
            {
                "source_row": row.get("source_row"),
                "reason": reason,
                "column": column,
                "value": None if value is None else str(value)[:200],
                "record": _record(row),
            }
        )

    def int_field(row: dict, col: str, minimum: int = 0) -> int | None:
        value, p = parse_int(row.get(col))
        if p is not None and p != "missing":
            cleaned[f"{col}:{p}"] += 1
        elif value is not None and value < minimum:
            cleaned[f"{col}:out_of_range"] += 1
            value = None
        return value

    for row, anime_id, problem in zip(frame.iter_rows(named=True), ids.to_list(), problems.to_list()):
        examined += 1
        if anime_id is None:
            drop(row, f"anime_id_{problem}", "anime_id", row.get("anime_id"))
            continue
        if anime_id in first_row:
            drop(row, "duplicate_anime_id", "anime_id", f"{anime_id} (first at row {first_row[anime_id]})")
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
        first_row[anime_id] = row.get("source_row")

        score, p = parse_float(row.get("score"))
        if p is not None and p != "missing":
            cleaned[f"score:{p}"] += 1
        elif score is not None and not (1.0 <= score <= 10.0):
            cleaned["score:out_of_range"] += 1
            score = None
        episodes = int_field(row, "episodes")
        members = int_field(row, "members")
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

    out = pl.DataFrame(rows_out, schema=ANIME_PREP_SCHEMA, orient="row") if rows_out else pl.DataFrame(schema=ANIME_PREP_SCHEMA)
    out = out.sort("anime_id")
    qframe, dropped = _finish_quarantine(quarantine, rejected)
    return CleanResult(out, qframe, dropped, dict(cleaned), input_rows=examined + rejected.height,
                       source_rows=frame.height + rejected.height, limit=limit)


def catalog_ids(raw: Any) -> set[int]:
    """Every id the catalog source holds (the known-id set of ``clean_interactions``), parsed with
    ``ids.parse_ids``: the kept rows' ids plus the ids of rows the reader quarantined (e.g.
    ``undecodable_text``), so interactions with those anime count as ``excluded_anime``, not unknown."""
    frame, rejected = _split_raw(raw)
    known = id_set(frame["anime_id"])
    if rejected.height:
        rec_ids = rejected.select(pl.col("record").str.json_path_match("$.anime_id")).to_series()
        known |= id_set(rec_ids)
    return known


# ------------------------------------------------------------------------------------ interactions
_INT_COLUMNS = ["user_id", "anime_id", "score", "watching_status", "watched_episodes"]


def clean_interactions(
    raw: Any,
    known_anime: pl.DataFrame | set[int] | None,
    excluded_anime: set[int] | None = None,
) -> CleanResult:
    """Validate raw interaction rows (``sources.RawInteractions`` or its frame, see
    ``sources.INTERACTION_COLUMNS``) into ``INTERACTIONS_SCHEMA`` rows.

    Every integer field is parsed exactly (``ids.parse_ids``). Quarantined with a reason (first match
    wins): ``user_id_<problem>``, ``anime_id_<problem>``, ``score_<problem>``, ``score_out_of_range``
    (outside 0..10), ``watching_status_<problem>``, ``invalid_status`` (not in {1,2,3,4,6}),
    ``invalid_watched_episodes`` (negative), ``excluded_anime`` (in ``excluded_anime``, e.g. adult titles
    left out of ``anime_prep``), ``unknown_anime`` (not in ``known_anime``), ``duplicate_user_anime``
    (a later row for the same (user, anime): value ``"same as row N"`` or ``"conflicts with row N"``; the
    first row in source order is kept); plus whatever the reader quarantined. ``watched_episodes`` that is
    missing or not an exact integer is set to null and counted in ``cleaned_values`` as
    ``watched_episodes:<problem>``. ``seq`` is the 0-based position of the row within its user's list in
    source order.
    """
    frame, rejected = _split_raw(raw)
    if isinstance(known_anime, pl.DataFrame):
        known = set(known_anime["anime_id"].to_list())
    else:
        known = set(known_anime) if known_anime is not None else None
    excluded = excluded_anime or set()

    parsed = []
    for c in _INT_COLUMNS:
        values, problems = parse_ids(frame[c])
        parsed += [values.alias(f"_{c}"), problems.alias(f"_{c}_problem")]
    df = frame.with_columns(parsed)

    def problem(col: str) -> tuple[pl.Expr, pl.Expr, str]:
        return pl.col(f"_{col}_problem").is_not_null(), pl.concat_str(pl.lit(f"{col}_"), pl.col(f"_{col}_problem")), col

    reasons: list[tuple[pl.Expr, pl.Expr, str]] = [
        problem("user_id"),
        problem("anime_id"),
        problem("score"),
        ((pl.col("_score") < 0) | (pl.col("_score") > 10), pl.lit("score_out_of_range"), "score"),
        problem("watching_status"),
        (~pl.col("_watching_status").is_in(list(VALID_STATUSES)), pl.lit("invalid_status"), "watching_status"),
        (pl.col("_watched_episodes") < 0, pl.lit("invalid_watched_episodes"), "watched_episodes"),
    ]
    if excluded:
        reasons.append((pl.col("_anime_id").is_in(list(excluded)), pl.lit("excluded_anime"), "anime_id"))
    if known is not None:
        reasons.append((~pl.col("_anime_id").is_in(list(known)), pl.lit("unknown_anime"), "anime_id"))

    reason_expr = pl.lit(None, dtype=pl.Utf8)
    column_expr = pl.lit(None, dtype=pl.Utf8)
    value_expr = pl.lit(None, dtype=pl.Utf8)
    for cond, name, col in reversed(reasons):  # first matching reason wins
        hit = cond.fill_null(False)
        reason_expr = pl.when(hit).then(name).otherwise(reason_expr)
        column_expr = pl.when(hit).then(pl.lit(col)).otherwise(column_expr)
        value_expr = pl.when(hit).then(pl.col(col).cast(pl.Utf8)).otherwise(value_expr)
    df = df.with_columns(reason_expr.alias("_reason"), column_expr.alias("_column"), value_expr.alias("_value"))

    valid = df.filter(pl.col("_reason").is_null())
    is_first = valid.select(pl.struct("_user_id", "_anime_id").is_first_distinct()).to_series()
    firsts = valid.filter(is_first).select(
        "_user_id", "_anime_id", pl.col("source_row").alias("_first_row"),
        pl.struct("_score", "_watching_status", "_watched_episodes").alias("_first_vals"),
    )
    duplicates = (
        valid.filter(~is_first)
        .join(firsts, on=["_user_id", "_anime_id"], how="left")
        .with_columns(
            pl.lit("duplicate_user_anime").alias("_reason"),
            pl.lit("anime_id").alias("_column"),
            pl.when(pl.struct("_score", "_watching_status", "_watched_episodes").eq_missing(pl.col("_first_vals")))
            .then(pl.concat_str(pl.lit("same as row "), pl.col("_first_row").cast(pl.Utf8)))
            .otherwise(pl.concat_str(pl.lit("conflicts with row "), pl.col("_first_row").cast(pl.Utf8)))
            .alias("_value"),
        )
        .select(df.columns)
    )
    valid = valid.filter(is_first)
    bad = pl.concat([df.filter(pl.col("_reason").is_not_null()), duplicates], how="vertical")

    cleaned = {
        f"watched_episodes:{k}": v
        for k, v in valid.filter(pl.col("_watched_episodes_problem").is_not_null())
        .group_by("_watched_episodes_problem")
        .len()
        .sort("_watched_episodes_problem")
        .iter_rows()
    }
    out = (
        valid.sort("source_row")
        .select(
            pl.col("_user_id").alias("user_id"),
            pl.col("_anime_id").alias("anime_id"),
            pl.col("_score").alias("score"),
            pl.col("_watching_status").alias("status"),
            pl.col("_watched_episodes").alias("watched_episodes"),
        )
        .with_columns(pl.int_range(pl.len()).over("user_id").cast(pl.Int64).alias("seq"))
        .sort(["user_id", "seq"])
        .cast(INTERACTIONS_SCHEMA)
    )
    raw_cols = [c for c in frame.columns if c != "source_row" and not c.startswith("_")]
    own = bad.select(
        pl.col("source_row").cast(pl.Int64),
        pl.col("_reason").alias("reason"),
        pl.col("_column").alias("column"),
        pl.col("_value").alias("value"),
        pl.struct(raw_cols).struct.json_encode().alias("record"),
    )
    quarantine, dropped = _finish_quarantine(own, rejected)
    return CleanResult(out, quarantine, dropped, cleaned, input_rows=frame.height + rejected.height)
