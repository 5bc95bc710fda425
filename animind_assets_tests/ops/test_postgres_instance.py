"""The production instance on a real PostgreSQL: ``docker/dagster.yaml`` + MLflow's tracking store.

``.ci/run`` starts a throw-away PostgreSQL server (``.ci/postgres``: Debian's package, 127.0.0.1, a free
port) and exports ``ANIMIND_TEST_POSTGRES_URL`` (a role allowed to create databases). Each test creates
its own databases and drops them afterwards. Without a reachable server the tests skip with the reason.

What runs against Postgres here, with the storage section of ``docker/dagster.yaml`` exactly as shipped
(only the two local folders of compute logs / artifacts are moved to a temp dir):

* the ``observe_sources`` job and a materialization of ``anime_prep`` + ``user_interactions`` on the tiny
  SQLite source (runs + event log storage), with an asset that logs to MLflow whose tracking store is a
  second database on the same server;
* two ticks of the ``animind_automation`` sensor, evaluated by Dagster's own asset daemon against the
  project's real code location (``animind_assets.definitions``): the ticks land in the schedule storage,
  and after a catalog change the requested run is queued by the ``QueuedRunCoordinator`` in Postgres.

The records are then read back with plain SQL from the Postgres tables, not only through Dagster's API.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import pytest
import yaml

from animind_assets.resources import MlflowResource

warnings.filterwarnings("ignore", category=getattr(dg, "BetaWarning", Warning))
warnings.filterwarnings("ignore", category=getattr(dg, "PreviewWarning", Warning))

ROOT = Path(__file__).resolve().parents[2]
PREP = dg.AssetKey("anime_prep")
INTERACTIONS = dg.AssetKey("user_interactions")
URL_ENV = "ANIMIND_TEST_POSTGRES_URL"


def _server_url() -> str:
    """The server URL, or a skip with the reason (a failure when ``ANIMIND_REQUIRE_POSTGRES=1``, as in CI)."""
    give_up = pytest.fail if os.environ.get("ANIMIND_REQUIRE_POSTGRES") == "1" else pytest.skip
    url = os.environ.get(URL_ENV, "").strip()
    if not url:
        give_up(f"no PostgreSQL for the instance tests: {URL_ENV} is unset (.ci/run starts one with .ci/postgres)")
    import psycopg2

    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError as exc:
        where = f"{urlsplit(url).hostname}:{urlsplit(url).port}"
        give_up(f"PostgreSQL at {where} is not reachable: {str(exc).strip().splitlines()[0]}")
    return url


def _with_db(url: str, db: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


@contextmanager
def _temp_databases(url: str, *names: str):
    """Create fresh databases (unique names) on the server; drop them on exit."""
    import psycopg2

    suffix = uuid.uuid4().hex[:10]
    dbs = {name: f"animind_test_{name}_{suffix}" for name in names}
    admin = psycopg2.connect(url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            for db in dbs.values():
                cur.execute(f'CREATE DATABASE "{db}"')
        yield dbs
    finally:
        with admin.cursor() as cur:
            for db in dbs.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


def _query(url: str, sql: str, params=()) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture()
def postgres_url() -> str:
    return _server_url()


@contextmanager
def _deployment_instance(tmp_path: Path, monkeypatch, url: str, db: str):
    """A ``DagsterInstance`` from ``docker/dagster.yaml``: the Postgres storage section unchanged, its
    credentials from the same env vars compose/Helm set; only the local log/artifact folders move."""
    parts = urlsplit(url)
    monkeypatch.setenv("DAGSTER_POSTGRES_HOST", parts.hostname)
    monkeypatch.setenv("DAGSTER_POSTGRES_PORT", str(parts.port or 5432))
    monkeypatch.setenv("DAGSTER_POSTGRES_USER", parts.username)
    monkeypatch.setenv("DAGSTER_POSTGRES_PASSWORD", parts.password or "")
    monkeypatch.setenv("DAGSTER_POSTGRES_DB", db)
    shipped = yaml.safe_load((ROOT / "docker" / "dagster.yaml").read_text())
    config = dict(shipped)
    config["compute_logs"] = {**shipped["compute_logs"], "config": {"base_dir": str(tmp_path / "logs")}}
    config["local_artifact_storage"] = {
        **shipped["local_artifact_storage"],
        "config": {"base_dir": str(tmp_path / "artifacts")},
    }
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    assert config["storage"] == shipped["storage"]
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        yield instance
    finally:
        instance.dispose()


def test_instance_from_deployment_yaml_uses_postgres(tmp_path, monkeypatch, postgres_url):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    with _temp_databases(postgres_url, "dagster") as dbs:
        with _deployment_instance(tmp_path, monkeypatch, postgres_url, dbs["dagster"]) as instance:
            assert isinstance(instance.run_storage, PostgresRunStorage)
            assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
            assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
            # the gpu pool limit of the shipped config is enforced by the Postgres event log storage
            from animind_assets.gpu import GPU_POOL
            from dagster._core.utils import make_new_run_id

            storage = instance.event_log_storage
            storage.initialize_concurrency_limit_to_default(GPU_POOL)
            first = storage.claim_concurrency_slot(GPU_POOL, make_new_run_id(), "rqvae_model")
            second = storage.claim_concurrency_slot(GPU_POOL, make_new_run_id(), "finetuned_model")
            assert (first.slot_status.value, second.slot_status.value) == ("CLAIMED", "BLOCKED")
        tables = {r[0] for r in _query(_with_db(postgres_url, dbs["dagster"]), "select tablename from pg_tables where schemaname = 'public'")}
        assert {"runs", "event_logs", "jobs", "job_ticks", "concurrency_slots"} <= tables


@dg.asset(code_version="1")
def tracked_in_mlflow(context, mlflow: MlflowResource) -> dg.MaterializeResult:
    """Logs one MLflow run (params, metrics, the Dagster run id as a tag) to the tracking store."""
    with mlflow.start_run(run_name="postgres-instance-test", tags={"dagster_run_id": context.run_id}) as run:
        run.log_params({"catalog": "tiny sqlite"})
        run.log_metrics({"Recall@10": 0.25, "NDCG@10": 0.125})
    return dg.MaterializeResult(metadata={"mlflow_run_id": run.run_id})


def _asset_daemon_tick(instance) -> None:
    """One iteration of Dagster's asset daemon (what ``dagster-daemon run`` does every few seconds) on the
    project's code location, loaded in-process."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster._daemon.asset_daemon import AssetDaemon

    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="animind_assets.definitions", attribute="defs", working_directory=str(ROOT)),
        location_name="animind",
    )
    with create_test_daemon_workspace_context(InProcessWorkspaceLoadTarget(origin), instance) as workspace:
        daemon = AssetDaemon(settings=instance.get_auto_materialize_settings(), pre_sensor_interval_seconds=0)
        daemon._run_iteration_impl(workspace, threadpool_executor=None, amp_tick_futures={}, debug_crash_flags={})  # noqa: SLF001


@pytest.mark.slow
def test_materialization_automation_and_mlflow_in_postgres(tmp_path, monkeypatch, animind_env, sqlite_path, postgres_url):
    from animind_assets import automation
    from animind_assets import definitions as project
    from animind_assets.resources import AnimeSource
    from dagster._core.test_utils import freeze_time

    with _temp_databases(postgres_url, "dagster", "mlflow") as dbs:
        dagster_url = _with_db(postgres_url, dbs["dagster"])
        mlflow_url = _with_db(postgres_url, dbs["mlflow"])
        # MLflow's tracking store URI in the form docker/compose.yaml gives the MLflow server (psycopg2)
        compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
        scheme = compose["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].split("://")[0]
        assert scheme == "postgresql+psycopg2"
        mlflow_store = mlflow_url.replace("postgresql://", f"{scheme}://", 1)
        with _deployment_instance(tmp_path, monkeypatch, postgres_url, dbs["dagster"]) as instance:
            kwargs = automation.definitions_kwargs(project.all_assets, include_assets=True)
            assets = [*kwargs["assets"], tracked_in_mlflow]
            resources = {
                **project.build_resources(anime_source=AnimeSource(kind="sqlite", sqlite_path=str(sqlite_path))),
                "mlflow": MlflowResource(tracking_uri=mlflow_store, experiment_name="animind-postgres-test"),
            }
            defs = dg.Definitions(assets=assets, resources=resources, jobs=kwargs["jobs"])

            def observe() -> dict:
                result = defs.resolve_job_def(automation.OBSERVE_JOB_NAME).execute_in_process(instance=instance)
                assert result.success
                return {
                    e.asset_key.to_user_string(): e.event_specific_data.asset_observation.data_version
                    for e in result.all_events
                    if e.event_type_value == "ASSET_OBSERVATION"
                }

            before = observe()
            result = dg.materialize(
                assets, resources=resources, instance=instance,
                selection=[PREP, INTERACTIONS, dg.AssetKey("tracked_in_mlflow")],
            )
            assert result.success
            mlflow_run_id = result.asset_materializations_for_node("tracked_in_mlflow")[0].metadata["mlflow_run_id"].value

            # automation sensor, tick 1: everything fresh -> nothing requested; the tick is stored
            _asset_daemon_tick(instance)
            sensor_ticks = _query(dagster_url, "select selector_id, status from job_ticks")
            assert sensor_ticks, "the automation sensor tick must be recorded in the Postgres schedule storage"
            assert instance.get_runs_count(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED])) == 0

            # the catalog changes -> observed -> tick 2 queues one run for anime_prep + user_interactions
            conn = sqlite3.connect(sqlite_path)
            conn.execute("UPDATE anime SET name = 'Cowboy Bebop (remastered)' WHERE anime_id = 1")
            conn.commit()
            conn.close()
            after = observe()
            assert after["anime_catalog_source"] != before["anime_catalog_source"]
            # the next tick as the daemon would run it once the sensor's minimum interval has passed
            interval = project.defs.resolve_sensor_def(automation.AUTOMATION_SENSOR_NAME).minimum_interval_seconds
            with freeze_time(time.time() + (interval or 30) + 1):
                _asset_daemon_tick(instance)
            queued = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
            assert len(queued) == 1, [r.run_id for r in queued]
            assert queued[0].asset_selection == {PREP, INTERACTIONS}
            assert queued[0].tags.get("dagster/sensor_name") == automation.AUTOMATION_SENSOR_NAME

        # --- read back with plain SQL: Dagster's runs / events / ticks and MLflow's records in Postgres
        runs = _query(dagster_url, "select run_id, status from runs")
        statuses = {run_id: status for run_id, status in runs}
        assert statuses[result.run_id] == "SUCCESS"
        assert statuses[queued[0].run_id] == "QUEUED"
        assert sum(1 for s in statuses.values() if s == "SUCCESS") == 3  # observe x2 + materialize
        materialized = {
            r[0]
            for r in _query(dagster_url, "select asset_key from event_logs where dagster_event_type = 'ASSET_MATERIALIZATION'")
        }
        assert {PREP.to_string(), INTERACTIONS.to_string()} <= materialized
        tick_statuses = [r[0] for r in _query(dagster_url, "select status from job_ticks order by id")]
        assert len(tick_statuses) >= 2 and tick_statuses[-1] == "SUCCESS", tick_statuses

        mlflow_runs = _query(mlflow_url, "select run_uuid, status, name from runs")
        assert (mlflow_run_id, "FINISHED", "postgres-instance-test") in mlflow_runs
        metrics = dict(_query(mlflow_url, "select key, value from metrics where run_uuid = %s", (mlflow_run_id,)))
        assert metrics == {"Recall_at_10": 0.25, "NDCG_at_10": 0.125}
        tags = dict(_query(mlflow_url, "select key, value from tags where run_uuid = %s", (mlflow_run_id,)))
        assert tags["dagster_run_id"] == result.run_id
