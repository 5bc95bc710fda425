"""Incremental embedding build of an item catalog: ``build_embeddings`` and its run statistics.

``build_embeddings(ids, texts, previous_df, cfg)`` reuses every previous row whose text hash and model
fingerprint match, embeds new or changed texts, drops ids no longer present and skips (and counts)
empty texts. Output table (sorted by id): ``<id_column>``, ``embedding`` (``pl.Array(pl.Float32, dim)``
-> DuckDB ``FLOAT[dim]``), ``dim`` (Int64), ``text_hash`` (Utf8), ``model`` (Utf8),
``model_fingerprint`` (Utf8), ``embedded_at`` (Datetime UTC; reused rows keep theirs). No Dagster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from animind_assets.lib.common.fingerprint import text_hash
from animind_assets.lib.common.progress import LogFn
from animind_assets.lib.embeddings.config import (
    EmbeddingConfig,
    EmbeddingError,
    NonFiniteEmbeddingError,
)
from animind_assets.lib.embeddings.encoder import embed_texts, get_embedder
from animind_assets.lib.embeddings.model_loading import (
    dtype_name,
    model_display_name,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from animind_assets.lib.embeddings.stats import nonfinite_rows


@dataclass
class EmbeddingStats:
    """Counts and timings of one ``build_embeddings`` run (rows in = output + skipped empty; output =
    embedded + reused), the model identity, and for ``quantize='int8'`` the quality gate's figures."""

    n_input: int = 0
    n_output: int = 0
    n_embedded: int = 0
    n_reused: int = 0
    n_dropped: int = 0
    n_skipped_empty: int = 0
    skipped_empty_ids: list = field(default_factory=list)
    dropped_ids: list = field(default_factory=list)
    embedded_by_reason: dict[str, int] = field(default_factory=dict)
    model: str = ""
    model_fingerprint: str = ""
    dim: int = 0
    device: str = ""
    dtype: str = ""
    backend: str = ""  # torch | onnx ("" when nothing was embedded)
    quantize: str = "none"
    int8_gate: dict = field(default_factory=dict)  # min/mean cosine int8 vs fp32 on the gate sample
    embed_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.n_embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def summary(self) -> dict:
        """Scalar figures of a run, as shown in asset metadata (same keys for every domain)."""
        return {
            "rows_embedded": self.n_embedded,
            "rows_reused": self.n_reused,
            "rows_dropped": self.n_dropped,
            "rows_skipped_empty_text": self.n_skipped_empty,
            "items_per_s": round(self.items_per_s, 2),
            "embed_seconds": round(self.embed_seconds, 2),
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "dim": self.dim,
            "device": self.device,
            "dtype": self.dtype,
            "backend": self.backend or "none (nothing embedded)",
            "quantize": self.quantize,
            **{f"int8_gate_{k}": v for k, v in self.int8_gate.items()},
        }

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["items_per_s"] = self.items_per_s
        d["skipped_empty_ids"] = d["skipped_empty_ids"][:50]
        d["dropped_ids"] = d["dropped_ids"][:50]
        return d


def _check_ids(ids: list, id_column: str) -> None:
    nulls = [i for i, v in enumerate(ids) if v is None]
    if nulls:
        raise EmbeddingError(f"{id_column}: {len(nulls)} null id(s) at input positions {nulls[:10]}")
    seen: set = set()
    dups: list = []
    for v in ids:
        if v in seen:
            dups.append(v)
        seen.add(v)
    if dups:
        raise EmbeddingError(f"{id_column}: duplicate id(s) {sorted(set(dups), key=str)[:10]}")


def _raise_nonfinite(bad_ids: list, id_column: str, where: str) -> None:
    shown = ", ".join(str(i) for i in bad_ids[:20]) + (" …" if len(bad_ids) > 20 else "")
    raise NonFiniteEmbeddingError(
        f"{where}: {len(bad_ids)} vector(s) contain NaN/inf for {id_column} [{shown}]", list(bad_ids)
    )


def _empty_frame(id_column: str, id_dtype, dim: int) -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            id_column: id_dtype,
            "embedding": pl.Array(pl.Float32, max(dim, 1)),
            "dim": pl.Int64,
            "text_hash": pl.Utf8,
            "model": pl.Utf8,
            "model_fingerprint": pl.Utf8,
            "embedded_at": pl.Datetime("us", "UTC"),
        }
    )


def build_embeddings(
    ids: Sequence,
    texts: Sequence[str | None],
    previous_df: pl.DataFrame | None,
    cfg: EmbeddingConfig | None = None,
    log: LogFn | None = None,
    id_column: str = "anime_id",
    embed_fn: Callable[[list[str], EmbeddingConfig, LogFn | None], np.ndarray] | None = None,
) -> tuple[pl.DataFrame, EmbeddingStats]:
    """Incremental embedding build (see module docstring) -> ``(table, EmbeddingStats)``.

    ``ids``/``texts`` are parallel sequences (ids hashable, unique, non-null); ``previous_df`` is the
    previous output or None; ``embed_fn(texts, cfg, log) -> float32 (n, dim)`` defaults to
    ``embed_texts``. Raises ``EmbeddingError`` for null/duplicate ids, length mismatch or nothing to
    embed, ``NonFiniteEmbeddingError`` (naming the ids) when a new or reused vector has NaN/inf."""
    t_start = time.perf_counter()
    cfg = cfg or EmbeddingConfig()
    cfg.validate()
    log_fn = log or (lambda _m: None)
    ids = list(ids)
    texts = list(texts)
    if len(ids) != len(texts):
        raise EmbeddingError(f"ids ({len(ids)}) and texts ({len(texts)}) differ in length")
    _check_ids(ids, id_column)
    id_series = pl.Series(id_column, ids)
    id_dtype = id_series.dtype if id_series.dtype != pl.Null else pl.Int64

    stats = EmbeddingStats(n_input=len(ids), model=model_display_name(cfg), quantize=cfg.quantize)
    folder = resolve_model_path(cfg.model, cfg.revision)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    fp = model_fingerprint(cfg, folder, dtype)
    stats.model_fingerprint, stats.device, stats.dtype = fp, str(device), dtype_name(dtype)

    keep_ids: list = []
    keep_texts: list[str] = []
    for i, t in zip(ids, texts):
        if t is None or not str(t).strip():
            stats.skipped_empty_ids.append(i)
        else:
            keep_ids.append(i)
            keep_texts.append(str(t))
    stats.n_skipped_empty = len(stats.skipped_empty_ids)
    if stats.n_skipped_empty:
        log_fn(f"embeddings: skipped {stats.n_skipped_empty} empty text(s), e.g. {id_column} {stats.skipped_empty_ids[:10]}")
    hashes = [text_hash(t) for t in keep_texts]

    # ---- what can be reused
    prev_by_id: dict = {}
    prev_dim = None
    needed = {id_column, "embedding", "text_hash", "model_fingerprint"}
    if previous_df is not None and previous_df.height and not needed <= set(previous_df.columns):
        log_fn(f"embeddings: previous table lacks columns {sorted(needed - set(previous_df.columns))}; rebuilding all")
        previous_df = None
    if previous_df is not None and previous_df.height:
        emb_dtype = previous_df.schema["embedding"]
        prev_dim = emb_dtype.size if isinstance(emb_dtype, pl.Array) else None
        for pid, ph, pfp, pos in zip(
            previous_df[id_column].to_list(),
            previous_df["text_hash"].to_list(),
            previous_df["model_fingerprint"].to_list(),
            range(previous_df.height),
        ):
            prev_by_id[pid] = (ph, pfp, pos)
    reuse_pos: list[int] = []  # position in keep_* -> previous row
    reuse_prev: list[int] = []
    todo: list[int] = []
    reasons: dict[str, int] = {}
    for k, (i, h) in enumerate(zip(keep_ids, hashes)):
        prev = prev_by_id.get(i)
        if cfg.full_rebuild:
            reason = "full_rebuild"
        elif prev is None:
            reason = "new"
        elif prev[1] != fp:
            reason = "model_changed"
        elif prev[0] != h:
            reason = "text_changed"
        else:
            reuse_pos.append(k)
            reuse_prev.append(prev[2])
            continue
        todo.append(k)
        reasons[reason] = reasons.get(reason, 0) + 1
    current = set(keep_ids)
    stats.dropped_ids = [pid for pid in prev_by_id if pid not in current]
    stats.n_dropped = len(stats.dropped_ids)
    stats.n_reused = len(reuse_pos)
    stats.n_embedded = len(todo)
    stats.embedded_by_reason = reasons
    log_fn(
        f"embeddings: {len(keep_ids)} texts -> embed {len(todo)} {reasons or ''}, reuse {len(reuse_pos)}, "
        f"drop {stats.n_dropped}, skipped empty {stats.n_skipped_empty}; model {stats.model} fp={fp}"
    )

    # ---- embed what changed
    new_mat = None
    if todo:
        fn = embed_fn or (lambda tx, c, lg: embed_texts(tx, c, lg, progress_label="embed"))
        t0 = time.perf_counter()
        new_mat = np.asarray(fn([keep_texts[k] for k in todo], cfg, log), dtype=np.float32)
        stats.embed_seconds = time.perf_counter() - t0
        if embed_fn is None:
            emb = get_embedder(cfg)
            stats.backend = emb.last_backend
            stats.int8_gate = dict(emb.last_int8_gate)
        if new_mat.ndim != 2 or new_mat.shape[0] != len(todo):
            raise EmbeddingError(f"embedder returned shape {new_mat.shape}, expected ({len(todo)}, dim)")
        bad = nonfinite_rows(new_mat)
        if bad.size:
            _raise_nonfinite([keep_ids[todo[b]] for b in bad], id_column, f"embedding model {stats.model}")
        log_fn(
            f"embeddings: embedded {len(todo)} texts in {stats.embed_seconds:.1f}s "
            f"({len(todo) / max(stats.embed_seconds, 1e-9):.1f} texts/s)"
        )

    dim = new_mat.shape[1] if new_mat is not None else prev_dim
    if new_mat is not None and prev_dim is not None and reuse_pos and prev_dim != dim:
        # Same fingerprint but a different width cannot happen unless the table was edited: re-embed.
        raise EmbeddingError(f"previous embeddings have dim {prev_dim} but the model now gives {dim}; use full_rebuild")
    if dim is None:
        if not keep_ids:
            raise EmbeddingError(f"no non-empty texts to embed ({stats.n_skipped_empty} empty of {len(ids)})")
        raise EmbeddingError("could not determine the embedding dimension")
    stats.dim = int(dim)

    # ---- assemble (reused rows keep their vectors and timestamps)
    now = dt.datetime.now(dt.timezone.utc)
    parts: list[pl.DataFrame] = []
    if new_mat is not None:
        parts.append(
            pl.DataFrame(
                {
                    id_column: pl.Series(id_column, [keep_ids[k] for k in todo], dtype=id_dtype),
                    "embedding": pl.Series("embedding", new_mat, dtype=pl.Array(pl.Float32, dim)),
                    "text_hash": pl.Series("text_hash", [hashes[k] for k in todo], dtype=pl.Utf8),
                    "embedded_at": pl.Series("embedded_at", [now] * len(todo), dtype=pl.Datetime("us", "UTC")),
                }
            )
        )
    if reuse_pos:
        prev = previous_df[reuse_prev].select(
            pl.col(id_column).cast(id_dtype),
            pl.col("embedding").cast(pl.Array(pl.Float32, dim)),
            pl.col("text_hash").cast(pl.Utf8),
            (pl.col("embedded_at").cast(pl.Datetime("us", "UTC")) if "embedded_at" in previous_df.columns else pl.lit(now).cast(pl.Datetime("us", "UTC")).alias("embedded_at")),
        )
        reused_mat = prev["embedding"].to_numpy()
        bad = nonfinite_rows(np.asarray(reused_mat, dtype=np.float32).reshape(len(reuse_pos), dim))
        if bad.size:
            _raise_nonfinite([prev[id_column][int(b)] for b in bad], id_column, "previous anime_embeddings rows")
        parts.append(prev)
    df = pl.concat(parts, how="vertical") if parts else _empty_frame(id_column, id_dtype, dim).select(id_column, "embedding", "text_hash", "embedded_at")
    df = (
        df.with_columns(
            pl.lit(int(dim), dtype=pl.Int64).alias("dim"),
            pl.lit(stats.model, dtype=pl.Utf8).alias("model"),
            pl.lit(fp, dtype=pl.Utf8).alias("model_fingerprint"),
        )
        .select(id_column, "embedding", "dim", "text_hash", "model", "model_fingerprint", "embedded_at")
        .sort(id_column)
    )
    stats.n_output = df.height
    stats.total_seconds = time.perf_counter() - t_start
    return df, stats

