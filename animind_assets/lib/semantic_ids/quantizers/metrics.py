"""Code-quality statistics for an ``(n_items, levels)`` integer code matrix.

* usage (per level): fraction of the ``codebook_size`` codes assigned to at least one item;
* perplexity (per level): ``exp(entropy)`` of the code distribution (``codebook_size`` when
  perfectly uniform, 1 when every item gets the same code);
* unique fraction: distinct code tuples / items (1.0 = no collisions);
* items in collisions: fraction of items whose full code tuple is shared with another item;
* largest collision group: the most items sharing one full code tuple.
"""

from __future__ import annotations

import math

import numpy as np


def level_counts(codes: np.ndarray, level: int, codebook_size: int) -> np.ndarray:
    return np.bincount(np.asarray(codes)[:, level].astype(np.int64), minlength=codebook_size)


def perplexity_from_counts(counts: np.ndarray) -> float:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def collision_stats(codes: np.ndarray) -> dict[str, float]:
    codes = np.asarray(codes)
    n = codes.shape[0]
    if n == 0:
        return {"unique_fraction": 1.0, "items_in_collisions": 0.0, "largest_collision_group": 0, "collision_groups": 0}
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return {
        "unique_fraction": float(len(counts) / n),
        "items_in_collisions": float(counts[counts > 1].sum() / n),
        "largest_collision_group": int(counts.max()),
        "collision_groups": int((counts > 1).sum()),
    }


def code_stats(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Flat dict: ``usage_l{i}``, ``perplexity_l{i}`` (1-based levels) plus ``collision_stats``."""
    codes = np.asarray(codes)
    out: dict[str, float] = {}
    for level in range(codes.shape[1] if codes.ndim == 2 else 0):
        counts = level_counts(codes, level, codebook_size)
        out[f"usage_l{level + 1}"] = float((counts > 0).sum() / codebook_size)
        out[f"perplexity_l{level + 1}"] = perplexity_from_counts(counts)
    out.update(collision_stats(codes))
    return out
