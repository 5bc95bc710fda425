"""``beauty_items``: Amazon Beauty catalog, one row per item (item_id = sorted-ASIN rank).

Source adapter (``animind_assets.lib.amazon``), chosen by ``AmazonSourceConfig`` (shared with
``beauty_interactions``):

* ``source="prepared"`` (default): ``../shared/data/beauty`` (``items.csv`` + ``inter.json``): the
  TIGER/P5 split, item text = ~5 title words.
* ``source="raw"``: the McAuley 5-core review file plus the metadata file (JSON lines or Python-dict
  lines, gzipped or not); item text = title + brand + categories + price (+ description if asked).
"""

import time
from typing import Optional

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.lib.amazon import AmazonData, load_prepared_split, load_raw_amazon
from animind_assets.lib.plots import histogram_png
from animind_assets.meta import counts_md, image_md, scalar_metadata, table_metadata
from animind_assets.resources import ParquetExports

GROUP = "beauty"


class AmazonSourceConfig(dg.Config):
    source: str = Field("prepared", description="'prepared' (shared TIGER/P5 split folder) | 'raw' (Amazon review + metadata files)")
    prepared_dir: str = Field("", description="prepared split folder; '' = ../shared/data/beauty (or $ANIMIND_SHARED_DATA/beauty)")
    order: str = Field(
        "inter_json",
        description="prepared split: sequence order, 'inter_json' (tiger-cf, default) | 'user_sequence' (P5); "
        "they differ for ~73% of users (same-day ties)",
    )
    reviews_path: str = Field("", description="raw: 5-core reviews file (JSON or Python-dict lines, .gz or plain)")
    metadata_path: Optional[str] = Field(None, description="raw: metadata file (JSON or Python-dict lines, .gz or plain)")
    record_format: str = Field("auto", description="raw: 'auto' (JSON, else Python literal) | 'json' | 'python'")
    max_description_chars: int = Field(0, description="raw: description characters appended to the item text (0 = none)")

    def load(self) -> AmazonData:
        if self.source == "prepared":
            return load_prepared_split(self.prepared_dir or None, order=self.order)
        if self.source == "raw":
            if not self.reviews_path:
                raise ValueError("AmazonSourceConfig: source='raw' needs reviews_path")
            return load_raw_amazon(self.reviews_path, self.metadata_path, fmt=self.record_format, max_description_chars=self.max_description_chars)
        raise ValueError(f"AmazonSourceConfig.source={self.source!r}; expected 'prepared' or 'raw'")


def source_metadata(data: AmazonData) -> dict:
    md = {
        "source_origin": dg.MetadataValue.text(data.origin),
        "sequence_order": dg.MetadataValue.text(data.order),
        "has_timestamps": dg.MetadataValue.bool(data.has_timestamps),
        "dropped_by_reason": counts_md(data.dropped),
        **scalar_metadata(data.notes, prefix="source_"),
    }
    for i, rep in enumerate(data.reports):
        name = "reviews_file" if i == 0 else "metadata_file"
        md[f"{name}_parse"] = dg.MetadataValue.text(rep.summary())
        md[f"{name}_bad_lines"] = dg.MetadataValue.int(rep.bad)
    return md


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"polars", "duckdb"},
    description="Amazon Beauty items (item_id, asin, text, title, brand, categories, price, description, has_text).",
)
def beauty_items(context: dg.AssetExecutionContext, config: AmazonSourceConfig, exports: ParquetExports) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    data = config.load()
    df = data.items
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
        md["text_words_histogram"] = image_md(histogram_png(words, "words per item text", "words", bins=30), "Item text length")
    return dg.Output(df, metadata=md)
