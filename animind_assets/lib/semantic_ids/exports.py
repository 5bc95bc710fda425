"""Semantic-ID export files in the original AniMind tokenizer's shapes (JSONL, TSV, vocab JSON).

Pure Python (no Dagster): the ``semantic_ids`` asset stages these files and publishes the folder atomically.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import polars as pl

from animind_assets.lib.semantic_ids.tokens import level_tokens


def export_rows(df: pl.DataFrame) -> list[dict]:
    """One dict per row of ``df`` (columns anime_id, semantic_id, codes, name, english_name, genres): rows of ``semantic_ids.jsonl`` in the original tokenizer's shape."""
    rows = []
    for r in df.iter_rows(named=True):
        genres = r.get("genres")
        rows.append(
            {
                "anime_id": r["anime_id"],
                "name": r.get("name") or "",
                "english_name": r.get("english_name") or "",
                "genres": ", ".join(genres) if isinstance(genres, list) else (genres or ""),
                "semantic_id": r["semantic_id"],
                "tokens": level_tokens(r["codes"]),
                "codes": list(r["codes"]),
            }
        )
    return rows


def write_export_files(folder: Path, rows: list[dict], vocab: dict, meta: dict) -> None:
    """Write the exports into ``folder`` (a staging directory that the caller publishes atomically):
    ``semantic_ids.jsonl``, ``semantic_lookup.tsv``, ``semantic_id_to_anime.jsonl``, ``semantic_vocab.json``,
    ``special_tokens.json``. ``rows`` come from ``export_rows``; ``vocab`` from ``build_vocab``."""
    tmp = Path(folder)
    with open(tmp / "semantic_ids.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(tmp / "semantic_lookup.tsv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["anime_id", "name", "english_name", "semantic_id", "level_tokens_json", "codes_json"])
        for row in rows:
            w.writerow(
                [row["anime_id"], row["name"], row["english_name"], row["semantic_id"],
                 json.dumps(row["tokens"], ensure_ascii=True), json.dumps(row["codes"], ensure_ascii=True)]
            )
    with open(tmp / "semantic_id_to_anime.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            inv = {k: row[k] for k in ("semantic_id", "anime_id", "name", "english_name")}
            fh.write(json.dumps(inv, ensure_ascii=False) + "\n")
    (tmp / "semantic_vocab.json").write_text(
        json.dumps(
            {
                **meta,
                "vocab_size": vocab["vocab_size"],
                "level_sizes": vocab["level_sizes"],
                "special_tokens": vocab["special_tokens"],
                "tokens": vocab["tokens"],
                "token_to_id": vocab["token_to_id"],
            },
            indent=2,
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    (tmp / "special_tokens.json").write_text(
        json.dumps({"special_tokens": vocab["special_tokens"]}, indent=2, ensure_ascii=False), encoding="utf-8"
    )
