"""Secrets (HF_TOKEN, MLflow credentials) come from the environment only and never reach Dagster's
config snapshots, run config, tags, event log / metadata, compute logs, the warehouse or MLflow."""

import pytest

import inspect
import warnings

import dagster as dg

from animind_assets.resources import MlflowResource

warnings.filterwarnings("ignore", category=getattr(dg, "BetaWarning", Warning))

SENTINEL = "sEnTiNeL-7f3a9c-do-not-log"
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# Not a secret: MLflow records MLFLOW_TRACKING_USERNAME as the run's owner (runs.user_id / mlflow.user),
# by design. It must still stay out of everything Dagster stores.
USERNAME = "animind-ci-user-5b1e"


def test_no_resource_has_a_credential_field():
    from animind_assets import resources

    classes = [
        obj
        for _, obj in inspect.getmembers(resources, inspect.isclass)
        if issubclass(obj, dg.ConfigurableResource) and obj.__module__.startswith(resources.__name__)
    ]
    assert classes
    for cls in classes:
        for field in cls.model_fields:
            lowered = field.lower()
            assert not any(w in lowered for w in ("password", "token", "secret", "credential", "api_key")), (
                f"{cls.__name__}.{field}: credentials must come from env vars, not resource config"
            )


@pytest.mark.slow
def test_sentinel_secrets_appear_nowhere(tmp_path, monkeypatch, sqlite_path):
    from dagster._serdes import serialize_value

    from animind_assets.defs.sources.anime_catalog_source import anime_catalog_source
    from animind_assets.defs.prep.anime_prep import anime_prep, anime_prep_is_valid
    from animind_assets.defs.prep.user_interactions import user_interactions
    from animind_assets.defs.sources.watchlist_source import watchlist_source
    from animind_assets.resources import (
        AniMindDuckDBIOManager,
        AnimeSource,
        ArtifactStoreResource,
        DuckDBWarehouse,
        ParquetExports,
        default_duckdb_path,
    )

    data = tmp_path / "data"
    home = tmp_path / "dagster_home"
    data.mkdir()
    home.mkdir()
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(data))
    for var in SECRET_VARS:
        monkeypatch.setenv(var, SENTINEL)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USERNAME)

    @dg.asset(code_version="1", deps=["anime_prep"])
    def mlflow_probe(context: dg.AssetExecutionContext, mlflow: MlflowResource) -> dg.MaterializeResult:
        """Exercises the MLflow resource the way training assets do (params, metrics, run link)."""
        with mlflow.start_run(context, tags={"probe": "secrets"}) as run:
            run.log_params({"lr": 0.001, "epochs": 1})
            run.log_metrics({"loss": 0.5}, step=1)
            context.log.info(f"mlflow run {run.run_id}")
            return dg.MaterializeResult(metadata={"mlflow_run": dg.MetadataValue.url(run.link)})

    db = default_duckdb_path()
    resources = {
        "io_manager": AniMindDuckDBIOManager(database=db, schema="main"),
        "warehouse": DuckDBWarehouse(database=db, schema="main"),
        "artifacts": ArtifactStoreResource(),
        "exports": ParquetExports(),
        "mlflow": MlflowResource(),
        "anime_source": AnimeSource(kind="sqlite", sqlite_path=str(sqlite_path)),
    }
    with dg.DagsterInstance.local_temp(tempdir=str(home)) as instance:
        result = dg.materialize(
            [anime_catalog_source, watchlist_source, anime_prep, user_interactions, anime_prep_is_valid, mlflow_probe],
            resources=resources,
            instance=instance,
            selection=["anime_prep", "user_interactions", "mlflow_probe"],
        )
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        texts = {
            "run_config": serialize_value(run.run_config) if not isinstance(run.run_config, dict) else repr(run.run_config),
            "run_tags": repr(run.tags),
            "job_snapshot": serialize_value(instance.get_job_snapshot(run.job_snapshot_id)),
            "execution_plan": serialize_value(instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)),
            "event_log": "\n".join(serialize_value(e) for e in instance.all_logs(result.run_id)),
        }
        # resource config as the launchpad shows it (defaults resolved)
        texts["resources"] = repr({k: getattr(v, "model_dump", lambda: v)() for k, v in resources.items()})
        for name, text in texts.items():
            assert SENTINEL not in text, f"secret leaked into {name}"
            assert USERNAME not in text, f"MLflow username leaked into {name}"
        mats = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert mats == {"anime_prep", "user_interactions", "mlflow_probe"}

    # every byte written: Dagster storage + compute logs, DuckDB, Parquet exports, MLflow DB/artifacts
    scanned = 0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            scanned += 1
            content = path.read_bytes()
            assert SENTINEL.encode() not in content, f"secret leaked into {path.relative_to(tmp_path)}"
            if path.name != "mlflow.db":
                assert USERNAME.encode() not in content, f"MLflow username leaked into {path.relative_to(tmp_path)}"
    assert scanned >= 5
    assert (data / "mlflow.db").exists(), "the MLflow probe must have written its store under the data dir"
