"""Item-hash shards as Dagster partitions, for the per-item steps of large catalogs (``anime_embeddings`` and
the semantic-ID encoding ``semantic_id_codes``).

``$ANIMIND_EMBEDDING_SHARDS`` (read when the definitions load; default ``0``):

* ``0`` = unpartitioned (the default; right for catalogs a single step embeds in minutes);
* ``N >= 1`` = ``anime_embeddings`` and ``semantic_id_codes`` get a ``StaticPartitionsDefinition`` of the keys
  ``"<k>-of-N"`` (k zero-padded to the width of N-1: ``"0-of-4"``, ``"00-of-16"``)
  (``lib.common.sharding``): a backfill runs one step per shard (one pod each under ``k8s_job_executor``),
  a failed shard reruns alone, and each shard is incremental against its own previous rows.

Storage: every shard is a partition of the one table ``anime_embeddings`` with a ``shard`` column
(= the partition key; ``partition_expr`` metadata), so the DuckDB IO manager replaces ``WHERE shard = key``
and the multi-pod Parquet backend writes one dataset folder per shard. An unpartitioned downstream
(``rqvae_model``; ``semantic_ids`` reads the union of ``semantic_id_codes``) loads the union of all shards as one frame; ``frame_vectors`` sorts it
by id, so the downstream sees the same rows in the same order as from the unsharded table.

Changing ``N`` changes the key set: the next backfill of the new keys reuses the previous vectors of the
old layout (found by the ids' new shard), and the downstream reads only the new keys.
"""

from __future__ import annotations

import os

import dagster as dg
import numpy as np
import polars as pl

from animind_assets.lib.common.sharding import parse_shard_key, shard_keys, shard_mask

SHARDS_ENV = "ANIMIND_EMBEDDING_SHARDS"
SHARD_COLUMN = "shard"


def embedding_shards() -> int:
    """``$ANIMIND_EMBEDDING_SHARDS`` as an int (0 when unset); raises ``ValueError`` naming the variable."""
    raw = os.environ.get(SHARDS_ENV, "").strip() or "0"
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"${SHARDS_ENV} must be an integer (0 = unpartitioned), got {raw!r}") from None
    if n < 0:
        raise ValueError(f"${SHARDS_ENV} must be >= 0 (0 = unpartitioned), got {n}")
    if n:
        shard_keys(n)  # validates the upper bound
    return n


def shard_partitions_def(n_shards: int | None = None) -> dg.StaticPartitionsDefinition | None:
    """The shard partitions (``None`` when unsharded)."""
    n = embedding_shards() if n_shards is None else n_shards
    return dg.StaticPartitionsDefinition(shard_keys(n)) if n else None


def sharded_asset_kwargs(n_shards: int | None = None) -> dict:
    """Extra ``@dg.asset`` keyword arguments: ``partitions_def`` + ``partition_expr`` metadata when sharded."""
    pdef = shard_partitions_def(n_shards)
    if pdef is None:
        return {}
    return {
        "partitions_def": pdef,
        "metadata": {"partition_expr": SHARD_COLUMN},
        "backfill_policy": dg.BackfillPolicy.multi_run(1),  # one run (one pod) per shard
    }


def sharded_check_kwargs(n_shards: int | None = None) -> dict:
    """Extra ``@dg.asset_check`` keyword arguments: the same partitions (a check runs per shard)."""
    pdef = shard_partitions_def(n_shards)
    return {"partitions_def": pdef} if pdef is not None else {}


def current_shard(context) -> str | None:
    """The shard key of this run (``None`` when unpartitioned)."""
    if not getattr(context, "has_partition_key", False):
        return None
    key = context.partition_key
    parse_shard_key(key)
    return key


def select_shard(frame: pl.DataFrame, key: str, id_column: str) -> pl.DataFrame:
    """Rows of ``frame`` whose ``id_column`` hashes to shard ``key`` (order kept)."""
    if frame.height == 0:
        return frame
    return frame.filter(pl.Series(shard_mask(frame[id_column].to_list(), key)))


def shard_input(frame: pl.DataFrame, key: str, id_column: str, table: str) -> pl.DataFrame:
    """The rows of input ``table`` in shard ``key``; raises ``ValueError`` naming the table and shard when
    there are none (a shard count too large for the catalog: an empty shard never replaces its rows)."""
    rows = select_shard(frame, key, id_column)
    if rows.height == 0:
        raise ValueError(
            f"{table}: none of its {frame.height} rows hash to shard {key}; use fewer shards "
            f"(${SHARDS_ENV}) for this catalog, or 0 for one unpartitioned step"
        )
    return rows


def previous_shard_rows(warehouse, table: str, key: str, id_column: str, log=None) -> pl.DataFrame | None:
    """The previous rows of shard ``key``: its own partition when committed; otherwise (first sharded run
    after an unsharded table, or after a change of the shard count) the rows of the whole table whose ids
    hash to this shard, one per id (rows already tagged with this key first). ``None`` when nothing exists."""
    own = warehouse.read_partition(table, key, SHARD_COLUMN)
    if own is not None and own.height:
        return own.drop(SHARD_COLUMN) if SHARD_COLUMN in own.columns else own
    whole = warehouse.read_table(table)
    if whole is None or whole.height == 0 or id_column not in whole.columns:
        return None
    rows = select_shard(whole, key, id_column)
    if SHARD_COLUMN in rows.columns:
        rank = (rows[SHARD_COLUMN] == key).fill_null(False)
        rows = rows.with_columns(pl.Series("__own", rank.to_numpy().astype(np.int8))).sort(
            "__own", descending=True, maintain_order=True
        ).unique(id_column, keep="first", maintain_order=True).drop("__own")
    if log:
        log(f"{table}[{key}]: no committed rows of this shard; reusing {rows.height} rows of the table's other layout")
    return rows.drop(SHARD_COLUMN) if SHARD_COLUMN in rows.columns else rows


def with_shard_column(frame: pl.DataFrame, key: str | None) -> pl.DataFrame:
    """``frame`` plus the ``shard`` column (Utf8, last) when sharded; unchanged otherwise."""
    if key is None:
        return frame
    return frame.with_columns(pl.lit(key, dtype=pl.Utf8).alias(SHARD_COLUMN))
