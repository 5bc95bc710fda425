"""Deterministic content fingerprints for data versions and input tracking."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import polars as pl


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def json_fingerprint(obj: Any) -> str:
    payload = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def frame_fingerprint(df: pl.DataFrame, sort_by: str | list[str] | None = None) -> str:
    """Content hash of a frame, independent of row order when ``sort_by`` is given."""
    if sort_by is not None:
        df = df.sort(sort_by)
    h = hashlib.sha256()
    h.update(json.dumps([f"{n}:{t}" for n, t in df.schema.items()]).encode())
    row_hashes = df.hash_rows(seed=0, seed_1=1, seed_2=2, seed_3=3).to_numpy()
    h.update(np.ascontiguousarray(row_hashes).tobytes())
    return h.hexdigest()[:16]


def array_fingerprint(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:16]
