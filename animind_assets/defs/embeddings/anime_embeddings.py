"""``anime_embeddings``: one L2-normalized vector per anime from ``anime_prep.anime_text``.

Thin layer over ``animind_assets.lib.embeddings``: reads the previous materialization (incremental:
only new/changed texts are embedded, removed anime dropped), returns the DuckDB table
``anime_embeddings`` (``embedding`` is ``FLOAT[dim]``) and writes a Parquet export. Runs on CPU here;
tagged for a GPU pool/node in Kubernetes (``GPU_POOL`` / ``GPU_OP_TAGS``).
"""


import time
from typing import Optional

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.embeddings import (
    build_embeddings,
    check_finite,
    check_no_collapse,
    check_unit_norm,
    cosine_summary,
    embedding_matrix,
    norm_stats,
    pairwise_cosine_sample,
)
from animind_assets.meta import counts_md, hist_plot, rate_metadata, scalar_metadata, table_metadata
from animind_assets.resources import DuckDBWarehouse, ParquetExports

from animind_assets.defs.embeddings.config import ASSET, DEFAULT_COLLAPSE_THRESHOLD, ID_COLUMN, AnimeEmbeddingsConfig
from animind_assets.defs.embeddings.sharding import (
    current_shard,
    previous_shard_rows,
    shard_input,
    sharded_asset_kwargs,
    sharded_check_kwargs,
    with_shard_column,
)
from animind_assets.launchpad import settings_defaults


@dg.asset(
    group_name="embeddings",
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "polars", "duckdb"},
    description="One L2-normalized vector per anime (embedding FLOAT[dim]) from anime_prep.anime_text; "
    "incremental: unchanged texts with the same model fingerprint are reused. With $ANIMIND_EMBEDDING_SHARDS=N: "
    "N item-hash partitions (one step/pod each), the downstream reads their union.",
    **sharded_asset_kwargs(),
)
def anime_embeddings(
    context: dg.AssetExecutionContext,
    config: AnimeEmbeddingsConfig,
    warehouse: DuckDBWarehouse,
    exports: ParquetExports,
    anime_prep: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    for col in (ID_COLUMN, "anime_text"):
        if col not in anime_prep.columns:
            raise ValueError(f"anime_prep: missing column {col!r} (columns: {anime_prep.columns})")
    cfg = config.to_lib()
    shard = current_shard(context)  # None = unpartitioned; else this run embeds only the ids hashing to it
    if shard is None:
        previous = None if config.full_rebuild else warehouse.read_table(ASSET)
    else:
        anime_prep = shard_input(anime_prep, shard, ID_COLUMN, table="anime_prep")
        previous = None if config.full_rebuild else previous_shard_rows(warehouse, ASSET, shard, ID_COLUMN, context.log.info)
    context.log.info(
        f"{ASSET}: {anime_prep.height} anime; previous table: "
        + ("none (first run)" if previous is None else f"{previous.height} rows")
        + (" (ignored: full_rebuild)" if config.full_rebuild else "")
    )
    df, stats = build_embeddings(
        anime_prep[ID_COLUMN].to_list(),
        anime_prep["anime_text"].to_list(),
        previous,
        cfg,
        log=context.log.info,
        id_column=ID_COLUMN,
    )
    df = with_shard_column(df, shard)
    export = exports.write(df, ASSET if shard is None else f"{ASSET}/shard={shard}")

    mat = embedding_matrix(df)
    cos = pairwise_cosine_sample(mat, sample=config.cosine_sample, seed=config.seed)
    norms = norm_stats(mat)
    cos_stats = cosine_summary(cos)
    metadata: dict = {
        **table_metadata(df, preview_cols=[ID_COLUMN, "dim", "text_hash", "model", "model_fingerprint", "embedded_at"]),
        **scalar_metadata(
            {
                **{k: v for k, v in stats.summary().items() if k not in ("items_per_s", "embed_seconds", "rows_embedded")},
                "normalize": config.normalize,
                "collapse_threshold": config.collapse_threshold,
                "cosine_sample": config.cosine_sample,
                "seed": config.seed,
                **{k: round(v, 6) for k, v in norms.items() if v == v},
                **{k: round(v, 6) for k, v in cos_stats.items()},
            }
        ),
        **rate_metadata("rows_embedded", stats.n_embedded, stats.embed_seconds, unit="texts"),
        "embedded_by_reason": counts_md(stats.embedded_by_reason, key="reason", value="rows embedded"),
        "parquet_export": dg.MetadataValue.path(export),
        "wall_seconds": dg.MetadataValue.float(round(time.perf_counter() - t0, 2)),
    }
    if stats.skipped_empty_ids:
        metadata["skipped_empty_ids"] = dg.MetadataValue.text(", ".join(map(str, stats.skipped_empty_ids[:50])))
    if stats.dropped_ids:
        metadata["dropped_ids"] = dg.MetadataValue.text(", ".join(map(str, stats.dropped_ids[:50])))
    if cos.size:
        metadata.update(hist_plot("pairwise_cosine_histogram", cos,
                                  f"pairwise cosine, {min(config.cosine_sample, df.height)} sampled anime", "cosine"))
    if mat.size:
        metadata.update(hist_plot("norm_histogram", np.linalg.norm(mat, axis=1), "vector L2 norms", "norm"))
    context.log.info(
        f"{ASSET}: {df.height} rows (embedded {stats.n_embedded}, reused {stats.n_reused}, dropped {stats.n_dropped}, "
        f"skipped empty {stats.n_skipped_empty}), dim {stats.dim}, embedded {stats.n_embedded} in {stats.embed_seconds:.1f}s, "
        f"mean pairwise cosine {cos_stats.get('cosine_mean', float('nan')):.3f}"
    )
    return dg.Output(df, metadata=metadata)


# ------------------------------------------------------------------------------------------- checks
def _latest_metadata(context) -> dict:
    """Metadata of the latest ``anime_embeddings`` materialization (normalize flag, threshold)."""
    try:
        event = context.instance.get_latest_materialization_event(dg.AssetKey(ASSET))
    except Exception:  # pragma: no cover - direct invocation without an instance
        return {}
    if event is None or event.asset_materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def _result(outcome) -> dg.AssetCheckResult:
    md = {k: v for k, v in outcome.metadata.items() if v is not None and not (isinstance(v, float) and v != v)}
    md["summary"] = outcome.description
    return dg.AssetCheckResult(passed=bool(outcome.passed), metadata=md, description=outcome.description)


@dg.asset_check(
    asset=anime_embeddings, blocking=True, description="no NaN/inf in any vector (names offending anime_id)", **sharded_check_kwargs()
)
def anime_embeddings_finite(anime_embeddings: pl.DataFrame) -> dg.AssetCheckResult:
    return _result(check_finite(anime_embeddings, ID_COLUMN))


@settings_defaults("anime_embeddings_unit_norm")
class UnitNormCheckConfig(dg.Config):
    tolerance: float = Field(1e-3, description="allowed |norm - 1|")
    expect_normalized: Optional[bool] = Field(
        None, description="None = follow the latest materialization's 'normalize' setting"
    )


@dg.asset_check(
    asset=anime_embeddings, blocking=True, description="every vector has unit L2 norm when normalizing", **sharded_check_kwargs()
)
def anime_embeddings_unit_norm(
    context: dg.AssetCheckExecutionContext, config: UnitNormCheckConfig, anime_embeddings: pl.DataFrame
) -> dg.AssetCheckResult:
    expect = config.expect_normalized
    if expect is None:
        expect = bool(_latest_metadata(context).get("normalize", True))
    if not expect:
        return dg.AssetCheckResult(passed=True, metadata={"summary": "normalize=False: unit norm not required"})
    return _result(check_unit_norm(anime_embeddings, ID_COLUMN, tol=config.tolerance))


@settings_defaults("anime_embeddings_no_collapse")
class CollapseCheckConfig(dg.Config):
    threshold: Optional[float] = Field(
        None, description=f"mean pairwise cosine must be below this (None = the asset's collapse_threshold, default {DEFAULT_COLLAPSE_THRESHOLD})"
    )
    sample: int = Field(2000, description="rows sampled for the mean pairwise cosine")
    seed: int = Field(0, description="sample seed")


@dg.asset_check(
    asset=anime_embeddings,
    blocking=True,  # collapsed vectors must not reach rqvae_model: a refit on them would replace the quantizer
    description="no collapse: mean pairwise cosine of a seeded sample below a threshold, and no two different "
    "texts with identical vectors (blocking: a collapsed table never reaches the quantizer)",
    **sharded_check_kwargs(),
)
def anime_embeddings_no_collapse(
    context: dg.AssetCheckExecutionContext, config: CollapseCheckConfig, anime_embeddings: pl.DataFrame
) -> dg.AssetCheckResult:
    threshold = config.threshold
    if threshold is None:
        threshold = float(_latest_metadata(context).get("collapse_threshold", DEFAULT_COLLAPSE_THRESHOLD))
    return _result(check_no_collapse(anime_embeddings, ID_COLUMN, threshold=threshold, sample=config.sample, seed=config.seed))
