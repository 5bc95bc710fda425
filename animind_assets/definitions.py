"""The single Dagster ``Definitions`` entry point of AniMind (``dagster dev`` loads it via workspace.yaml)."""

from __future__ import annotations

import dagster as dg

from animind_assets import assets as assets_pkg
from animind_assets.resources import (
    AniMindDuckDBIOManager,
    ArtifactStoreResource,
    DuckDBWarehouse,
    MlflowResource,
    ParquetExports,
    anime_source_from_env,
    default_duckdb_path,
)

all_assets = dg.load_assets_from_package_module(assets_pkg)
all_checks = dg.load_asset_checks_from_package_module(assets_pkg)


def build_resources(anime_source=None, mlflow_enabled: bool = True) -> dict:
    """Default resources (paths under ``$ANIMIND_DATA_DIR``); tests pass their own source."""
    database = default_duckdb_path()
    return {
        "io_manager": AniMindDuckDBIOManager(database=database, schema="main"),
        "warehouse": DuckDBWarehouse(database=database, schema="main"),
        "artifacts": ArtifactStoreResource(),
        "exports": ParquetExports(),
        "mlflow": MlflowResource(enabled=mlflow_enabled),
        "anime_source": anime_source if anime_source is not None else anime_source_from_env(),
    }


def _automation() -> dict:
    try:
        from animind_assets import automation
    except ImportError:  # pragma: no cover - automation module is optional while bootstrapping
        return {}
    return automation.definitions_kwargs(all_assets, include_assets=True)


_automation_kwargs = _automation()
defs = dg.Definitions(
    assets=_automation_kwargs.pop("assets", all_assets),
    asset_checks=all_checks,
    resources=build_resources(),
    **_automation_kwargs,
)
