"""The LLM dataset's table contract: tasks, splits and the output schema (``llm_prep_dataset``)."""

from __future__ import annotations

import polars as pl

TASKS = ("A", "B", "C")
SPLITS = ("train", "validation", "test")
OUTPUT_SCHEMA = {
    "example_id": pl.Utf8,
    "task": pl.Utf8,
    "template": pl.Utf8,
    "split": pl.Utf8,
    "user_id": pl.Int64,
    "target_anime_id": pl.Int64,
    "system": pl.Utf8,
    "prompt": pl.Utf8,
    "completion": pl.Utf8,
    "history_anime_ids": pl.List(pl.Int64),
    "is_heldout": pl.Boolean,
    "dup_count": pl.Int64,
}

SEQUENCE_TEMPLATE = "seq_id_sequence"  # task-B template of the "sequence" form (training and held-out rows)
