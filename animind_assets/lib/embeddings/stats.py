"""Quality figures and checks of an embedding table: norms, pairwise cosine, collapse, NaN/inf.

Used by the embedding assets' metadata and asset checks (any domain: ``id_column`` names the id).
Vectors are ``float32 (rows, dim)`` matrices taken from a polars ``embedding`` column
(``pl.Array(pl.Float32, dim)`` or ``pl.List``). No Dagster here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from animind_assets.lib.embeddings.config import EmbeddingError


def nonfinite_rows(mat: np.ndarray) -> np.ndarray:
    """Row indices (int64) of ``mat`` (rows, dim) with any NaN/inf."""
    if mat.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(~np.isfinite(mat).all(axis=1))


def embedding_matrix(df: pl.DataFrame, column: str = "embedding") -> np.ndarray:
    """``float32 (rows, dim)`` from an Array/List vector column (nulls are an error)."""
    if df.height == 0:
        return np.zeros((0, 0), dtype=np.float32)
    col = df[column]
    if col.null_count():
        raise EmbeddingError(f"{column}: {col.null_count()} null vector(s)")
    if isinstance(col.dtype, pl.List):
        col = col.list.to_array(int(col.list.len().max()))
    return np.ascontiguousarray(col.to_numpy(), dtype=np.float32).reshape(df.height, -1)


def norm_stats(mat: np.ndarray) -> dict[str, float]:
    """Min/mean/max/std of the L2 norms of the rows of ``mat`` (NaN for an empty matrix)."""
    if mat.size == 0:
        return {"norm_min": float("nan"), "norm_mean": float("nan"), "norm_max": float("nan"), "norm_std": float("nan")}
    n = np.linalg.norm(mat.astype(np.float64), axis=1)
    return {"norm_min": float(n.min()), "norm_mean": float(n.mean()), "norm_max": float(n.max()), "norm_std": float(n.std())}


def pairwise_cosine_sample(mat: np.ndarray, sample: int = 2000, seed: int = 0) -> np.ndarray:
    """Cosine similarity of every pair (i < j) among a seeded random sample of rows."""
    n = mat.shape[0]
    if n < 2:
        return np.zeros(0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=min(sample, n), replace=False) if n > sample else np.arange(n)
    x = mat[idx].astype(np.float32)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    sims = x @ x.T
    iu = np.triu_indices(len(idx), k=1)
    return sims[iu]


def cosine_summary(cos: np.ndarray) -> dict[str, float]:
    """Mean, 5/50/95th percentile and max of a vector of cosines (``{}`` when empty)."""
    if cos.size == 0:
        return {}
    q = np.quantile(cos, [0.05, 0.5, 0.95])
    return {"cosine_mean": float(cos.mean()), "cosine_p05": float(q[0]), "cosine_p50": float(q[1]), "cosine_p95": float(q[2]), "cosine_max": float(cos.max())}


def identical_vector_pairs(mat: np.ndarray, text_hashes: Sequence[str], ids: Sequence, limit: int = 20) -> list[tuple]:
    """Pairs of ids whose vectors are bit-identical although their texts differ (a collapse symptom)."""
    seen: dict[bytes, tuple] = {}
    pairs: list[tuple] = []
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    for row, h, i in zip(mat, text_hashes, ids):
        key = row.tobytes()
        prev = seen.get(key)
        if prev is None:
            seen[key] = (i, h)
        elif prev[1] != h:
            pairs.append((prev[0], i))
            if len(pairs) >= limit:
                break
    return pairs


@dataclass
class CheckOutcome:
    """Result of a check: ``passed``, a one-line ``description`` naming offending ids, ``metadata``."""

    passed: bool
    description: str
    metadata: dict[str, Any]


def check_finite(df: pl.DataFrame, id_column: str = "anime_id") -> CheckOutcome:
    """Every vector finite (and the table not empty); names up to 20 offending ids."""
    mat = embedding_matrix(df)
    bad = nonfinite_rows(mat)
    bad_ids = [df[id_column][int(b)] for b in bad[:20]]
    return CheckOutcome(
        passed=bad.size == 0 and df.height > 0,
        description=f"{bad.size} vector(s) with NaN/inf" + (f": {id_column} {bad_ids}" if bad.size else ""),
        metadata={"nonfinite_rows": int(bad.size), "nonfinite_ids": ", ".join(map(str, bad_ids)), "rows": df.height},
    )


def check_unit_norm(df: pl.DataFrame, id_column: str = "anime_id", tol: float = 1e-3) -> CheckOutcome:
    """Every vector has ``|norm - 1| <= tol`` (NaN fails); names up to 20 offending ids."""
    mat = embedding_matrix(df)
    norms = np.linalg.norm(mat.astype(np.float64), axis=1) if mat.size else np.zeros(0)
    off = np.flatnonzero(~(np.abs(norms - 1.0) <= tol))  # NaN counts as off
    off_ids = [df[id_column][int(b)] for b in off[:20]]
    return CheckOutcome(
        passed=off.size == 0 and df.height > 0,
        description=f"{off.size} vector(s) with |norm - 1| > {tol}" + (f": {id_column} {off_ids}" if off.size else ""),
        metadata={**{k: v for k, v in norm_stats(mat).items() if v == v}, "off_norm_rows": int(off.size), "off_norm_ids": ", ".join(map(str, off_ids)), "tolerance": tol},
    )


def check_no_collapse(
    df: pl.DataFrame,
    id_column: str = "anime_id",
    threshold: float = 0.9,
    sample: int = 2000,
    seed: int = 0,
) -> CheckOutcome:
    """No collapse: mean pairwise cosine of a seeded ``sample`` of rows below ``threshold`` and no two
    different texts (``text_hash``) with bit-identical vectors."""
    mat = embedding_matrix(df)
    cos = pairwise_cosine_sample(mat, sample=sample, seed=seed)
    mean = float(cos.mean()) if cos.size else float("nan")
    pairs = identical_vector_pairs(mat, df["text_hash"].to_list(), df[id_column].to_list())
    ok_mean = bool(cos.size == 0 or mean < threshold)
    passed = ok_mean and not pairs and df.height > 0
    desc = []
    if not ok_mean:
        desc.append(f"mean pairwise cosine {mean:.4f} >= threshold {threshold}")
    if pairs:
        desc.append(f"{len(pairs)} pair(s) of different texts with identical vectors, e.g. {id_column} {pairs[:5]}")
    if desc:
        desc.append(
            "Cause: the item texts are (nearly) all alike (a broken source export: same title/synopsis/genres on "
            "every row) or the embedding model is broken. Fix: repair the source (compare anime_prep's text column "
            "with the previous run) or the model; the quantizer and semantic IDs are not rebuilt until this passes "
            "(if the catalog really is this uniform, raise collapse_threshold)"
        )
    return CheckOutcome(
        passed=passed,
        description="; ".join(desc) or f"mean pairwise cosine {mean:.4f} < {threshold}, no identical vectors",
        metadata={
            **cosine_summary(cos),
            "threshold": threshold,
            "sample_rows": int(min(sample, df.height)),
            "seed": seed,
            "identical_vector_pairs": len(pairs),
            "identical_examples": json.dumps([[str(a), str(b)] for a, b in pairs[:5]]),
        },
    )
