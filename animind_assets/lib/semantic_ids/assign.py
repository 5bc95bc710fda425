"""Semantic IDs from quantizer codes: uniqueness, token strings, vocabulary, export rows.

Domain-generic (item ids + code matrices). Public API::

    from animind_assets.lib.semantic_ids.assign import assign_semantic_ids, semantic_id_strings, build_vocab

    full = assign_semantic_ids(codes)              # (n, levels + 1): codes + disambiguation level
    ids = semantic_id_strings(full)                # ["<L1_47><L2_203><L3_9><L4_0>", ...]
    vocab = build_vocab(level_sizes(full, codebook_size), special_tokens=DEFAULT_SPECIAL_TOKENS)

``assign_semantic_ids`` follows TIGER (Rajput et al. 2023): one extra level is appended to every
item; items whose quantizer codes are identical get 0, 1, 2, ... there (in the order of
``order_key``, e.g. ascending item id, so the result is deterministic), every other item gets 0.
All IDs then have the same length and every ID is unique. The disambiguation level's vocabulary
is as large as the largest collision group (or ``min_dedup_size`` when larger).

Token strings use 1-based levels: level ``l`` code ``c`` -> ``<L{l}_{c}>``, concatenated without
a separator (as the original AniMind tokenizer's ``semantic_id_concat``); the format, its regex
and parsing are owned by ``lib/semantic_ids/tokens.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from animind_assets.lib.semantic_ids.tokens import SPECIAL_TOKENS, check_special_tokens, level_vocab, sid_string

DEFAULT_SPECIAL_TOKENS = list(SPECIAL_TOKENS)  # format owned by lib/semantic_ids/tokens.py


def assign_semantic_ids(codes: np.ndarray, order_key: Sequence | np.ndarray | None = None) -> np.ndarray:
    """Append a disambiguation level so every row's ID is unique.

    ``codes``: ``(n, levels)`` integer matrix. ``order_key``: optional length-``n`` sort key deciding
    who gets 0, 1, 2... inside a collision group (default: row order). Returns ``(n, levels + 1)``
    int64.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (n, levels), got shape {codes.shape}")
    n = codes.shape[0]
    if n == 0:
        return np.zeros((0, codes.shape[1] + 1), dtype=np.int64)
    key = np.arange(n) if order_key is None else np.asarray(order_key)
    if key.shape[0] != n:
        raise ValueError(f"order_key has {key.shape[0]} entries for {n} rows")
    # sort by (codes..., key): identical code tuples become consecutive, ordered by key
    order = np.lexsort((key, *[codes[:, j] for j in reversed(range(codes.shape[1]))]))
    sc = codes[order]
    new_group = np.ones(n, dtype=bool)
    if n > 1:
        new_group[1:] = np.any(sc[1:] != sc[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.arange(n) - group_start
    dedup = np.empty(n, dtype=np.int64)
    dedup[order] = rank
    return np.concatenate([codes, dedup[:, None]], axis=1)


def collision_group_sizes(codes: np.ndarray) -> np.ndarray:
    """For each row, how many rows share its full code tuple (1 = unique)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)]


def semantic_id_strings(codes: np.ndarray, separator: str = "") -> list[str]:
    """One ID string per code row (format: ``lib/semantic_ids/tokens.py``)."""
    return [sid_string(row, separator) for row in np.asarray(codes).tolist()]


def level_sizes(full_codes: np.ndarray, codebook_size: int, min_dedup_size: int = 1) -> list[int]:
    """Vocabulary size of each level: ``codebook_size`` for quantizer levels, the largest collision
    group (at least ``min_dedup_size``) for the final disambiguation level."""
    full_codes = np.asarray(full_codes)
    n_levels = full_codes.shape[1]
    top = int(full_codes[:, -1].max()) + 1 if full_codes.shape[0] else 1
    return [int(codebook_size)] * (n_levels - 1) + [max(top, int(min_dedup_size), 1)]


def build_vocab(sizes: Sequence[int], special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> dict:
    """Special tokens first (deduplicated, order kept), then ``<L1_0>..`` level by level."""
    specials = check_special_tokens(special_tokens)
    tokens = list(specials) + level_vocab(sizes)
    return {
        "special_tokens": specials,
        "tokens": tokens,
        "token_to_id": {t: i for i, t in enumerate(tokens)},
        "level_sizes": [int(s) for s in sizes],
        "vocab_size": len(tokens),
    }


def semantic_id_frame(item_ids: Sequence[int], full_codes: np.ndarray, id_column: str = "anime_id") -> pl.DataFrame:
    """``id_column`` Int64, ``codes`` List(Int64), ``semantic_id`` Utf8, ``code_l1..code_lL`` Int64,
    ``collision_group_size`` Int64 (items sharing the quantizer codes before disambiguation)."""
    full_codes = np.asarray(full_codes, dtype=np.int64)
    ids = np.asarray(item_ids, dtype=np.int64)
    if ids.shape[0] != full_codes.shape[0]:
        raise ValueError(f"{ids.shape[0]} item ids for {full_codes.shape[0]} code rows")
    group = collision_group_sizes(full_codes[:, :-1]) if full_codes.shape[1] > 1 else np.ones(len(ids), np.int64)
    data: dict[str, object] = {
        id_column: pl.Series(id_column, ids, dtype=pl.Int64),
        "codes": pl.Series("codes", full_codes.tolist(), dtype=pl.List(pl.Int64)),
        "semantic_id": pl.Series("semantic_id", semantic_id_strings(full_codes), dtype=pl.Utf8),
    }
    for level in range(full_codes.shape[1]):
        data[f"code_l{level + 1}"] = pl.Series(f"code_l{level + 1}", full_codes[:, level], dtype=pl.Int64)
    data["collision_group_size"] = pl.Series("collision_group_size", group, dtype=pl.Int64)
    return pl.DataFrame(data)


def level_usage(full_codes: np.ndarray, sizes: Sequence[int]) -> list[float]:
    """Fraction of each level's vocabulary used by at least one item."""
    full_codes = np.asarray(full_codes)
    return [
        float(len(np.unique(full_codes[:, lv])) / max(1, int(sizes[lv]))) if full_codes.shape[0] else 0.0
        for lv in range(full_codes.shape[1])
    ]


def frame_vectors(
    df: pl.DataFrame,
    id_column: str = "anime_id",
    vector_column: str = "embedding",
    table: str = "anime_embeddings",
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` from an id + fixed-size vector frame, sorted by id.

    Accepts ``pl.Array`` or ``pl.List`` vector columns. Raises a ``ValueError`` naming the table,
    column and offending ids for missing columns, null/duplicate ids, null or ragged vectors and
    non-finite values.
    """
    for col in (id_column, vector_column):
        if col not in df.columns:
            raise ValueError(f"{table}: missing column {col!r} (columns: {df.columns})")
    if df.height == 0:
        raise ValueError(f"{table}: no rows")
    if df[id_column].null_count():
        raise ValueError(f"{table}.{id_column}: {df[id_column].null_count()} null ids")
    dup = df.filter(pl.col(id_column).is_duplicated())[id_column].unique().sort().head(5).to_list()
    if dup:
        raise ValueError(f"{table}.{id_column}: duplicate ids, e.g. {dup}")
    df = df.sort(id_column)
    vec = df[vector_column]
    if vec.null_count():
        bad = df.filter(pl.col(vector_column).is_null())[id_column].head(5).to_list()
        raise ValueError(f"{table}.{vector_column}: {vec.null_count()} null vectors, e.g. {id_column} {bad}")
    if isinstance(vec.dtype, pl.Array):
        x = vec.to_numpy().astype(np.float32, copy=False)
    elif isinstance(vec.dtype, pl.List):
        lens = vec.list.len()
        if lens.n_unique() != 1:
            common = int(lens.mode().sort()[0])
            bad = df.filter(lens != common)[id_column].head(5).to_list()
            raise ValueError(f"{table}.{vector_column}: ragged vectors (most have {common} values), e.g. {id_column} {bad}")
        x = np.asarray(vec.to_list(), dtype=np.float32)
    else:
        raise ValueError(f"{table}.{vector_column}: expected Array/List of floats, got {vec.dtype}")
    x = np.ascontiguousarray(x.reshape(df.height, -1))
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = df[id_column].to_numpy()[~finite][:5].tolist()
        raise ValueError(f"{table}.{vector_column}: non-finite values in {int((~finite).sum())} rows, e.g. {id_column} {bad}")
    return df[id_column].to_numpy().astype(np.int64), x
