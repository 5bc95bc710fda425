"""The prepared Amazon split (``inter.json`` + ``items.csv`` as published with TIGER reproductions): exact ids,
errors naming file, line and value. No Dagster."""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from animind_assets.lib.data.ids import parse_id, parse_ids
from animind_assets.lib.data.amazon import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, ORDERS, AmazonData, beauty_dir
from animind_assets.lib.data.amazon_records import open_binary
from animind_assets.lib.data.sources import EmptyResultError, SourceError, read_csv_table



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
