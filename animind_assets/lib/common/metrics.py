"""Ranking metrics for leave-one-out next-item evaluation (one relevant item per query)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def hit_at_k(ranked: Sequence, target, k: int) -> float:
    """1.0 when ``target`` is among the first ``k`` ranked items (Recall@K with one positive)."""
    return 1.0 if target in list(ranked[:k]) else 0.0


def ndcg_at_k(ranked: Sequence, target, k: int) -> float:
    """NDCG@K with one relevant item: 1/log2(rank+1) where rank is 1-based, 0 if not in top K."""
    top = list(ranked[:k])
    if target not in top:
        return 0.0
    rank = top.index(target) + 1
    return 1.0 / math.log2(rank + 1)


def ranking_metrics(rankings: Sequence[Sequence], targets: Sequence, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Mean Hit@K / Recall@K / NDCG@K over queries. Duplicates in a ranking count once (first place)."""
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings but {len(targets)} targets")
    out: dict[str, float] = {}
    n = len(targets)
    for k in ks:
        hits, ndcgs = [], []
        for ranked, target in zip(rankings, targets):
            dedup = list(dict.fromkeys(ranked))
            hits.append(hit_at_k(dedup, target, k))
            ndcgs.append(ndcg_at_k(dedup, target, k))
        out[f"hit@{k}"] = float(np.mean(hits)) if n else 0.0
        out[f"recall@{k}"] = out[f"hit@{k}"]
        out[f"ndcg@{k}"] = float(np.mean(ndcgs)) if n else 0.0
    out["n_queries"] = float(n)
    return out
