"""Helpers that turn library results into Dagster metadata (row counts, schema, previews, plots)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import dagster as dg
import polars as pl

_MAX_CELL = 80

#: Asset tag: "my data version is a fingerprint of my content" (``semantic_ids``: the ID space;
#: ``rqvae_model``: the quantizer weights). ``animind_assets.automation`` requests the dependents of
#: such an asset only when its data version changed (a rebuild that keeps every ID requests nothing).
CONTENT_VERSION_TAG = "animind/data_version"
CONTENT_VERSION_TAGS = {CONTENT_VERSION_TAG: "content"}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value[:8]) + (" …" if len(value) > 8 else "")
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def markdown_table(df: pl.DataFrame, max_rows: int = 10, max_cols: int = 12) -> str:
    cols = df.columns[:max_cols]
    head = df.head(max_rows).select(cols)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


#: column descriptions shown in every table's schema (``TableColumn.description``), by column name;
#: an asset passes ``descriptions=`` to override or add. Patterns (``code_l<i>``, ``recall@K``, ...)
#: are handled by ``describe_column``.
COLUMN_DESCRIPTIONS: dict[str, str] = {
    # anime_prep
    "anime_id": "MyAnimeList anime id",
    "name": "title as in the source (romaji)",
    "english_name": "English title (null when the source has none)",
    "title": "display title: English title, else name",
    "genres": "genres, source order",
    "synopsis": "synopsis (null for missing or MAL placeholder texts)",
    "type": "TV, Movie, OVA, ONA, Special or Music",
    "episodes": "episode count (null when unknown)",
    "year": "year of the first airing season",
    "premiered": "airing season as in the source, e.g. 'Spring 1998'",
    "studios": "animation studios",
    "source": "original material, e.g. Manga",
    "rating": "anime_prep: age rating, e.g. 'PG-13 - Teens 13 or older'; Beauty interactions: review rating 1-5",
    "score": "MAL mean score 1-10 (null when unknown); in user_interactions the user's score, 0 = unscored",
    "members": "MAL members with the title in their list",
    "has_synopsis": "a real synopsis is present",
    "missing_core_fields": "core fields that are null or empty for this anime",
    "anime_text": "text that is embedded: title, genres, type, studios, source, synopsis",
    # interactions
    "user_id": "user id",
    "status": "list status: 1 watching, 2 completed, 3 on hold, 4 dropped, 6 plan to watch",
    "watched_episodes": "episodes watched",
    "seq": "0-based position of the row in the user's list (source order)",
    # embeddings
    "embedding": "unit-norm text embedding (float32)",
    "dim": "embedding dimension",
    "text_hash": "SHA-256 prefix of the embedded text (unchanged text = reused vector)",
    "model": "embedding model name",
    "model_fingerprint": "fingerprint of the model weights, pooling and settings",
    "embedded_at": "UTC time this vector was computed",
    # semantic ids
    "codes": "full semantic ID as integers: quantizer codes, then the disambiguation index",
    "semantic_id": "semantic ID token string, e.g. <L1_47><L2_203><L3_9><L4_0> (unique per item)",
    "collision_group_size": "items sharing these quantizer codes before disambiguation (1 = unique)",
    # semantic_id_report
    "method": "ranking method (semantic_id, embedding_cosine, random, LM, popularity, co-watch)",
    "k": "cut-off K of recall@K",
    "mean_recall": "mean co-watch recall@K over the query anime",
    "median_recall": "median co-watch recall@K over the query anime",
    "ratio_to_embedding_cosine": "mean recall / the embedding-cosine ranking's mean recall (its ceiling)",
    "queries": "query anime evaluated",
    "n_users": "test users evaluated",
    "valid_id_rate": "share of generated IDs that name a catalog item",
    # llm_prep_dataset
    "example_id": "stable example id",
    "task": "training task of the example",
    "template": "prompt template name",
    "split": "train / validation / test (split by user)",
    "target_anime_id": "anime the completion names",
    "system": "system prompt",
    "prompt": "prompt text with semantic-ID tokens",
    "completion": "expected completion (semantic-ID tokens)",
    "history_anime_ids": "anime of the user's history shown in the prompt, in order",
    "is_heldout": "example from a held-out user",
    "dup_count": "identical (prompt, completion) pairs merged into this row",
    # beauty
    "item_id": "dense item id (Amazon Beauty)",
    "asin": "Amazon product id (ASIN)",
    "text": "item text that is embedded: title, brand, categories, price, description",
    "brand": "brand",
    "categories": "category path",
    "price": "price in USD (null when unknown)",
    "description": "product description",
    "has_text": "the item has a non-empty text",
    "timestamp": "review time (Unix seconds)",
    "reviewer_id": "Amazon reviewer id",
    "kind": "measured here, or published (paper figure, not ours)",
    "id_source": "which semantic IDs the model used",
    "invalid_id_rate": "share of generated IDs not in the catalog (constrained decoding)",
    "unconstrained_invalid_id_rate": "share of generated IDs not in the catalog without the trie constraint",
    "test_users": "test users evaluated (leave-one-out)",
}

_PATTERNS = (
    (r"code_l(\d+)", "quantizer code at level {0} (the last level is the disambiguation index)"),
    (r"recall@(\d+)", "Recall@{0}: share of held-out items found in the top {0}"),
    (r"ndcg@(\d+)", "NDCG@{0} of the held-out item in the top {0}"),
    (r"hit@(\d+)", "Hit@{0}: share of users whose held-out item is in the top {0}"),
)


def describe_column(name: str, descriptions: Mapping[str, str] | None = None) -> str | None:
    """Description of column ``name``: ``descriptions`` first, then ``COLUMN_DESCRIPTIONS``, then patterns."""
    import re

    if descriptions and name in descriptions:
        return descriptions[name]
    if name in COLUMN_DESCRIPTIONS:
        return COLUMN_DESCRIPTIONS[name]
    for pattern, text in _PATTERNS:
        m = re.fullmatch(pattern, name)
        if m:
            return text.format(*m.groups())
    return None


def column_schema(df: pl.DataFrame, descriptions: Mapping[str, str] | None = None) -> dg.TableSchema:
    """``TableSchema`` of a frame with ``TableColumn.description`` from ``describe_column``."""
    return dg.TableSchema(
        columns=[dg.TableColumn(name=n, type=str(t), description=describe_column(n, descriptions)) for n, t in df.schema.items()]
    )


def table_metadata(
    df: pl.DataFrame,
    preview_rows: int = 10,
    preview_cols: list[str] | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> dict:
    """The one row count (``dagster/row_count``), the schema with column descriptions, a preview."""
    preview_df = df.select(preview_cols) if preview_cols else df
    return {
        "dagster/row_count": dg.MetadataValue.int(df.height),
        "dagster/column_schema": column_schema(df, descriptions),
        "preview": dg.MetadataValue.md(markdown_table(preview_df, preview_rows)),
    }


def image_md(png: bytes, title: str = "") -> dg.MetadataValue:
    """PNG as markdown (Dagster shows it behind "[Show Markdown]": data URIs exceed the inline limit)."""
    data = base64.b64encode(png).decode("ascii")
    header = f"**{title}**\n\n" if title else ""
    return dg.MetadataValue.md(f"{header}![{title or 'plot'}](data:image/png;base64,{data})")


#: Dagster's UI renders markdown metadata shorter than this inline (asset page, event tables)
INLINE_MD_LIMIT = 1000


def svg_md(svg: str, title: str, caption: str = "") -> dg.MetadataValue | None:
    """A small SVG chart as markdown short enough to be rendered inline; ``None`` when too long."""
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    md = f"![{title}](data:image/svg+xml;base64,{data})" + (f" {caption}" if caption else "")
    return dg.MetadataValue.md(md) if len(md) < INLINE_MD_LIMIT else None


def plot_metadata(
    name: str,
    values: Mapping[str, float] | None = None,
    title: str = "",
    ylabel: str = "",
    *,
    series: Mapping[str, Any] | None = None,
    logy: bool = False,
    xlabel: str = "epoch",
) -> dict:
    """``{name: PNG markdown (full plot, pop-up), name + "_inline": tiny SVG (shown without a click)}``.

    ``values``: a bar chart (label -> value); ``series``: line chart (name -> values over x).
    """
    from animind_assets.lib.common.plots import bar_png, bars_svg, lines_png, lines_svg

    out: dict = {}
    if series is not None:
        out[name] = image_md(lines_png(series, title, xlabel=xlabel, ylabel=ylabel, logy=logy), title)
        small = None
        for pts in (24, 16, 10, 6):
            small = svg_md(lines_svg(series, max_points=pts, logy=logy), title, f"{title} ({', '.join(list(series)[:4])})")
            if small is not None:
                break
    else:
        vals = dict(values or {})
        out[name] = image_md(bar_png(vals, title, ylabel), title)
        caption = ", ".join(f"{k} {_short(v)}" for k, v in list(vals.items())[:6])
        small = svg_md(bars_svg(vals), title, caption) or svg_md(bars_svg(vals), title)
    if small is not None:
        out[f"{name}_inline"] = small
    return out


def bar_plot(name: str, counts: Mapping[str, float], title: str, ylabel: str = "count") -> dict:
    """Bar chart: PNG (pop-up) + inline SVG. Same as ``plot_metadata(name, counts, title, ylabel)``."""
    return plot_metadata(name, counts, title, ylabel)


def hist_plot(name: str, values: Any, title: str, xlabel: str, bins: int = 50) -> dict:
    """Histogram: PNG (pop-up, ``bins`` bins) + inline SVG bars (20 bins) with the range in the caption."""
    import numpy as np

    from animind_assets.lib.common.plots import bars_svg, histogram_png

    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    out = {name: image_md(histogram_png(arr, title, xlabel, bins=bins), title)}
    if arr.size:
        counts, edges = np.histogram(arr, bins=20)
        caption = f"{title}: {xlabel} {_short(float(edges[0]))} .. {_short(float(edges[-1]))}, median {_short(float(np.median(arr)))}"
        small = svg_md(bars_svg({str(i): float(c) for i, c in enumerate(counts)}), title, caption)
        if small is not None:
            out[f"{name}_inline"] = small
    return out


def lines_plot(name: str, series: Mapping[str, Any], title: str, xlabel: str = "epoch", ylabel: str = "", logy: bool = False) -> dict:
    """Line chart: PNG (pop-up) + inline SVG."""
    return plot_metadata(name, title=title, ylabel=ylabel, series=series, logy=logy, xlabel=xlabel)


#: below this many items a throughput figure is dominated by fixed costs (model load, start-up)
MIN_ITEMS_FOR_RATE = 50


def rate_metadata(name: str, done: int, seconds: float, unit: str = "rows", min_items: int = MIN_ITEMS_FOR_RATE) -> dict:
    """Work done, its wall time and the rate over the work done, side by side.

    ``{name: done, name + "_seconds": wall, name + "_per_s": done / wall}``; below ``min_items``
    the rate is left out and ``name + "_rate_note"`` says why (e.g. 3 texts embedded in 10.2 s
    including the model load: 0.29/s would describe the load, not the throughput).
    """
    out: dict = {f"{name}": dg.MetadataValue.int(int(done)), f"{name}_seconds": dg.MetadataValue.float(round(float(seconds), 2))}
    if done >= min_items and seconds > 0:
        out[f"{name}_per_s"] = dg.MetadataValue.float(round_float(done / seconds))
    elif done:
        out[f"{name}_rate_note"] = dg.MetadataValue.text(
            f"{done:,} {unit} in {seconds:.1f} s wall (fixed costs such as model loading included); no rate shown "
            f"below {min_items} {unit}"
        )
    return out


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def round_float(v: float) -> float:
    """Metadata rounding: 4 significant digits, at most 2 decimals at |v| >= 100 (e.g. 12,345.68)."""
    if v != v or v in (float("inf"), float("-inf")) or v == 0:
        return v
    if abs(v) >= 100:
        return round(v, 2 if abs(v) < 1e6 else 0)
    return float(f"{v:.4g}")


def counts_md(counts: Mapping[str, Any], key: str = "reason", value: str = "rows") -> dg.MetadataValue:
    lines = [f"| {key} | {value} |", "|---|---|"]
    for k, v in counts.items():
        lines.append(f"| {k} | {v} |")
    if len(lines) == 2:
        lines.append("| (none) | 0 |")
    return dg.MetadataValue.md("\n".join(lines))


def scalar_metadata(values: Mapping[str, Any], prefix: str = "") -> dict:
    """Numbers/strings/bools to typed metadata values (skips None; floats rounded by ``round_float``;
    numpy scalars converted)."""
    out: dict[str, dg.MetadataValue] = {}
    for k, v in values.items():
        if v is None:
            continue
        if hasattr(v, "item") and not isinstance(v, (str, bytes)) and getattr(v, "ndim", 1) == 0:
            v = v.item()  # numpy scalar
        name = f"{prefix}{k}"
        if isinstance(v, bool):
            out[name] = dg.MetadataValue.bool(v)
        elif isinstance(v, int):
            out[name] = dg.MetadataValue.int(v)
        elif isinstance(v, float):
            out[name] = dg.MetadataValue.float(round_float(v))
        else:
            out[name] = dg.MetadataValue.text(str(v))
    return out
