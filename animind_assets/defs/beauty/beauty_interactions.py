"""``beauty_interactions``: Amazon Beauty user sequences (user_id, item_id, rating, timestamp, seq).

Same source adapter config as ``beauty_items``. ``seq`` is the 0-based position in the user's
chronological sequence: the prepared split has no timestamps, so its order is inter.json's (tiger-cf)
by default (``order='user_sequence'`` = P5's); the raw files are ordered by ``unixReviewTime`` with
same-day ties kept in file order.
"""

import time

import dagster as dg
import numpy as np
import polars as pl

from animind_assets.defs.beauty.shared import GROUP, AmazonSourceConfig, source_metadata
from animind_assets.lib.data.sources import require_kept
from animind_assets.meta import hist_plot, scalar_metadata, table_metadata
from animind_assets.resources import ParquetExports
from animind_assets.launchpad import apply_settings


BeautyInteractionsConfig = apply_settings(AmazonSourceConfig, "beauty_interactions")


@dg.asset(
    group_name=GROUP,
    kinds={"polars", "duckdb"},
    description="Amazon Beauty interactions in per-user chronological order (seq), leave-one-out ready.",
)
def beauty_interactions(
    context: dg.AssetExecutionContext, config: BeautyInteractionsConfig, exports: ParquetExports
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    data = config.load()
    df = data.interactions
    # nothing is written (table, export) unless there is something to publish
    require_kept(df.height, df.height + sum(data.dropped.values()), data.dropped, "beauty_interactions", data.origin)
    export = exports.write(df, "beauty_interactions")
    per_user = df.group_by("user_id").len()["len"].to_numpy()
    elapsed = time.perf_counter() - t0
    context.log.info(
        f"beauty_interactions: {df.height} rows, {len(per_user)} users, {df['item_id'].n_unique()} items "
        f"({df.height / max(elapsed, 1e-9):,.0f} rows/s); order: {data.order}"
    )
    md = {
        **table_metadata(df),
        **source_metadata(data),
        **scalar_metadata(
            {
                "users": int(len(per_user)),
                "items": int(df["item_id"].n_unique()),
                "interactions": int(df.height),
                "per_user_min": int(per_user.min()) if len(per_user) else 0,
                "per_user_median": float(np.median(per_user)) if len(per_user) else 0.0,
                "per_user_mean": float(per_user.mean()) if len(per_user) else 0.0,
                "per_user_max": int(per_user.max()) if len(per_user) else 0,
                "users_below_3": int((per_user < 3).sum()),
            }
        ),
        "parquet_export": dg.MetadataValue.path(export),
    }
    if len(per_user):
        md.update(hist_plot("sequence_length_histogram", np.minimum(per_user, 60), "interactions per user (capped at 60)", "interactions", bins=55))
    return dg.Output(df, metadata=md)


@dg.asset_check(asset=beauty_interactions, blocking=True, description="seq is 0..n-1 per user, no repeated (user, item), ids >= 0")
def beauty_interactions_valid(beauty_interactions: pl.DataFrame) -> dg.AssetCheckResult:
    df = beauty_interactions
    dup = df.height - df.select(["user_id", "item_id"]).unique().height
    seq_bad = (
        df.group_by("user_id")
        .agg((pl.col("seq").sort() == pl.int_range(pl.len())).all().alias("ok"))
        .filter(~pl.col("ok"))
        .height
    )
    neg = int(((df["item_id"] < 0) | (df["user_id"] < 0)).sum())
    return dg.AssetCheckResult(
        passed=dup == 0 and seq_bad == 0 and neg == 0 and df.height > 0,
        metadata={"repeated_pairs": dup, "users_with_bad_seq": seq_bad, "negative_ids": neg, "rows": df.height},
    )
