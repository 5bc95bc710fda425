"""``beauty_embeddings``: one L2-normalised text vector per Beauty item (``item_id``, ``embedding``).

Thin layer over the generic ``animind_assets.lib.embeddings`` (offline MiniLM by default; incremental:
unchanged texts with the same model fingerprint are reused from the previous materialization). Items
with empty text (one in the prepared split: ``B001LTVF7G``) are embedded from ``empty_text_fallback``
so every item gets a semantic ID; they are counted in the metadata.
"""

import time

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.embeddings import (
    build_embeddings,
    cosine_summary,
    embedding_matrix,
    norm_stats,
    pairwise_cosine_sample,
)
from animind_assets.defs.embeddings.config import AnimeEmbeddingsConfig
from animind_assets.meta import hist_plot, rate_metadata, scalar_metadata, table_metadata
from animind_assets.resources import DuckDBWarehouse, ParquetExports
from animind_assets.launchpad import settings_defaults

ASSET = "beauty_embeddings"
ID_COLUMN = "item_id"


@settings_defaults("beauty_embeddings")
class BeautyEmbeddingsConfig(AnimeEmbeddingsConfig.BUILTIN):  # not anime_embeddings' settings
    """Every knob of ``anime_embeddings`` plus the fallback text for items without text."""

    batch_size: int = Field(128, description="texts per forward pass")
    empty_text_fallback: str = Field("Amazon beauty product {asin}", description="text embedded for items without text ({asin} is filled in)")


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "polars", "duckdb"},
    description="One text vector per Beauty item (item_id, embedding FLOAT[dim]); incremental.",
)
def beauty_embeddings(
    context: dg.AssetExecutionContext,
    config: BeautyEmbeddingsConfig,
    warehouse: DuckDBWarehouse,
    exports: ParquetExports,
    beauty_items: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    for col in (ID_COLUMN, "asin", "text"):
        if col not in beauty_items.columns:
            raise ValueError(f"beauty_items: missing column {col!r} (columns: {beauty_items.columns})")
    empty = beauty_items["text"].fill_null("").str.strip_chars() == ""
    texts = [
        config.empty_text_fallback.format(asin=a) if e else t
        for t, a, e in zip(beauty_items["text"].to_list(), beauty_items["asin"].to_list(), empty.to_list())
    ]
    cfg = config.to_lib()
    previous = None if config.full_rebuild else warehouse.read_table(ASSET)
    context.log.info(
        f"{ASSET}: {beauty_items.height} items ({int(empty.sum())} with fallback text); previous table: "
        + ("none" if previous is None else f"{previous.height} rows")
    )
    df, stats = build_embeddings(beauty_items[ID_COLUMN].to_list(), texts, previous, cfg, log=context.log.info, id_column=ID_COLUMN)
    export = exports.write(df, ASSET)
    mat = embedding_matrix(df)
    cos = pairwise_cosine_sample(mat, sample=config.cosine_sample, seed=config.seed)
    md = {
        **table_metadata(df, preview_cols=[ID_COLUMN, "dim", "text_hash", "model", "embedded_at"]),
        **scalar_metadata(
            {
                **{k: v for k, v in stats.summary().items() if k not in ("items_per_s", "embed_seconds", "rows_embedded")},
                "rows_with_fallback_text": int(empty.sum()),
                **{k: round(v, 6) for k, v in norm_stats(mat).items() if v == v},
                **{k: round(v, 6) for k, v in cosine_summary(cos).items()},
                "wall_seconds": round(time.perf_counter() - t0, 2),
            }
        ),
        **rate_metadata("rows_embedded", stats.n_embedded, stats.embed_seconds, unit="texts"),
        "parquet_export": dg.MetadataValue.path(export),
    }
    if cos.size:
        md.update(hist_plot("pairwise_cosine_histogram", cos, "pairwise cosine (sample)", "cosine"))
    if mat.size:
        md.update(hist_plot("norm_histogram", np.linalg.norm(mat, axis=1), "vector L2 norms", "norm"))
    context.log.info(f"{ASSET}: {df.height} rows, dim {stats.dim}, embedded {stats.n_embedded} in {stats.embed_seconds:.1f}s")
    return dg.Output(df, metadata=md)
