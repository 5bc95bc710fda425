"""Helpers that turn library results into Dagster metadata (row counts, schema, previews, plots)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import dagster as dg
import polars as pl

_MAX_CELL = 80


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


def column_schema(df: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=n, type=str(t)) for n, t in df.schema.items()])


def table_metadata(df: pl.DataFrame, preview_rows: int = 10, preview_cols: list[str] | None = None) -> dict:
    preview_df = df.select(preview_cols) if preview_cols else df
    return {
        "dagster/row_count": dg.MetadataValue.int(df.height),
        "dagster/column_schema": column_schema(df),
        "preview": dg.MetadataValue.md(markdown_table(preview_df, preview_rows)),
    }


def image_md(png: bytes, title: str = "") -> dg.MetadataValue:
    data = base64.b64encode(png).decode("ascii")
    header = f"**{title}**\n\n" if title else ""
    return dg.MetadataValue.md(f"{header}![{title or 'plot'}](data:image/png;base64,{data})")


def counts_md(counts: Mapping[str, Any], key: str = "reason", value: str = "rows") -> dg.MetadataValue:
    lines = [f"| {key} | {value} |", "|---|---|"]
    for k, v in counts.items():
        lines.append(f"| {k} | {v} |")
    if len(lines) == 2:
        lines.append("| (none) | 0 |")
    return dg.MetadataValue.md("\n".join(lines))


def scalar_metadata(values: Mapping[str, Any], prefix: str = "") -> dict:
    """Numbers/strings/bools to typed metadata values (skips None)."""
    out: dict[str, dg.MetadataValue] = {}
    for k, v in values.items():
        if v is None:
            continue
        name = f"{prefix}{k}"
        if isinstance(v, bool):
            out[name] = dg.MetadataValue.bool(v)
        elif isinstance(v, int):
            out[name] = dg.MetadataValue.int(v)
        elif isinstance(v, float):
            out[name] = dg.MetadataValue.float(v)
        else:
            out[name] = dg.MetadataValue.text(str(v))
    return out
