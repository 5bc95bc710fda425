"""anime_prep: one clean row per anime with a deterministic ``anime_text`` for embedding."""

import time

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.lib.data.prep import clean_anime
from animind_assets.lib.data.sources import require_kept, require_rows
from animind_assets.meta import bar_plot, counts_md, scalar_metadata, table_metadata
from animind_assets.resources import AnimeSource, ParquetExports
from animind_assets.launchpad import settings_defaults


@settings_defaults("anime_prep")
class AnimePrepConfig(dg.Config):
    include_adult: bool = Field(default=False, description="keep 'Rx - Hentai' titles (excluded by default)")
    limit: int | None = Field(default=None, description="keep only the first N valid anime (fast experiments)")


@dg.asset(
    group_name="prep",
    deps=["anime_catalog_source"],
    kinds={"polars", "duckdb"},
    description="Cleaned anime catalog: one row per anime, missing values as null, deterministic anime_text.",
)
def anime_prep(
    context: dg.AssetExecutionContext,
    config: AnimePrepConfig,
    anime_source: AnimeSource,
    exports: ParquetExports,
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    raw = anime_source.read_catalog()
    context.log.info(f"read {raw.rows_read} catalog rows from {raw.origin}")
    for report in raw.reports:
        context.log.info(report.summary())
    # Nothing is written (table, export, quarantine) unless there is something to publish.
    require_rows(raw.rows_read, "anime_prep", raw.origin)
    result = clean_anime(raw, include_adult=config.include_adult, limit=config.limit)
    df = result.frame
    require_kept(df.height, result.input_rows, result.dropped_by_reason, "anime_prep", raw.origin)
    context.log.info(
        f"anime_prep: kept {df.height}/{result.input_rows} rows, dropped {result.dropped_by_reason}, "
        f"cleaned values {result.cleaned_values} in {time.perf_counter() - t0:.1f}s"
    )
    export = exports.write(df, "anime_prep")
    q_path = exports.write(result.quarantine, "quarantine/anime_prep")
    missing = {f: int(df.select(pl.col(f).is_null().sum()).item()) for f in ["english_name", "synopsis", "type", "episodes", "year", "score"]}
    text_len = df["anime_text"].str.len_chars()
    dropped = sum(result.dropped_by_reason.values())
    flow = [("source rows", f"{result.source_rows:,}")]
    if result.limit is not None:
        unread = result.source_rows - result.input_rows
        flow.append((f"limit {result.limit:,} (config): rows examined", f"{result.input_rows:,} ({unread:,} not read)"))
    flow += [(f"dropped: {reason}", f"-{n:,}") for reason, n in sorted(result.dropped_by_reason.items())]
    flow.append(("rows out", f"{df.height:,}"))
    filters = [f"include_adult={config.include_adult}" + ("" if config.include_adult else
               f" ({result.dropped_by_reason.get('adult_excluded', 0):,} adult titles dropped)")]
    filters.append(f"limit={config.limit}" if config.limit is None else
                   f"limit {config.limit:,} -> {df.height:,} rows (stopped after examining {result.input_rows:,} of "
                   f"{result.source_rows:,} source rows)")
    metadata = {
        **table_metadata(df, preview_cols=["anime_id", "title", "genres", "type", "year", "anime_text"]),
        "source": dg.MetadataValue.text(anime_source.describe()),
        "source_origin": dg.MetadataValue.text(raw.origin),
        "source_fingerprint": dg.MetadataValue.text(raw.fingerprint()),
        "source_rows": dg.MetadataValue.int(result.source_rows),
        "input_rows": dg.MetadataValue.int(result.input_rows),
        "dropped_rows": dg.MetadataValue.int(dropped),
        "limit": dg.MetadataValue.int(config.limit) if config.limit is not None else dg.MetadataValue.text("none"),
        "filters": dg.MetadataValue.text("; ".join(filters)),
        "row_flow": dg.MetadataValue.md("| step | rows |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in flow)),
        "dropped_by_reason": counts_md(result.dropped_by_reason),
        "cleaned_values": counts_md(result.cleaned_values, key="column:reason", value="values set to null"),
        "source_read_report": dg.MetadataValue.md("\n\n".join(r.summary() for r in raw.reports) or "(none)"),
        "missing_values": counts_md(missing, key="column", value="null rows"),
        "with_synopsis": dg.MetadataValue.int(int(df["has_synopsis"].sum())),
        **scalar_metadata({"anime_text_chars_mean": float(text_len.mean() or 0.0), "wall_seconds": time.perf_counter() - t0}),
        "parquet_export": dg.MetadataValue.path(export),
        "quarantine_export": dg.MetadataValue.path(q_path),
    }
    if df.height:
        top = df.explode("genres").drop_nulls("genres").group_by("genres").len().sort("len", descending=True).head(20)
        metadata.update(bar_plot("top_genres", dict(zip(top["genres"], top["len"])), "anime per genre (top 20)", "anime"))
    return dg.Output(df, metadata=metadata)


@dg.asset_check(asset=anime_prep, blocking=True, description="anime_id unique, names and texts non-empty")
def anime_prep_is_valid(anime_prep: pl.DataFrame) -> dg.AssetCheckResult:
    dup = anime_prep.height - anime_prep["anime_id"].n_unique()
    empty_text = int((anime_prep["anime_text"].str.len_chars() == 0).sum())
    null_name = int(anime_prep["name"].is_null().sum())
    unknown_in_text = int(anime_prep["anime_text"].str.contains(r"\bUnknown\b").sum())
    ok = dup == 0 and empty_text == 0 and null_name == 0 and anime_prep.height > 0
    return dg.AssetCheckResult(
        passed=ok,
        metadata={
            "duplicate_ids": dup,
            "empty_texts": empty_text,
            "null_names": null_name,
            "texts_with_literal_Unknown": unknown_in_text,
            "rows": anime_prep.height,
        },
    )
