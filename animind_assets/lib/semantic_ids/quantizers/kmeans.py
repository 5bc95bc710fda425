"""Seeded k-means in plain PyTorch (k-means++ or Ward seeding + Lloyd iterations).

Used to initialise codebooks (level by level, on encoded residuals) and by the residual k-means
quantizer. Deterministic for a given ``seed`` on CPU. Empty clusters are re-seeded with the points
farthest from their centroid, so every returned centroid owns at least one point when
``n >= k`` (good for codebook usage).

``init="ward"`` seeds the centroids with the cluster means of a Ward agglomerative clustering
constrained to a k-nearest-neighbour graph (scikit-learn). Ward merges the tightest groups first,
so near-duplicate items (sequels, series of the same franchise) are not split across clusters the
way Voronoi cells of k-means++ seeds often split them; the nearest-centroid assignment to those
centroids keeps much more of every item's close neighbourhood inside its own cluster (on MAL
2020 / MiniLM: co-watch recall@20 of the resulting first-level buckets 0.089 vs 0.077-0.079 for
k-means++, embedding-cosine ceiling 0.105). Above ``ward_max_rows`` rows Ward runs on a seeded
sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, d)
    assignments: torch.Tensor  # (n,) int64
    inertia: float  # mean squared distance to the assigned centroid
    iterations: int


def pairwise_sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances (n, k) computed as |x|^2 - 2 x.c + |c|^2 (clamped at 0)."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1).unsqueeze(0)
    return d.clamp_min_(0.0)


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest row of ``c`` for each row of ``x`` and the squared distance to it."""
    idx, dist = [], []
    for s in range(0, x.shape[0], chunk):
        d = pairwise_sq_dists(x[s : s + chunk], c)
        m, i = d.min(dim=1)
        idx.append(i)
        dist.append(m)
    if not idx:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=x.dtype)
    return torch.cat(idx), torch.cat(dist)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling). Distances to each new seed come from one matrix-vector
    product (``|x|^2 - 2 x.c + |c|^2``), so seeding costs about one Lloyd assignment pass."""
    n = x.shape[0]
    sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=generator).item())
    chosen = [first]
    d2 = (sq - 2.0 * (x @ x[first]) + sq[first]).clamp_min_(0.0)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0.0:
            j = int(torch.randint(n, (1,), generator=generator).item())
        else:
            j = int(torch.multinomial(d2 / total, 1, generator=generator).item())
        chosen.append(j)
        torch.minimum(d2, (sq - 2.0 * (x @ x[j]) + sq[j]).clamp_min_(0.0), out=d2)
    return x[torch.tensor(chosen)].clone()


def knn_graph(x: torch.Tensor, n_neighbors: int, chunk: int = 4096):
    """Symmetric-enough sparse kNN connectivity matrix (scipy CSR) by chunked squared distances."""
    import numpy as np
    import scipy.sparse as sp

    n = x.shape[0]
    k = max(1, min(int(n_neighbors), n - 1))
    sq = (x * x).sum(1)
    rows, cols = [], []
    for s in range(0, n, chunk):
        d = sq[s : s + chunk, None] - 2.0 * (x[s : s + chunk] @ x.T) + sq[None, :]
        idx = torch.arange(s, min(s + chunk, n))
        d[torch.arange(len(idx)), idx] = float("inf")  # no self loops
        nb = torch.topk(d, k, dim=1, largest=False).indices
        rows.append(idx.repeat_interleave(k))
        cols.append(nb.reshape(-1))
    r = torch.cat(rows).numpy()
    c = torch.cat(cols).numpy()
    return sp.csr_matrix((np.ones(len(r), dtype=np.float64), (r, c)), shape=(n, n))


def ward_centroids(
    x: torch.Tensor, k: int, n_neighbors: int = 10, max_rows: int = 50_000, seed: int = 0
) -> torch.Tensor:
    """Cluster means of a kNN-connectivity-constrained Ward clustering into ``k`` clusters."""
    import warnings

    from sklearn.cluster import AgglomerativeClustering

    x = x.detach().float().cpu()
    if max_rows and x.shape[0] > max_rows:
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:max_rows]
        x = x[pick.sort().values]
    graph = knn_graph(x, n_neighbors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "completing" a disconnected kNN graph is fine
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward", connectivity=graph).fit_predict(x.numpy())
    lab = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(lab, minlength=k).to(x.dtype)
    return torch.zeros(k, x.shape[1]).index_add_(0, lab, x) / counts.clamp_min(1.0).unsqueeze(1)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 25,
    seed: int = 0,
    tol: float = 1e-6,
    spherical: bool = False,
    init: str = "kmeans++",
    ward_neighbors: int = 10,
    ward_max_rows: int = 50_000,
) -> KMeansResult:
    """Lloyd's k-means with k-means++ (default) or Ward (``init="ward"``) seeding.

    ``iters=0`` returns the seeds themselves with the nearest-centroid assignment.
    ``spherical=True`` renormalises centroids to unit length after each update (cosine k-means for
    unit-norm data). When ``n <= k`` the surplus centroids are copies of data points, so the
    codebook still has ``k`` rows.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.detach().float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans needs at least one point")
    g = torch.Generator().manual_seed(int(seed))
    if n <= k:
        reps = torch.cat([torch.arange(n), torch.randint(n, (k - n,), generator=g)])
        c = x[reps].clone()
        a, d = nearest(x, c)
        return KMeansResult(c, a, float(d.mean()), 0)
    if init == "ward":
        c = ward_centroids(x, k, ward_neighbors, ward_max_rows, seed).to(x.device)
    elif init == "kmeans++":
        c = kmeans_plus_plus(x, k, g)
    else:
        raise ValueError(f"unknown k-means init {init!r}")
    prev = float("inf")
    it = 0
    for it in range(1, iters + 1):
        a, d = nearest(x, c)
        counts = torch.bincount(a, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        empty = counts == 0
        new_c = sums / counts.clamp_min(1.0).unsqueeze(1)
        if bool(empty.any()):
            # re-seed empty clusters with the points that are farthest from their centroid
            n_empty = int(empty.sum())
            far = torch.argsort(d, descending=True)[:n_empty]
            new_c[empty] = x[far]
        if spherical:
            new_c = torch.nn.functional.normalize(new_c, dim=1)
        c = new_c
        inertia = float(d.mean())
        if not bool(empty.any()) and prev < float("inf") and abs(prev - inertia) <= tol * max(prev, 1e-12):
            break
        prev = inertia
    a, d = nearest(x, c)
    return KMeansResult(c, a, float(d.mean()), it)
