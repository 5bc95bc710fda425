"""Non-neural recommender baselines on a user x item interaction matrix (set completion / next item).

All models are fitted on the lists of *training* users only and score items for a query list
(the items a test user's prompt shows). Items are the distinct ``anime_id`` values of those lists
(``items``: int64 ids, sorted; ``index``: id -> column).

* ``popularity_counts`` / ``popularity_ranking``: number of training users per item.
* ``CoWatch``: raw co-occurrence item-kNN, ``score(j) = sum_{h in query} #users(h, j)`` (the
  co-watch baseline used since the first LLM benchmarks; dominated by popular items).
* ``ItemKNN``: cosine item-item kNN (Sarwar et al. 2001, "Item-based collaborative filtering
  recommendation algorithms"; Deshpande & Karypis 2004): ``S = D^-1/2 X^T X D^-1/2`` with the
  diagonal zeroed, each column pruned to its ``neighbours`` largest entries, ``score = q S``.
* ``EASE``: Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data" (WWW'19): closed
  form ``P = (X^T X + lambda I)^-1``, ``B = I - P diag(1 / diag(P))`` (so ``diag(B) = 0``),
  ``score = q B``. Dense ``n_items x n_items`` float64 (8 bytes x n_items^2: 7,000 items = 392 MB).

``rank_scores`` turns a score vector into a top-k list with the project's tie order (higher score
first, then smaller item id), skipping excluded / unknown items and padding with a fallback list.

This module never imports Dagster.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import polars as pl


def _training_pairs(interactions: pl.DataFrame, users: Iterable[int]) -> pl.DataFrame:
    for col in ("user_id", "anime_id"):
        if col not in interactions.columns:
            raise ValueError(f"table 'user_interactions' lacks column {col!r}; it has {interactions.columns}")
    return interactions.filter(pl.col("user_id").is_in(list(users))).select("user_id", "anime_id").unique()


def popularity_counts(interactions: pl.DataFrame, users: Iterable[int]) -> dict[int, int]:
    """anime_id -> number of rows of the given users (one per (user, item) after dedup upstream)."""
    sub = interactions.filter(pl.col("user_id").is_in(list(users)))
    return dict(sub.group_by("anime_id").len().iter_rows())


def popularity_ranking(counts: dict[int, int], exclude: set[int], k: int, allowed: set[int] | None = None) -> list[int]:
    """Top-``k`` ids by count (ties: smaller id first), skipping ``exclude`` and ids outside ``allowed``."""
    order = sorted(counts.items(), key=lambda x: (-x[1], x[0]))
    out = []
    for a, _ in order:
        if a in exclude or (allowed is not None and a not in allowed):
            continue
        out.append(a)
        if len(out) >= k:
            break
    return out


def rank_scores(items: np.ndarray, scores: np.ndarray, exclude: set[int], k: int, fallback: Sequence[int] = (),
                allowed: set[int] | None = None, positive_only: bool = True) -> list[int]:
    """Top-``k`` ids of ``items`` by ``scores`` (float, same length; ties: smaller id first). With
    ``positive_only`` only scores > 0 count (co-occurrence models: 0 = no evidence); the rest of the
    list is padded from ``fallback`` (e.g. popularity)."""
    order = np.lexsort((items, -scores))
    out: list[int] = []
    for i in order.tolist():
        if positive_only and scores[i] <= 0:
            break
        a = int(items[i])
        if a in exclude or (allowed is not None and a not in allowed):
            continue
        out.append(a)
        if len(out) >= k:
            return out
    for a in fallback:
        if a not in exclude and a not in out and (allowed is None or a in allowed):
            out.append(a)
            if len(out) >= k:
                break
    return out


class _ItemModel:
    """Shared fitting of the binary user x item matrix ``X`` (scipy CSR, float32)."""

    positive_only = True

    def __init__(self, interactions: pl.DataFrame, users: Iterable[int]) -> None:
        from scipy import sparse

        sub = _training_pairs(interactions, users)
        if sub.height == 0:
            raise ValueError("no interactions of training users: cannot fit an item baseline")
        self.items = np.array(sorted(set(sub["anime_id"].to_list())), dtype=np.int64)
        self.index = {int(a): i for i, a in enumerate(self.items)}
        uids = {u: i for i, u in enumerate(sorted(set(sub["user_id"].to_list())))}
        rows = np.array([uids[u] for u in sub["user_id"].to_list()], dtype=np.int64)
        cols = np.array([self.index[a] for a in sub["anime_id"].to_list()], dtype=np.int64)
        self.X = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(uids), len(self.items)))

    def query(self, history: Sequence[int]) -> np.ndarray:
        """Binary row vector (n_items,) float64 of the history items known to the model."""
        q = np.zeros(len(self.items), dtype=np.float64)
        idx = [self.index[a] for a in history if a in self.index]
        q[idx] = 1.0
        return q

    def scores(self, history: Sequence[int]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def ranking(self, history: Sequence[int], exclude: set[int], k: int, fallback: Sequence[int] = (),
                allowed: set[int] | None = None) -> list[int]:
        """Top-``k`` ids for ``history`` (see ``rank_scores``)."""
        return rank_scores(self.items, self.scores(history), exclude, k, fallback, allowed, self.positive_only)


class CoWatch(_ItemModel):
    """Item co-occurrence over training users' lists: score(j) = sum_{h in history} #users(h, j)."""

    def __init__(self, interactions: pl.DataFrame, users: Iterable[int]) -> None:
        super().__init__(interactions, users)
        self.XT = self.X.T.tocsr()

    def scores(self, history: Sequence[int]) -> np.ndarray:
        q = self.query(history).astype(np.float32)
        if not q.any():
            return np.zeros(len(self.items), dtype=np.float32)
        user_overlap = self.X @ q  # users: how many of the history items each user has
        return np.asarray(self.XT @ user_overlap).ravel()


class ItemKNN(_ItemModel):
    """Cosine item-item kNN (Sarwar et al. 2001): ``S_ij = c_ij / sqrt(n_i n_j)`` (c = co-occurrence
    counts, n = item counts), diagonal 0, each column keeps its ``neighbours`` largest similarities
    (0 = all); ``score = q S``."""

    def __init__(self, interactions: pl.DataFrame, users: Iterable[int], neighbours: int = 100) -> None:
        super().__init__(interactions, users)
        from scipy import sparse

        co = (self.X.T @ self.X).tocsr().astype(np.float64)
        n = np.asarray(co.diagonal()).ravel()
        inv = 1.0 / np.sqrt(np.maximum(n, 1.0))
        d = sparse.diags(inv)
        s = (d @ co @ d).tocsc()
        s = (s - sparse.diags(s.diagonal())).tocsc()
        s.eliminate_zeros()
        if neighbours > 0:
            s = _top_per_column(s, neighbours)
        self.S = s.tocsr()
        self.neighbours = neighbours

    def scores(self, history: Sequence[int]) -> np.ndarray:
        q = self.query(history)
        return np.asarray(self.S.T @ q).ravel()


def _top_per_column(m, k: int):
    """Keep the ``k`` largest entries of each column of a CSC matrix."""
    from scipy import sparse

    m = m.tocsc()
    data, indices, indptr = [], [], [0]
    for j in range(m.shape[1]):
        a, b = m.indptr[j], m.indptr[j + 1]
        vals, rows = m.data[a:b], m.indices[a:b]
        if len(vals) > k:
            keep = np.argpartition(-vals, k - 1)[:k]
            vals, rows = vals[keep], rows[keep]
        data.append(vals)
        indices.append(rows)
        indptr.append(indptr[-1] + len(vals))
    return sparse.csc_matrix((np.concatenate(data) if data else [], np.concatenate(indices) if indices else [], indptr), shape=m.shape)


def ease_weights(X, lam: float) -> np.ndarray:
    """EASE item-item weights (Steck 2019): ``G = X^T X + lam I``, ``P = G^-1``,
    ``B = I - P / diag(P)`` (column j divided by ``P_jj``), hence ``diag(B) = 0``.

    ``X``: (n_users, n_items) binary, dense or scipy sparse. ``lam`` > 0 (L2 weight). Returns
    (n_items, n_items) float64. ValueError for ``lam <= 0``."""
    if lam <= 0:
        raise ValueError(f"EASE lambda must be > 0, got {lam}")
    g = X.T @ X
    g = np.asarray(g.toarray() if hasattr(g, "toarray") else g, dtype=np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


class EASE(_ItemModel):
    """EASE (Steck 2019) fitted on training users' lists; ``score = q B`` (see ``ease_weights``).
    Negative scores rank too (a real-valued linear model, not a count)."""

    positive_only = False

    def __init__(self, interactions: pl.DataFrame, users: Iterable[int], lam: float = 500.0) -> None:
        super().__init__(interactions, users)
        self.lam = float(lam)
        self.B = ease_weights(self.X, self.lam)

    def scores(self, history: Sequence[int]) -> np.ndarray:
        q = self.query(history)
        return q @ self.B


def pure_svd_item_vectors(interactions: pl.DataFrame, users: Iterable[int], item_ids: Sequence[int], dim: int = 64,
                          seed: int = 0) -> np.ndarray:
    """Collaborative item vectors: PureSVD (Cremonesi, Koren & Turrin, RecSys 2010) of the binary user x item
    matrix of the training ``users``' lists (``interactions``: user_id, anime_id).

    Truncated SVD ``X ~ U S V^T`` (scikit-learn, randomized, ``seed``); item ``j``'s vector is row ``j`` of
    ``V S``, so inner products approximate co-occurrence counts ``X^T X``. Returns float32
    ``(len(item_ids), d)`` in the order of ``item_ids`` with ``d = min(dim, n_items - 1, n_users - 1)``; items
    without a training interaction get a zero row (callers combine them with content vectors). Raises
    ``ValueError`` when the training users have no interactions or ``dim < 1``.
    """
    from sklearn.decomposition import TruncatedSVD

    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    m = _ItemModel(interactions, users)
    d = max(1, min(dim, m.X.shape[1] - 1, m.X.shape[0] - 1))
    svd = TruncatedSVD(n_components=d, random_state=seed).fit(m.X)
    factors = (svd.components_.T * svd.singular_values_).astype(np.float32)  # (n_model_items, d)
    out = np.zeros((len(item_ids), d), dtype=np.float32)
    for i, a in enumerate(item_ids):
        j = m.index.get(int(a))
        if j is not None:
            out[i] = factors[j]
    return out
