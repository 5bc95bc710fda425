"""``beauty_items``: Amazon Beauty catalog, one row per item (item_id = sorted-ASIN rank).

Source adapter (``animind_assets.lib.data.amazon``), chosen by ``AmazonSourceConfig`` (shared with
``beauty_interactions``):

* ``source="prepared"`` (default): ``../shared/data/beauty`` (``items.csv`` + ``inter.json``): the
  TIGER/P5 split, item text = ~5 title words.
* ``source="raw"``: the McAuley 5-core review file plus the metadata file (JSON lines or Python-dict
  lines, gzipped or not); item text = title + brand + categories + price (+ description if asked).
"""

import time

import dagster as dg
import polars as pl

from animind_assets.lib.data.sources import require_kept
from animind_assets.meta import hist_plot, scalar_metadata, table_metadata
from animind_assets.resources import ParquetExports

from animind_assets.defs.beauty.shared import GROUP, AmazonSourceConfig, source_metadata
from animind_assets.launchpad import apply_settings


BeautyItemsConfig = apply_settings(AmazonSourceConfig, "beauty_items")


@dg.asset(
    group_name=GROUP,
    kinds={"polars", "duckdb"},
    description="Amazon Beauty items (item_id, asin, text, title, brand, categories, price, description, has_text).",
)
def beauty_items(context: dg.AssetExecutionContext, config: BeautyItemsConfig, exports: ParquetExports) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    data = config.load()
    df = data.items
    # nothing is written (table, export) unless there is something to publish
    require_kept(df.height, df.height, data.dropped, "beauty_items", data.origin)
    export = exports.write(df, "beauty_items")
    n_empty = int((~df["has_text"]).sum())
    context.log.info(
        f"beauty_items: {df.height} items from {data.origin} ({n_empty} without text) in {time.perf_counter() - t0:.1f}s"
    )
    words = df["text"].str.split(" ").list.len().to_numpy()
    md = {
        **table_metadata(df, preview_cols=["item_id", "asin", "text", "brand", "price"]),
        **source_metadata(data),
        **scalar_metadata(
            {
                "items": df.height,
                "items_without_text": n_empty,
                "items_with_brand": int(df["brand"].is_not_null().sum()),
                "items_with_price": int(df["price"].is_not_null().sum()),
                "text_words_mean": float(words.mean()) if len(words) else 0.0,
            }
        ),
        "empty_text_examples": dg.MetadataValue.text(", ".join(df.filter(~pl.col("has_text"))["asin"].head(10).to_list()) or "(none)"),
        "parquet_export": dg.MetadataValue.path(export),
    }
    if len(words):
        md.update(hist_plot("text_words_histogram", words, "words per item text", "words", bins=30))
    return dg.Output(df, metadata=md)
