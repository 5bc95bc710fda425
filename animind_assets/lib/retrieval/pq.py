"""Product-quantization semantic IDs: long, unordered codes for RPG-style models.

Each item vector is standardized (per-dimension z-score; RQ/PQ on raw sentence embeddings is dominated
by a few high-variance dimensions), optionally reduced with PCA, and split into ``n_codebooks``
sub-vectors; each sub-vector is quantized to one of ``codebook_size`` centroids. The item's ID is the
``n_codebooks`` centroid indices: codes are **unordered** (no codebook conditions on another), which
is what lets RPG predict all of them in parallel.

Methods: ``"opq"`` (optimized PQ: a learned rotation before PQ; Ge et al., CVPR 2013; what RPG uses,
via faiss) and ``"pq"`` (plain PQ; Jégou et al., TPAMI 2011). Backends: ``faiss`` (``faiss-cpu``;
both methods) or ``sklearn`` (plain PQ with one k-means per sub-space; ``opq`` raises). ``"auto"``
uses faiss when it is installed.

Reference: Hou et al., "Generating Long Semantic IDs in Parallel for Recommendation", KDD 2025
(OPQ, 32 codebooks x 256 codes on Beauty, sentence-embedding PCA to 128 dims).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

METHODS = ("opq", "pq")
#: what PQ quantizes for RPG on Beauty: MiniLM item-text vectors, the SASRec item embeddings, or both
VECTOR_SOURCES = ("sasrec", "text", "text+sasrec")
BACKENDS = ("auto", "faiss", "sklearn")


@dataclass
class PQConfig:
    n_codebooks: int = 32
    codebook_size: int = 256
    standardize: bool = True
    pca_dim: int = 128  # 0 = keep the input dimension
    method: str = "pq"  # "pq" | "opq" (OPQ measured no better on Beauty MiniLM vectors and ~6x slower)
    backend: str = "auto"
    n_iter: int = 25  # k-means iterations (per sub-space)
    seed: int = 42
    num_threads: int = 2

    def validate(self) -> PQConfig:
        if self.method not in METHODS:
            raise ValueError(f"PQConfig.method={self.method!r}; expected one of {METHODS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"PQConfig.backend={self.backend!r}; expected one of {BACKENDS}")
        if self.n_codebooks < 1 or self.codebook_size < 2:
            raise ValueError("PQConfig.n_codebooks must be >= 1 and codebook_size >= 2")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PQConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).validate()


@dataclass
class PQResult:
    """``codes`` (N, n_codebooks) int64 in ``0..codebook_size-1``; ``stats``: reconstruction MSE (in
    the standardized/PCA space), relative MSE, distinct IDs, largest group of items sharing an ID,
    per-codebook usage, backend, seconds."""

    codes: np.ndarray
    stats: dict[str, Any]


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        return None
    return faiss


def preprocess(x: np.ndarray, cfg: PQConfig) -> np.ndarray:
    """Standardize (z-score per dimension) and PCA-reduce to ``cfg.pca_dim`` (when smaller than the
    input dimension). (N, D) float -> (N, D') float32. Raises ``ValueError`` on NaN/inf."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"item vectors must be a non-empty (N, D) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(1))[:5].tolist()
        raise ValueError(f"non-finite values in item vectors, rows {rows}")
    if cfg.standardize:
        sd = x.std(0)
        x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    if cfg.pca_dim and cfg.pca_dim < x.shape[1]:
        xc = x - x.mean(0)
        # eigenvectors of the (D, D) covariance: same subspace as an SVD of the data, far cheaper for N >> D
        _, vecs = np.linalg.eigh(xc.T @ xc)
        x = xc @ vecs[:, ::-1][:, : cfg.pca_dim]
    return x.astype(np.float32)


def product_quantize(vectors: np.ndarray, cfg: PQConfig | None = None, log=None) -> PQResult:
    """(N, D) item vectors -> ``PQResult`` with (N, n_codebooks) codes. The (possibly PCA-reduced)
    dimension must be divisible by ``n_codebooks`` for faiss; the sklearn backend splits unevenly.
    Raises ``ValueError`` when there are fewer items than ``codebook_size`` or the backend cannot do
    the method; ``ImportError`` for ``backend='faiss'`` without faiss installed."""
    cfg = (cfg or PQConfig()).validate()
    t0 = time.perf_counter()
    x = preprocess(vectors, cfg)
    n, d = x.shape
    if n < cfg.codebook_size:
        raise ValueError(f"{n} items < codebook_size {cfg.codebook_size}")
    faiss = _faiss() if cfg.backend in ("auto", "faiss") else None
    if cfg.backend == "faiss" and faiss is None:
        raise ImportError("PQConfig.backend='faiss' needs the faiss-cpu package")
    m, k = cfg.n_codebooks, cfg.codebook_size
    if faiss is not None:
        nbits = int(np.log2(k))
        if 2**nbits != k:
            raise ValueError(f"faiss PQ needs a power-of-two codebook_size, got {k}")
        if d % m:
            raise ValueError(f"dimension {d} is not divisible by n_codebooks {m} (set pca_dim to a multiple)")
        faiss.omp_set_num_threads(max(1, cfg.num_threads))
        pq = faiss.ProductQuantizer(d, m, nbits)
        pq.cp.niter = cfg.n_iter
        pq.cp.seed = cfg.seed
        xr = np.ascontiguousarray(x)
        if cfg.method == "opq":
            opq = faiss.OPQMatrix(d, m)
            opq.niter = cfg.n_iter
            opq.verbose = False
            opq.train(xr)
            xr = np.ascontiguousarray(opq.apply(xr))
        pq.train(xr)
        codes_u8 = pq.compute_codes(xr)
        codes = _unpack(codes_u8, m, nbits)
        recon = pq.decode(codes_u8)
        backend = f"faiss {faiss.__version__}"
    else:
        if cfg.method == "opq":
            raise ValueError("method 'opq' needs faiss (pip install faiss-cpu); use method='pq' with the sklearn backend")
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        xr = x
        codes = np.empty((n, m), dtype=np.int64)
        recon = np.empty_like(x)
        for j, cols in enumerate(np.array_split(np.arange(d), m)):
            with threadpool_limits(max(1, cfg.num_threads)):
                km = KMeans(n_clusters=k, n_init=1, max_iter=cfg.n_iter, random_state=cfg.seed + j).fit(x[:, cols])
            codes[:, j] = km.labels_
            recon[:, cols] = km.cluster_centers_[km.labels_]
        backend = "sklearn KMeans per sub-space"
    mse = float(((xr - recon) ** 2).sum(1).mean())
    _, counts = np.unique(codes, axis=0, return_counts=True)
    stats = {
        "items": n, "dim": d, "n_codebooks": m, "codebook_size": k, "method": cfg.method, "backend": backend,
        "recon_mse": mse, "relative_mse": mse / max(1e-12, float((xr ** 2).sum(1).mean())),
        "distinct_ids": int(len(counts)), "largest_shared_id": int(counts.max()),
        "usage_mean": float(np.mean([len(np.unique(codes[:, j])) / k for j in range(m)])),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if log:
        log(f"pq: {n} items, dim {d} -> {m}x{k} codes ({backend}, {cfg.method}); relative MSE {stats['relative_mse']:.3f}, "
            f"{stats['distinct_ids']} distinct IDs, codebook usage {stats['usage_mean']:.2f}, {stats['seconds']}s")
    return PQResult(codes, stats)


def _unpack(codes_u8: np.ndarray, m: int, nbits: int) -> np.ndarray:
    if nbits == 8:
        return codes_u8.reshape(-1, m).astype(np.int64)
    bits = np.unpackbits(codes_u8, axis=1, bitorder="little")[:, : m * nbits].reshape(-1, m, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(-1)


def next_item_code_gain(codes: np.ndarray, train: list[np.ndarray], held_out_prev: np.ndarray, held_out_next: np.ndarray,
                        codebook_size: int, smoothing: float = 0.7) -> np.ndarray:
    """How much each codebook's code of the **next** item can be predicted from the previous item's code
    in the same codebook: held-out information gain (nats per transition) of a smoothed code-bigram
    model over the code's unigram. A diagnostic for RPG-style IDs, whose loss is one cross-entropy per
    codebook: a codebook whose gain is ~0 (like random codes) adds an unpredictable term to every
    item's score.

    ``codes`` (N, m) int codes; ``train`` per-user item-id arrays (chronological) giving the training
    transitions; ``held_out_prev``/``held_out_next`` (U,) item ids of held-out transitions (e.g. the last
    training item -> the validation item). Bigram ``p(b|a)`` is interpolated with the unigram:
    ``(1 - smoothing) * p_bigram + smoothing * p_unigram`` (unigram add-one smoothed). Returns (m,)
    float64, mean ``log p(b|a) - log p_unigram(b)`` over the held-out transitions. Raises ``ValueError``
    on empty input or codes outside ``0..codebook_size-1``."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(f"codes must be an (N, m) matrix in 0..{codebook_size - 1}")
    pairs = [(t[:-1], t[1:]) for t in train if len(t) >= 2]
    if not pairs or len(held_out_prev) == 0 or len(held_out_prev) != len(held_out_next):
        raise ValueError("need training transitions and equally long, non-empty held-out prev/next arrays")
    src = np.concatenate([p[0] for p in pairs])
    dst = np.concatenate([p[1] for p in pairs])
    k = codebook_size
    gains = np.empty(codes.shape[1])
    for j in range(codes.shape[1]):
        a, b = codes[src, j], codes[dst, j]
        big = np.bincount(a * k + b, minlength=k * k).reshape(k, k).astype(np.float64)
        big /= np.maximum(big.sum(1, keepdims=True), 1.0)
        uni = np.bincount(b, minlength=k) + 1.0
        uni /= uni.sum()
        va, vb = codes[held_out_prev, j], codes[held_out_next, j]
        gains[j] = float(np.mean(np.log((1 - smoothing) * big[va, vb] + smoothing * uni[vb]) - np.log(uni[vb])))
    return gains


def combine_item_vectors(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-item vector blocks ``(n, d_i)`` into ``(n, sum d_i)`` float32.

    One block is returned as is (``product_quantize`` standardizes it). Several blocks are each z-scored per
    dimension and scaled by ``1/sqrt(d_i)`` first, so every block carries the same total variance whatever its
    width (e.g. 384-d text vectors beside 64-d SASRec embeddings). Raises ``ValueError`` when the blocks have
    different numbers of rows or there are none."""
    if not parts:
        raise ValueError("combine_item_vectors: no vector blocks")
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError(f"combine_item_vectors: blocks have different item counts {[p.shape[0] for p in parts]}")
    parts = [np.asarray(p, dtype=np.float32) for p in parts]
    if len(parts) > 1:
        parts = [(p - p.mean(0)) / (p.std(0) + 1e-8) / np.sqrt(p.shape[1]) for p in parts]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)
