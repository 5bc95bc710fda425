"""Default locations: the project root and ``$ANIMIND_DATA_DIR`` (``data/`` in the project root when unset)."""

from __future__ import annotations

import os
from pathlib import Path



PROJECT_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return Path(os.environ.get("ANIMIND_DATA_DIR", PROJECT_ROOT / "data")).resolve()


def default_duckdb_path() -> str:
    return str(data_dir() / "animind.duckdb")
