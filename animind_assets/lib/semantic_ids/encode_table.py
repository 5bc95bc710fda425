"""The per-item code table of a sharded semantic-ID encoding (``semantic_id_codes``).

With item-hash shards (``lib.common.sharding``) the quantizer encoding runs per shard: each shard turns its
embedding rows into one row per item with the quantizer codes (no disambiguation level yet), the hash of the
vector they came from and the fingerprint of the quantizer that produced them. The global step
(``semantic_ids``: disambiguation, stable ID registry, vocabulary, exports) then reads the union of the shards
without loading a single vector. This module owns that table's format::

    frame = code_frame(ids, codes, vector_hashes(x), quantizer_fp)   # one shard
    ids, codes, hashes = codes_from_frame(union, quantizer_fp)           # all shards, checked

Table ``semantic_id_codes``: ``<id_column>`` Int64 (unique), ``codes`` List(Int64) of length ``levels``,
``vector_hash`` Utf8 (16 hex, ``stable.vector_hashes``), ``quantizer_fingerprint`` Utf8
(``stable.model_fingerprint``); the Dagster layer adds the ``shard`` column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

__all__ = ["CODE_COLUMNS", "code_frame", "codes_from_frame"]

CODE_COLUMNS = ("codes", "vector_hash", "quantizer_fingerprint")


def code_frame(
    item_ids: Sequence[int] | np.ndarray,
    codes: np.ndarray,
    vector_hashes: Sequence[str],
    quantizer_fingerprint: str,
    id_column: str = "anime_id",
) -> pl.DataFrame:
    """One row per item: ``(id Int64, codes List(Int64), vector_hash Utf8, quantizer_fingerprint Utf8)``.

    ``codes``: ``(n, levels)`` integer matrix from ``quantizers.encode_codes``; ``vector_hashes``: ``n``
    strings. Raises ``ValueError`` when the lengths disagree."""
    codes = np.asarray(codes, dtype=np.int64)
    ids = np.asarray(item_ids, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[0] != ids.shape[0] or len(vector_hashes) != ids.shape[0]:
        raise ValueError(
            f"code_frame: {ids.shape[0]} ids, codes of shape {codes.shape} and {len(vector_hashes)} vector hashes "
            "must have one row per item"
        )
    return pl.DataFrame(
        {
            id_column: pl.Series(ids, dtype=pl.Int64),
            "codes": pl.Series(codes.tolist(), dtype=pl.List(pl.Int64)),
            "vector_hash": pl.Series(list(vector_hashes), dtype=pl.Utf8),
            "quantizer_fingerprint": pl.Series([quantizer_fingerprint] * ids.shape[0], dtype=pl.Utf8),
        }
    )


def codes_from_frame(
    df: pl.DataFrame,
    quantizer_fingerprint: str,
    id_column: str = "anime_id",
    table: str = "semantic_id_codes",
    shard_column: str = "shard",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(ids int64 (n,), codes int64 (n, levels), vector hashes)`` sorted by id, from the union of the shards.

    Raises ``ValueError`` naming ``table``, the column and example ids (and shards, when the frame has a
    ``shard_column``) for: no rows, missing columns, null or duplicate ids, null or ragged codes, and rows
    encoded by another quantizer than ``quantizer_fingerprint`` (a shard not re-encoded after a refit of the
    quantizer: backfill those shards first). Mixing quantizers would give IDs from two code spaces."""
    missing = [c for c in (id_column, *CODE_COLUMNS) if c not in df.columns]
    if missing:
        raise ValueError(f"{table}: missing column(s) {missing} (columns: {df.columns})")
    if df.height == 0:
        raise ValueError(f"{table}: no rows (materialize its shards first)")
    if df[id_column].null_count():
        raise ValueError(f"{table}.{id_column}: {df[id_column].null_count()} null ids")
    dup = df.filter(pl.col(id_column).is_duplicated())[id_column].unique().sort().head(5).to_list()
    if dup:
        raise ValueError(f"{table}.{id_column}: duplicate ids, e.g. {dup} (two shards hold the same item?)")
    stale = df.filter(pl.col("quantizer_fingerprint") != quantizer_fingerprint)
    if stale.height:
        where = ""
        if shard_column in stale.columns:
            where = f" in shard(s) {sorted(set(stale[shard_column].drop_nulls().to_list()))}"
        found = sorted(set(stale["quantizer_fingerprint"].to_list()))[:3]
        raise ValueError(
            f"{table}.quantizer_fingerprint: {stale.height} of {df.height} rows{where} were encoded by quantizer "
            f"{found}, not the current {quantizer_fingerprint}, e.g. {id_column} {stale[id_column].head(5).to_list()}. "
            "Cause: rqvae_model was refit after those shards were encoded. Fix: backfill those shards of "
            f"{table} (after a refit: every shard), then materialize semantic_ids."
        )
    df = df.sort(id_column)
    lens = df["codes"].list.len()
    if df["codes"].null_count() or lens.n_unique() != 1:
        common = int(lens.drop_nulls().mode().sort()[0]) if lens.drop_nulls().len() else 0
        bad = df.filter(lens.is_null() | (lens != common))[id_column].head(5).to_list()
        raise ValueError(f"{table}.codes: null or ragged code lists (most have {common} levels), e.g. {id_column} {bad}")
    codes = np.asarray(df["codes"].to_list(), dtype=np.int64).reshape(df.height, -1)
    return df[id_column].to_numpy().astype(np.int64), codes, df["vector_hash"].to_list()
