"""Dagster resources of AniMind, one module per concern:

* ``paths``          project root and data folder (``$ANIMIND_DATA_DIR``)
* ``duckdb_io``      DuckDB IO manager (file-locked; row-count guard; table + export commit) and warehouse
* ``parquet_tables`` multi-pod Parquet table backend (``ANIMIND_TABLE_BACKEND=parquet``)
* ``files``          artifact store and Parquet exports
* ``tracking``       MLflow runs
* ``source``         the anime source (demo, SQLite, Kaggle CSV)

``build_resources`` is the one declaration of the resource set (registered by ``defs/resources.py``).
Everything public is importable from ``animind_assets.resources``.
"""

from __future__ import annotations

from animind_assets.resources.duckdb_io import (
    ALLOW_EMPTY,
    ALLOW_SHRINK_TAG,
    AniMindDuckDBIOManager,
    DuckDBWarehouse,
    OutputRefused,
    locked_duckdb,
    recover_exports,
)
from animind_assets.resources.files import ArtifactStoreResource, ParquetExports
from animind_assets.resources.parquet_tables import ParquetTablesIOManager, ParquetWarehouse, table_resources
from animind_assets.resources.paths import PROJECT_ROOT, data_dir, default_duckdb_path
from animind_assets.resources.source import AnimeSource, anime_source_from_env
from animind_assets.resources.tracking import MlflowResource, MlflowRun, NoOpMlflowRun

__all__ = [
    "ALLOW_EMPTY",
    "ALLOW_SHRINK_TAG",
    "PROJECT_ROOT",
    "AniMindDuckDBIOManager",
    "AnimeSource",
    "ArtifactStoreResource",
    "DuckDBWarehouse",
    "MlflowResource",
    "MlflowRun",
    "NoOpMlflowRun",
    "OutputRefused",
    "ParquetExports",
    "ParquetTablesIOManager",
    "ParquetWarehouse",
    "anime_source_from_env",
    "build_resources",
    "data_dir",
    "default_duckdb_path",
    "locked_duckdb",
    "recover_exports",
    "table_resources",
]


def build_resources(anime_source: "AnimeSource | None" = None, mlflow_enabled: bool = True) -> dict:
    """The one declaration of AniMind's resources (paths under ``$ANIMIND_DATA_DIR``).

    ``animind_assets/defs/resources.py`` registers these with Dagster; tests and benchmarks pass their own
    source. Returns a dict ``{resource key: resource}``.
    """
    return {
        # io_manager + warehouse: DuckDB (default) or the multi-pod Parquet backend ($ANIMIND_TABLE_BACKEND)
        **table_resources(),
        "artifacts": ArtifactStoreResource(),
        "exports": ParquetExports(),
        "mlflow": MlflowResource(enabled=mlflow_enabled),
        "anime_source": anime_source if anime_source is not None else anime_source_from_env(),
    }
