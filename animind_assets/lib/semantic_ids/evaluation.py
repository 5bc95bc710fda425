"""How meaningful are semantic IDs? Co-watch recall@K and bucket genre coherence.

Domain-generic (items, users, code matrices, vectors). Public API::

    graph = positive_graph(user_ids, item_ids, statuses, scores, item_universe=ids)
    report = cowatch_recall(item_ids, full_codes, vectors, graph, k=20, max_queries=500, seed=42)
    report["methods"]["semantic_id"]["mean_recall"], ...["embedding_cosine"], ...["random"]
    coherence = bucket_genre_coherence(first_level_codes, genre_sets, seed=42)

Co-watch recall@K follows the original AniMind tokenizer:

* positives: interactions with ``status == completed_status`` (2) and ``score >= min_score`` (7);
  an item's *support* is its number of positive users;
* queries: items with support ``>= min_support`` (10), shuffled with ``random.Random(seed)`` (from
  ascending id order) and the first ``max_queries`` (500) kept;
* proxy neighbours of a query: the top-K other items by co-occurrence Jaccard
  ``co / (support_q + support_j - co)`` among positive users (ties by ascending id);
* recall of a ranking = ``|proxy ∩ top-K of the ranking| / min(K, |proxy|)``, averaged over queries.

Rankings compared (the query itself excluded):

* ``semantic_id``: longest shared ID prefix first, ties broken by embedding cosine (not item id);
* ``embedding_cosine``: plain cosine of the item vectors -- the ceiling for content-only IDs;
* ``random``: a seeded random ranking (its expectation ``K |proxy| / ((n-1) min(K,|proxy|))`` is
  reported too).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from statistics import mean, median
from typing import Any

import numpy as np
import scipy.sparse as sp


@dataclass
class PositiveGraph:
    item_ids: np.ndarray  # (n_items,) the item universe, in ranking index order
    matrix: sp.csr_matrix  # (n_users, n_items) binary: user has a positive interaction with item
    support: np.ndarray  # (n_items,) positive users per item
    n_positive_rows: int


def positive_graph(
    user_ids,
    item_ids,
    statuses,
    scores,
    item_universe,
    completed_status: int = 2,
    min_score: int = 7,
) -> PositiveGraph:
    """Binary user x item matrix of positive interactions, restricted to ``item_universe``."""
    universe = np.asarray(item_universe, dtype=np.int64)
    users = np.asarray(user_ids, dtype=np.int64)
    items = np.asarray(item_ids, dtype=np.int64)
    st = np.asarray(statuses, dtype=np.int64)
    sc = np.asarray(scores, dtype=np.int64)
    keep = (st == completed_status) & (sc >= min_score)
    order = np.argsort(universe, kind="stable")
    pos = np.searchsorted(universe[order], items[keep])
    pos = np.clip(pos, 0, max(len(universe) - 1, 0))
    known = (universe[order][pos] == items[keep]) if len(universe) else np.zeros(0, dtype=bool)
    item_idx = order[pos[known]]
    u = users[keep][known]
    _, user_idx = np.unique(u, return_inverse=True)
    n_users = int(user_idx.max()) + 1 if user_idx.size else 0
    m = sp.csr_matrix(
        (np.ones(len(item_idx), dtype=np.float32), (user_idx.reshape(-1), item_idx)),
        shape=(n_users, len(universe)),
    )
    m.data[:] = 1.0  # duplicates (same user, same item) count once
    m.sum_duplicates()
    m.data[:] = 1.0
    support = np.asarray(m.sum(axis=0)).reshape(-1).astype(np.int64)
    return PositiveGraph(universe, m, support, int(keep.sum()))


def select_queries(graph: PositiveGraph, min_support: int = 10, max_queries: int = 500, seed: int = 42) -> np.ndarray:
    """Indices (into ``graph.item_ids``) of the query items."""
    eligible = np.flatnonzero(graph.support >= min_support)
    eligible = eligible[np.argsort(graph.item_ids[eligible], kind="stable")].tolist()
    random.Random(seed).shuffle(eligible)
    if max_queries > 0:
        eligible = eligible[:max_queries]
    return np.asarray(eligible, dtype=np.int64)


def proxy_neighbours(graph: PositiveGraph, queries: np.ndarray, k: int = 20) -> list[np.ndarray]:
    """Top-``k`` co-occurrence-Jaccard neighbours (item indices) of each query."""
    if len(queries) == 0:
        return []
    mt = graph.matrix.T.tocsr()
    co = (mt[queries] @ graph.matrix).tocsr()  # (q, n_items) co-occurrence counts
    out = []
    ids = graph.item_ids
    for row, q in enumerate(queries):
        start, end = co.indptr[row], co.indptr[row + 1]
        cand = co.indices[start:end]
        cnt = co.data[start:end].astype(np.float64)
        mask = cand != q
        cand, cnt = cand[mask], cnt[mask]
        denom = graph.support[q] + graph.support[cand] - cnt
        ok = denom > 0
        cand, score = cand[ok], cnt[ok] / denom[ok]
        order = np.lexsort((ids[cand], -score))[:k]
        out.append(cand[order])
    return out


def _normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def prefix_depth(codes: np.ndarray, query: int) -> np.ndarray:
    """Length of the shared code prefix between every row and row ``query``."""
    eq = codes == codes[query]
    return np.cumprod(eq, axis=1).sum(axis=1)


def rank_semantic(codes: np.ndarray, unit_vectors: np.ndarray, query: int, k: int) -> np.ndarray:
    """Top-``k`` rows by (shared prefix length desc, cosine desc), query excluded."""
    depth = prefix_depth(codes, query).astype(np.float64)
    cos = unit_vectors @ unit_vectors[query]
    depth[query] = -1.0
    cos = cos.astype(np.float64)
    cos[query] = -np.inf
    return np.lexsort((-cos, -depth))[:k]


def rank_cosine(unit_vectors: np.ndarray, query: int, k: int) -> np.ndarray:
    cos = (unit_vectors @ unit_vectors[query]).astype(np.float64)
    cos[query] = -np.inf
    top = np.argpartition(-cos, min(k, len(cos) - 1))[: k + 1]
    top = top[np.argsort(-cos[top], kind="stable")]
    return top[top != query][:k]


def recall_value(proxy: np.ndarray, ranked: np.ndarray, k: int) -> float:
    denom = max(1, min(k, len(proxy)))
    return len(set(proxy[:k].tolist()) & set(ranked[:k].tolist())) / denom


def cowatch_recall(
    item_ids,
    full_codes: np.ndarray,
    vectors: np.ndarray,
    graph: PositiveGraph,
    k: int = 20,
    min_support: int = 10,
    max_queries: int = 500,
    seed: int = 42,
    n_examples: int = 5,
) -> dict[str, Any]:
    """Mean/median co-watch recall@K of the semantic-ID, embedding-cosine and random rankings.

    ``item_ids``/``full_codes``/``vectors`` share row order and must equal ``graph.item_ids``.
    """
    ids = np.asarray(item_ids, dtype=np.int64)
    if not np.array_equal(ids, graph.item_ids):
        raise ValueError("cowatch_recall: item_ids must be the graph's item universe in the same order")
    codes = np.asarray(full_codes)
    unit = _normalize(vectors)
    queries = select_queries(graph, min_support, max_queries, seed)
    proxies = proxy_neighbours(graph, queries, k)
    rng = np.random.default_rng(seed)
    n = len(ids)
    vals: dict[str, list[float]] = {"semantic_id": [], "embedding_cosine": [], "random": []}
    expected_random: list[float] = []
    examples = []
    depth_hist: dict[int, int] = {}
    for q, proxy in zip(queries, proxies):
        if len(proxy) == 0:
            continue
        sem = rank_semantic(codes, unit, int(q), k)
        cos = rank_cosine(unit, int(q), k)
        others = np.delete(np.arange(n), q)
        rnd = rng.choice(others, size=min(k, len(others)), replace=False)
        vals["semantic_id"].append(recall_value(proxy, sem, k))
        vals["embedding_cosine"].append(recall_value(proxy, cos, k))
        vals["random"].append(recall_value(proxy, rnd, k))
        expected_random.append(min(k, n - 1) * len(proxy) / ((n - 1) * max(1, min(k, len(proxy)))))
        d = prefix_depth(codes, int(q))[sem]
        for v in d.tolist():
            depth_hist[int(v)] = depth_hist.get(int(v), 0) + 1
        examples.append(
            {
                "item_id": int(ids[q]),
                "recall_semantic_id": vals["semantic_id"][-1],
                "recall_embedding_cosine": vals["embedding_cosine"][-1],
                "proxy_neighbours": ids[proxy[:5]].tolist(),
                "semantic_neighbours": ids[sem[:5]].tolist(),
            }
        )
    methods = {
        name: {
            "mean_recall": float(mean(v)) if v else 0.0,
            "median_recall": float(median(v)) if v else 0.0,
        }
        for name, v in vals.items()
    }
    ceiling = methods["embedding_cosine"]["mean_recall"]
    examples.sort(key=lambda e: e["recall_semantic_id"])
    return {
        "status": "ok" if vals["semantic_id"] else "skipped",
        "k": k,
        "min_support": min_support,
        "eligible_items": int((graph.support >= min_support).sum()),
        "evaluated_queries": len(vals["semantic_id"]),
        "positive_rows": graph.n_positive_rows,
        "methods": methods,
        "random_expected": float(mean(expected_random)) if expected_random else 0.0,
        "semantic_vs_cosine": (methods["semantic_id"]["mean_recall"] / ceiling) if ceiling > 0 else float("nan"),
        "semantic_topk_prefix_depth_counts": dict(sorted(depth_hist.items())),
        "worst_examples": examples[:n_examples],
        "best_examples": examples[-n_examples:],
    }


def _pairwise_jaccard(sets: list[set]) -> float | None:
    sets = [s for s in sets if s]
    if len(sets) < 2:
        return None
    vals = []
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            union = len(sets[i] | sets[j])
            if union:
                vals.append(len(sets[i] & sets[j]) / union)
    return float(mean(vals)) if vals else None


def bucket_genre_coherence(
    first_codes,
    genre_sets: list[set],
    sample_size: int = 10,
    min_bucket: int = 20,
    top_buckets: int = 20,
    seed: int = 42,
) -> dict[str, Any]:
    """Mean pairwise genre Jaccard inside first-level buckets vs random buckets of the same sizes.

    ``inspected``: the original procedure (the ``top_buckets`` largest buckets with at least
    ``min_bucket`` members, ``sample_size`` members drawn per bucket). ``all_buckets``: every bucket
    with >= 2 members (up to ``sample_size`` sampled), weighted equally. The random baseline
    shuffles bucket membership (same bucket sizes) with the same seed.
    """
    first = np.asarray(first_codes)
    n = len(first)
    rng = random.Random(seed)

    def buckets_of(assign: np.ndarray) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, c in enumerate(assign.tolist()):
            out.setdefault(int(c), []).append(i)
        return out

    def score(bk: dict[int, list[int]], r: random.Random) -> tuple[float | None, float | None, list[dict]]:
        ranked = sorted((m for m in bk.values() if len(m) >= min_bucket), key=len, reverse=True)[:top_buckets]
        insp, rows = [], []
        for members in ranked:
            pick = list(members)
            r.shuffle(pick)
            v = _pairwise_jaccard([genre_sets[i] for i in pick[:sample_size]])
            rows.append({"bucket_size": len(members), "avg_genre_jaccard": v, "sample_rows": pick[:sample_size]})
            if v is not None:
                insp.append(v)
        allv = []
        for members in bk.values():
            if len(members) < 2:
                continue
            pick = list(members)
            r.shuffle(pick)
            v = _pairwise_jaccard([genre_sets[i] for i in pick[:sample_size]])
            if v is not None:
                allv.append(v)
        return (float(mean(insp)) if insp else None), (float(mean(allv)) if allv else None), rows

    real = buckets_of(first)
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = np.empty_like(first)
    shuffled[perm] = first  # same bucket sizes, random members
    rand = buckets_of(shuffled)
    insp, allv, rows = score(real, rng)
    r_insp, r_allv, _ = score(rand, random.Random(seed + 1))
    sizes = np.array([len(m) for m in real.values()])
    return {
        "buckets": int(len(real)),
        "eligible_buckets": int((sizes >= min_bucket).sum()),
        "bucket_size_mean": float(sizes.mean()) if len(sizes) else 0.0,
        "bucket_size_max": int(sizes.max()) if len(sizes) else 0,
        "inspected_genre_jaccard": insp,
        "inspected_genre_jaccard_random": r_insp,
        "all_buckets_genre_jaccard": allv,
        "all_buckets_genre_jaccard_random": r_allv,
        "inspected": rows,
    }
