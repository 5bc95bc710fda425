"""user_interactions: validated user watch-list rows; bad rows quarantined and counted by reason."""

import time

import dagster as dg
import polars as pl

from animind_assets.lib.data.prep import VALID_STATUSES, catalog_ids, clean_interactions
from animind_assets.lib.data.sources import require_kept, require_rows
from animind_assets.meta import bar_plot, counts_md, scalar_metadata, table_metadata
from animind_assets.resources import AnimeSource, ParquetExports


@dg.asset(
    group_name="prep",
    deps=["watchlist_source"],
    kinds={"polars", "duckdb"},
    description="Validated user_anime rows (user_id, anime_id, score 0=unscored, status, seq).",
)
def user_interactions(
    context: dg.AssetExecutionContext,
    anime_prep: pl.DataFrame,
    anime_source: AnimeSource,
    exports: ParquetExports,
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    catalog = anime_source.read_catalog()
    raw = anime_source.read_interactions(catalog)
    context.log.info(f"read {raw.rows_read} interaction rows from {raw.origin}")
    for report in raw.reports:
        context.log.info(report.summary())
    # Nothing is written (table, export, quarantine) unless there is something to publish.
    require_rows(raw.rows_read, "user_interactions", raw.origin)
    known_ids = catalog_ids(catalog)  # the same exact id parser as anime_prep
    kept_ids = set(anime_prep["anime_id"].to_list())
    result = clean_interactions(raw, known_anime=known_ids, excluded_anime=known_ids - kept_ids)
    df = result.frame
    require_kept(df.height, result.input_rows, result.dropped_by_reason, "user_interactions", raw.origin)
    elapsed = time.perf_counter() - t0
    context.log.info(
        f"user_interactions: kept {df.height}/{result.input_rows} rows "
        f"({result.input_rows / max(elapsed, 1e-9):,.0f} rows/s), quarantined {result.dropped_by_reason}"
    )
    export = exports.write(df, "user_interactions")
    q_path = exports.write(result.quarantine, "quarantine/user_interactions")
    status_counts = {VALID_STATUSES.get(k, str(k)): v for k, v in df.group_by("status").len().sort("status").iter_rows()}
    per_user = df.group_by("user_id").len()["len"]
    excluded = known_ids - kept_ids
    excluded_rows = result.dropped_by_reason.get("excluded_anime", 0)
    filter_note = (
        f"{len(excluded):,} catalog anime are not in anime_prep (its filters: adult titles, limit) -> "
        f"{excluded_rows:,} interaction rows on them quarantined as excluded_anime"
        if excluded else "anime_prep keeps every catalog anime: no interaction dropped by its filters"
    )
    metadata = {
        **table_metadata(df),
        "source": dg.MetadataValue.text(anime_source.describe()),
        "source_origin": dg.MetadataValue.text(raw.origin),
        "source_fingerprint": dg.MetadataValue.text(raw.fingerprint()),
        "simulated_users": dg.MetadataValue.bool(raw.simulated),
        "has_timestamps": dg.MetadataValue.bool(raw.has_timestamps),
        "order_note": dg.MetadataValue.text(
            "seq follows the source's row order"
            + ("" if raw.has_timestamps else "; the source has no timestamps, so the order is NOT temporal")
        ),
        "input_rows": dg.MetadataValue.int(result.input_rows),
        "quarantined_rows": dg.MetadataValue.int(result.quarantine.height),
        "quarantined_by_reason": counts_md(result.dropped_by_reason),
        "cleaned_values": counts_md(result.cleaned_values, key="column:reason", value="values set to null"),
        "source_read_report": dg.MetadataValue.md("\n\n".join(r.summary() for r in raw.reports) or "(none)"),
        "filters": dg.MetadataValue.text(filter_note),
        **scalar_metadata(
            {
                "users": df["user_id"].n_unique(),
                "distinct_anime": df["anime_id"].n_unique(),
                "rows_per_user_median": float(per_user.median() or 0),
                "scored_fraction": float((df["score"] > 0).mean() or 0),
                "wall_seconds": elapsed,
                "input_rows_per_s": result.input_rows / max(elapsed, 1e-9),
            }
        ),
        "status_counts": counts_md(status_counts, key="status"),
        **bar_plot("status_plot", status_counts, "rows per status", "rows"),
        "parquet_export": dg.MetadataValue.path(export),
        "quarantine_export": dg.MetadataValue.path(q_path),
    }
    if raw.simulated:
        metadata["note"] = dg.MetadataValue.text("SIMULATED demo users: lists are generated, not real people")
    return dg.Output(df, metadata=metadata)
