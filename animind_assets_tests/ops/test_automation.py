"""Automation: observation schedule, declarative automation on source/code changes, failure alerts.

The source-change tests run the real ``observe_sources`` job and materialize the real ``anime_prep`` /
``user_interactions`` assets on the tiny SQLite fixture (``conftest.write_sqlite``), then evaluate the
automation conditions tick by tick with ``dg.evaluate_automation_conditions``.
"""

from __future__ import annotations

import json
import sqlite3
import time
import warnings
from pathlib import Path

import dagster as dg
import pytest

warnings.filterwarnings("ignore", category=getattr(dg, "BetaWarning", Warning))
warnings.filterwarnings("ignore", category=getattr(dg, "PreviewWarning", Warning))

PREP = dg.AssetKey("anime_prep")
INTERACTIONS = dg.AssetKey("user_interactions")


def _resources(source):
    from animind_assets.definitions import build_resources

    return build_resources(anime_source=source, mlflow_enabled=False)


def _foundation():
    from animind_assets.defs.sources.anime_catalog_source import anime_catalog_source
    from animind_assets.defs.prep.anime_prep import anime_prep, anime_prep_is_valid
    from animind_assets.defs.prep.user_interactions import user_interactions
    from animind_assets.defs.sources.watchlist_source import watchlist_source

    from animind_assets.definitions import with_code_version

    assets = [anime_catalog_source, watchlist_source, anime_prep, user_interactions]
    return [with_code_version(a) for a in assets], [anime_prep_is_valid]


PREP_CHECK = "anime_prep:anime_prep_is_valid"


class Ticker:
    """Evaluates the automation conditions of ``assets`` (and ``checks``) tick after tick on one instance."""

    def __init__(self, assets, instance, resources, checks=()):
        self.assets = assets
        self.checks = list(checks)
        self.instance = instance
        self.resources = resources
        self.cursor = None

    def tick(self, assets=None) -> dict[str, int]:
        """``{asset key or 'asset:check' name: number requested}`` for everything requested on this tick."""
        if assets is not None:
            self.assets = assets
        defs = dg.Definitions(assets=self.assets, asset_checks=self.checks, resources=self.resources)
        result = dg.evaluate_automation_conditions(defs=defs, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        self.last = result
        return {r.key.to_user_string(): r.true_subset.size for r in result.results if r.true_subset.size}

    def explain(self, key: str) -> str:
        """The last tick's condition tree of ``key`` (label and true size per node), for failure messages."""
        lines: list[str] = []

        def walk(res, depth=0):
            lines.append(f"{'  ' * depth}{res.condition.get_label() or type(res.condition).__name__}: {res.true_subset.size}")
            for child in res.child_results:
                walk(child, depth + 1)

        for res in self.last.results:
            if res.key.to_user_string() == key:
                walk(res)
        return "\n".join(lines)


@pytest.fixture()
def world(animind_env, sqlite_path):
    """Automated foundation graph + observe job on an ephemeral instance, sources observed, assets built."""
    from animind_assets import automation
    from animind_assets.resources import AnimeSource

    assets, checks = _foundation()
    kwargs = automation.definitions_kwargs(assets, include_assets=True, checks=checks)
    auto_assets, checks = kwargs["assets"], kwargs["asset_checks"]
    resources = _resources(AnimeSource(kind="sqlite", sqlite_path=str(sqlite_path)))
    defs = dg.Definitions(assets=auto_assets, asset_checks=checks, resources=resources, jobs=kwargs["jobs"])
    instance = dg.DagsterInstance.ephemeral()
    ticker = Ticker(auto_assets, instance, resources, checks)

    def observe():
        result = defs.resolve_job_def(automation.OBSERVE_JOB_NAME).execute_in_process(instance=instance)
        assert result.success
        return {
            e.asset_key.to_user_string(): e.event_specific_data.asset_observation.data_version
            for e in result.all_events
            if e.event_type_value == "ASSET_OBSERVATION"
        }

    def materialize():
        result = dg.materialize(
            [*auto_assets, *checks], resources=resources, instance=instance, selection=[PREP, INTERACTIONS]
        )
        assert result.success

    assert ticker.tick() == {}, "nothing is built yet: the automation must not start the initial build"
    observe()
    assert ticker.tick() == {}, "sources observed but assets never materialized: still nothing"
    materialize()
    assert ticker.tick() == {}, "freshly materialized: nothing to do"
    return {
        "ticker": ticker,
        "observe": observe,
        "materialize": materialize,
        "sqlite": sqlite_path,
        "instance": instance,
        "assets": auto_assets,
        "checks": checks,
        "resources": resources,
    }


def test_unchanged_source_requests_nothing(world):
    first = world["observe"]()
    assert set(first) == {"anime_catalog_source", "watchlist_source"}
    assert world["ticker"].tick() == {}
    again = world["observe"]()
    assert again == first, "same content must give the same fingerprint data version"
    assert world["ticker"].tick() == {}


def test_catalog_change_requests_downstream_chain_once(world):
    before = world["observe"]()
    world["ticker"].tick()
    conn = sqlite3.connect(world["sqlite"])
    conn.execute("UPDATE anime SET name = 'Cowboy Bebop (remastered)' WHERE anime_id = 1")
    conn.commit()
    conn.close()
    after = world["observe"]()
    assert after["anime_catalog_source"] != before["anime_catalog_source"]
    assert after["watchlist_source"] == before["watchlist_source"]
    # anime_prep because its source changed, user_interactions because anime_prep is requested too,
    # and anime_prep's (separately defined, blocking) check with its asset, into the same run
    assert world["ticker"].tick() == {"anime_prep": 1, "user_interactions": 1, PREP_CHECK: 1}
    assert world["ticker"].tick() == {}, "already requested: not requested again on the next tick"
    world["materialize"]()
    assert world["ticker"].tick() == {}


def test_watchlist_change_requests_only_user_interactions(world):
    world["observe"]()
    world["ticker"].tick()
    conn = sqlite3.connect(world["sqlite"])
    conn.execute("UPDATE user_anime SET score = 4 WHERE user_id = 1 AND anime_id = 1")
    conn.commit()
    conn.close()
    world["observe"]()
    assert world["ticker"].tick() == {"user_interactions": 1}


def test_code_version_bump_is_stale_and_requested(world):
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver

    instance = world["instance"]
    assets = world["assets"]
    resolver = get_stale_status_resolver(instance, assets)
    assert resolver.get_status(PREP) == StaleStatus.FRESH

    bumped = [
        a.map_asset_specs(lambda s: s.replace_attributes(code_version="2")) if isinstance(a, dg.AssetsDefinition) and PREP in a.keys else a
        for a in assets
    ]
    resolver = get_stale_status_resolver(instance, bumped)
    assert resolver.get_status(PREP) == StaleStatus.STALE
    causes = resolver.get_stale_causes(PREP)
    assert any("code version" in c.reason for c in causes), causes
    requested = world["ticker"].tick(bumped)
    assert requested == {"anime_prep": 1, "user_interactions": 1, PREP_CHECK: 1}, world["ticker"].explain("anime_prep")
    assert world["ticker"].tick(bumped) == {}


def test_partitioned_and_excluded_assets_are_left_alone(monkeypatch):
    from animind_assets import automation

    @dg.asset(code_version="1", partitions_def=dg.StaticPartitionsDefinition(["small", "base", "large"]))
    def big_variants():
        return 1

    @dg.asset(code_version="1")
    def plain():
        return 1

    @dg.asset(code_version="1", tags={automation.AUTOMATION_TAG: "manual"})
    def manual():
        return 1

    own = dg.AutomationCondition.on_cron("0 0 * * *")

    @dg.asset(code_version="1", automation_condition=own)
    def own_condition():
        return 1

    @dg.asset(code_version="1", group_name="beauty")
    def in_group():
        return 1

    monkeypatch.setenv("ANIMIND_AUTOMATION_EXCLUDE", "group:beauty")
    mapped = automation.apply_automation([big_variants, plain, manual, own_condition, in_group])
    out = {a.key.to_user_string(): next(iter(a.specs)).automation_condition for a in mapped}
    assert out["big_variants"] is None
    assert out["plain"] == automation.AUTOMATION_CONDITION
    assert out["manual"] is None
    assert out["own_condition"] == own
    assert out["in_group"] is None
    # the rebuild job never mixes in partitioned assets
    assert dg.AssetKey("big_variants") not in automation.unpartitioned_materializable_keys(mapped)


def test_schedules_sensors_and_env(monkeypatch):
    from animind_assets import automation
    from animind_assets.resources import AnimeSource

    assets, _ = _foundation()
    monkeypatch.setenv("ANIMIND_OBSERVE_CRON", "*/10 * * * *")
    monkeypatch.delenv("ANIMIND_REBUILD_CRON", raising=False)
    monkeypatch.delenv("ANIMIND_REBUILD_SCHEDULE", raising=False)
    monkeypatch.delenv("ANIMIND_EXECUTOR", raising=False)
    kwargs = automation.definitions_kwargs(assets)
    assert "assets" not in kwargs and "executor" not in kwargs
    schedules = {s.name: s for s in kwargs["schedules"]}
    observe = schedules["observe_sources_schedule"]
    assert observe.cron_schedule == "*/10 * * * *"
    assert observe.default_status == dg.DefaultScheduleStatus.RUNNING
    weekly = schedules["full_rebuild_weekly"]
    assert weekly.cron_schedule == automation.DEFAULT_REBUILD_CRON
    assert weekly.default_status == dg.DefaultScheduleStatus.STOPPED
    sensors = {s.name: s for s in kwargs["sensors"]}
    assert isinstance(sensors[automation.AUTOMATION_SENSOR_NAME], dg.AutomationConditionSensorDefinition)
    assert sensors[automation.AUTOMATION_SENSOR_NAME].default_status == dg.DefaultSensorStatus.RUNNING
    assert sensors[automation.FAILURE_SENSOR_NAME].default_status == dg.DefaultSensorStatus.RUNNING
    jobs = {j.name: j for j in kwargs["jobs"]}
    defs = dg.Definitions(assets=assets, jobs=kwargs["jobs"], resources=_resources(AnimeSource()))
    observe_keys = defs.resolve_job_def("observe_sources").asset_layer.executable_asset_keys
    assert observe_keys == {dg.AssetKey("anime_catalog_source"), dg.AssetKey("watchlist_source")}
    rebuild_keys = defs.resolve_job_def("full_rebuild").asset_layer.executable_asset_keys
    assert {PREP, INTERACTIONS, dg.AssetKey("anime_catalog_source")} <= rebuild_keys
    assert set(jobs) == {"observe_sources", "full_rebuild"}

    monkeypatch.setenv("ANIMIND_EXECUTOR", "k8s")
    monkeypatch.setenv("ANIMIND_REBUILD_SCHEDULE", "running")
    kwargs = automation.definitions_kwargs(assets)
    from dagster_k8s import k8s_job_executor

    assert kwargs["executor"] is k8s_job_executor
    assert {s.name: s for s in kwargs["schedules"]}["full_rebuild_weekly"].default_status == dg.DefaultScheduleStatus.RUNNING


def test_run_failure_sensor_writes_alert(animind_env):
    from animind_assets import automation

    @dg.asset(code_version="1")
    def exploding():
        raise ValueError("catalog row 7: column 'score' is not a number")

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([exploding], instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    context = dg.build_run_status_sensor_context(
        sensor_name=automation.FAILURE_SENSOR_NAME,
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    ).for_run_failure()
    automation.run_failure_alert(context)
    automation.run_failure_alert(context)
    path = animind_env / "alerts.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[0])
    assert record["kind"] == "run_failure"
    assert record["run_id"] == result.run_id
    assert record["assets"] == ["exploding"]
    assert record["step_failures"] and "column 'score' is not a number" in record["step_failures"][0]["error"]


def test_automation_plan_on_the_live_graph():
    """definitions_kwargs on the project's whole asset list (whatever the engineers have added):
    unpartitioned assets get the condition, partitioned ones (rqvae_variants) neither the condition nor
    a place in full_rebuild, and the resulting Definitions resolve both jobs."""
    from animind_assets import automation
    from animind_assets import definitions as project

    kwargs = automation.definitions_kwargs(project.all_assets, include_assets=True)
    defs = dg.Definitions(
        assets=kwargs.pop("assets"), asset_checks=project.all_checks, resources=project.build_resources(), **kwargs
    )
    graph = defs.resolve_asset_graph()
    partitioned = {k for k in graph.get_all_asset_keys() if graph.get(k).partitions_def is not None}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if key in partitioned or not node.is_materializable:
            assert node.automation_condition != automation.AUTOMATION_CONDITION, key
        elif automation.AUTOMATION_TAG not in (node.tags or {}):
            assert node.automation_condition is not None, key
    rebuild = defs.resolve_job_def(automation.REBUILD_JOB_NAME).asset_layer.executable_asset_keys
    assert not (rebuild & partitioned), f"full_rebuild must not include partitioned assets: {rebuild & partitioned}"
    assert {PREP, INTERACTIONS} <= rebuild
    # the scheduled rebuild evaluates the checks too: separately defined ones are steps of its plan
    from dagster._core.execution.api import create_execution_plan

    steps = set(create_execution_plan(defs.resolve_job_def(automation.REBUILD_JOB_NAME)).step_keys_to_execute)
    assert {
        "anime_prep_anime_prep_is_valid", "anime_embeddings_anime_embeddings_finite",
        "anime_embeddings_anime_embeddings_unit_norm", "llm_prep_dataset_llm_prep_dataset_split_by_user",
    } <= steps, sorted(steps)
    observe = defs.resolve_job_def(automation.OBSERVE_JOB_NAME).asset_layer.executable_asset_keys
    assert observe == {dg.AssetKey("anime_catalog_source"), dg.AssetKey("watchlist_source")}


def test_every_check_of_an_automated_asset_runs_with_it():
    """The project's Definitions: each check (separate ``@asset_check`` or ``check_specs``) of an asset
    carrying the automation condition has the check condition, so automated runs evaluate it."""
    from animind_assets import automation
    from animind_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    checks = graph.asset_check_keys
    assert {"anime_prep_is_valid", "anime_embeddings_finite", "anime_embeddings_unit_norm", "ids_unique"} <= {
        k.name for k in checks
    }
    missing = []
    for key in checks:
        asset = graph.get(key.asset_key)
        if asset.automation_condition == automation.AUTOMATION_CONDITION:
            if graph.get(key).automation_condition != automation.CHECK_AUTOMATION_CONDITION:
                missing.append(key.to_user_string())
    assert not missing, f"checks of automated assets without the check condition: {missing}"


def test_every_asset_in_defs_has_code_version_and_automation():
    """Every materializable asset of the project's Definitions has a code_version (observable sources
    cannot carry one: their version is the observed data version), and the unpartitioned ones carry
    the automation condition (needs definitions.py to use ``definitions_kwargs(..., include_assets=True)``)."""
    from animind_assets import automation
    from animind_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    missing_code_version = []
    missing_condition = []
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable:
            continue
        if not node.code_version:
            missing_code_version.append(key.to_user_string())
        if node.partitions_def is None and node.automation_condition is None and automation.AUTOMATION_TAG not in (node.tags or {}):
            missing_condition.append(key.to_user_string())
    assert not missing_code_version, f"assets without code_version: {missing_code_version}"
    assert not missing_condition, (
        f"unpartitioned assets without an automation condition: {missing_condition}; definitions.py must pass "
        "automation.definitions_kwargs(all_assets, include_assets=True)['assets'] to Definitions(assets=...)"
    )
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.partitions_def is not None:
            assert node.automation_condition is None or node.automation_condition != automation.AUTOMATION_CONDITION
    names = {s.name for s in defs.sensors} if defs.sensors else set()
    assert {automation.AUTOMATION_SENSOR_NAME, automation.FAILURE_SENSOR_NAME} <= names


def test_check_requested_when_asset_updated_without_it(world):
    """A run that materialized anime_prep but skipped its check: the next tick runs the check (and the
    downstream asset, which may go in the same run because the blocking check is requested with it)."""
    world["ticker"].tick()
    result = dg.materialize(
        [*world["assets"], *world["checks"]],
        resources=world["resources"],
        instance=world["instance"],
        selection=dg.AssetSelection.assets(PREP).without_checks(),
    )
    assert result.success
    assert not [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert world["ticker"].tick() == {"user_interactions": 1, PREP_CHECK: 1}
    assert world["ticker"].tick() == {}


def _toy_graph(fail: dict):
    """up (+ a separately defined blocking check that fails while ``fail['up']``) -> down."""

    @dg.asset(code_version="1")
    def up():
        return 1

    @dg.asset_check(asset=up, blocking=True)
    def up_ok():
        return dg.AssetCheckResult(passed=not fail["up"], description="up is broken" if fail["up"] else "fine")

    @dg.asset(code_version="1", deps=[up])
    def down():
        return 2

    from animind_assets import automation

    kwargs = automation.definitions_kwargs([up, down], include_assets=True, checks=[up_ok])
    return kwargs["assets"], kwargs["asset_checks"]


def test_failed_blocking_check_stops_downstream(tmp_path):
    """In the run (Dagster's blocking checks skip the downstream step) and on later ticks (the automation
    condition waits for upstream blocking checks to pass)."""
    fail = {"up": False}
    assets, checks = _toy_graph(fail)
    instance = dg.DagsterInstance.ephemeral()
    ticker = Ticker(assets, instance, {}, checks)
    ticker.tick()
    assert dg.materialize([*assets, *checks], instance=instance).success
    assert ticker.tick() == {}

    fail["up"] = True
    bumped = [
        a.map_asset_specs(lambda s: s.replace_attributes(code_version="2")) if dg.AssetKey("up") in a.keys else a
        for a in assets
    ]
    assert ticker.tick(bumped) == {"up": 1, "down": 1, "up:up_ok": 1}, "code change: up, its check and down in one run"
    result = dg.materialize([*bumped, *checks], instance=instance, raise_on_error=False, selection=["up", "down"])
    evaluations = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert [(ev.asset_check_key.name, ev.passed) for ev in evaluations] == [("up_ok", False)]
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"up"}, "the failed blocking check must stop down inside the run"
    # down's code changes too: still not requested while up's blocking check is failed
    bumped_down = [
        a.map_asset_specs(lambda s: s.replace_attributes(code_version="3")) if dg.AssetKey("down") in a.keys else a
        for a in bumped
    ]
    assert ticker.tick(bumped_down) == {}
    fail["up"] = False
    assert dg.materialize([*bumped_down, *checks], instance=instance, selection=["up"]).success
    assert ticker.tick(bumped_down) == {"down": 1}, "blocking check passed again: down catches up"


# --------------------------------------------------------------------------------------------------
# a real daemon tick: the AssetDaemon evaluates the automation sensor of a code location served by a
# gRPC code server and launches the run in its own process (what `dagster dev` does)

DAEMON_DEFS = '''
"""Foundation graph as the project wires it, served to the test daemon (in-process executor)."""
import dagster as dg

from animind_assets import automation
from animind_assets.resources import anime_source_from_env, build_resources
from animind_assets.defs.sources.anime_catalog_source import anime_catalog_source
from animind_assets.defs.sources.watchlist_source import watchlist_source
from animind_assets.defs.prep.anime_prep import anime_prep, anime_prep_is_valid
from animind_assets.defs.prep.user_interactions import user_interactions
from animind_assets import code_version


def versioned(obj):
    if not isinstance(obj, dg.AssetsDefinition) or not obj.is_materializable:
        return obj
    version = code_version.code_version_for_module(code_version.defining_module(obj))
    return obj.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version))


@dg.asset(code_version="1", deps=[anime_prep], check_specs=[dg.AssetCheckSpec("has_rows", asset="prep_summary")])
def prep_summary():
    """Stands for semantic_ids: an asset whose checks are declared inside it (check_specs). A run that
    holds such an asset used to drop the separately defined checks of the other assets."""
    yield dg.MaterializeResult(check_results=[dg.AssetCheckResult(check_name="has_rows", passed=True)])


_assets = [*(versioned(a) for a in (anime_catalog_source, watchlist_source, anime_prep, user_interactions)), prep_summary]
_auto = automation.definitions_kwargs(_assets, include_assets=True, checks=[anime_prep_is_valid])
defs = dg.Definitions(
    assets=_auto.pop("assets"),
    asset_checks=_auto.pop("asset_checks"),
    resources=build_resources(anime_source=anime_source_from_env(), mlflow_enabled=False),
    executor=dg.in_process_executor,
    **_auto,
)
'''


SUMMARY = dg.AssetKey("prep_summary")


def _load_module(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"daemon_defs_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_daemon_tick_runs_checks_and_keeps_the_settings_file(animind_env, tmp_path, monkeypatch):
    """Settings file ``anime_prep: {limit: 150}``; a manual run with a one-run launchpad edit (limit 100);
    3 texts change in the source; the observation + a real AssetDaemon tick launch one automated run in a
    subprocess which materializes anime_prep with limit 150 (the settings file, not the last run's edit)
    and evaluates every check: anime_prep's separately defined blocking check and prep_summary's own.
    (Without check conditions Dagster 1.13 drops the separate check from a run that also holds an asset
    with ``check_specs``, as semantic_ids has.)"""
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import PythonFileTarget
    from dagster._daemon.asset_daemon import AssetDaemon

    from animind_assets import automation
    from animind_assets_tests.conftest import add_synthetic_anime, write_sqlite

    db = write_sqlite(tmp_path / "catalog.sqlite")
    ids = add_synthetic_anime(db, 200)
    settings = tmp_path / "animind.yaml"
    settings.write_text("# test settings\nanime_prep:\n  limit: 150\n")
    monkeypatch.setenv("ANIMIND_SETTINGS", str(settings))
    monkeypatch.setenv("ANIMIND_SOURCE", "sqlite")
    monkeypatch.setenv("ANIMIND_SQLITE_PATH", str(db))
    monkeypatch.setenv("ANIMIND_AUTOMATION_INTERVAL_S", "1")
    module_file = tmp_path / "daemon_defs.py"
    module_file.write_text(DAEMON_DEFS)
    local = _load_module(module_file).defs
    root = str(Path(__file__).resolve().parents[2])

    overrides = {
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"},
        "run_launcher": {"module": "dagster._core.launcher", "class": "DefaultRunLauncher"},
    }
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(overrides=overrides, temp_dir=str(tmp_path / "home")) as instance:
        assert local.resolve_job_def(automation.OBSERVE_JOB_NAME).execute_in_process(instance=instance).success
        manual = local.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance,
            asset_selection=[PREP, INTERACTIONS, SUMMARY],
            run_config={"ops": {"anime_prep": {"config": {"limit": 100}}}},  # a launchpad edit: this run only
        )
        assert manual.success
        assert manual.asset_materializations_for_node("anime_prep")[0].metadata["dagster/row_count"].value == 100

        target = PythonFileTarget(
            python_file=str(module_file), attribute="defs", working_directory=root, location_name="daemon_test"
        )
        with create_test_daemon_workspace_context(target, instance) as workspace:
            daemon = AssetDaemon(settings=instance.get_auto_materialize_settings(), pre_sensor_interval_seconds=0)

            def tick():
                time.sleep(1.2)  # the sensor's minimum interval (ANIMIND_AUTOMATION_INTERVAL_S=1)
                daemon._run_iteration_impl(workspace, threadpool_executor=None, amp_tick_futures={}, debug_crash_flags={})

            tick()  # first evaluation of the conditions: nothing changed, nothing requested
            assert not instance.get_runs(filters=dg.RunsFilter(tags={"dagster/auto_materialize": "true"}))

            conn = sqlite3.connect(db)
            for anime_id in ids[:3]:
                conn.execute("UPDATE anime SET synopsis = synopsis || ' Remastered.' WHERE anime_id = ?", [anime_id])
            conn.commit()
            conn.close()
            assert local.resolve_job_def(automation.OBSERVE_JOB_NAME).execute_in_process(instance=instance).success
            tick()
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/auto_materialize": "true"}))
            assert len(runs) == 1, f"one automated run expected, got {[(r.run_id, r.status) for r in runs]}"
            run = runs[0]
            deadline = time.monotonic() + 300
            while not run.is_finished and time.monotonic() < deadline:
                time.sleep(1)
                run = instance.get_run_by_id(run.run_id)
            assert run.status == dg.DagsterRunStatus.SUCCESS, (run.status, _failure_text(instance, run.run_id))
            tick()
            assert len(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/auto_materialize": "true"}))) == 1
        checks = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        materializations = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)

    assert run.asset_selection == {PREP, INTERACTIONS, SUMMARY}
    assert not run.run_config.get("ops"), "the automated run sets no config: defaults come from animind.yaml"
    evaluated = {(e.dagster_event.event_specific_data.asset_check_key.name, e.dagster_event.event_specific_data.passed) for e in checks}
    assert evaluated == {("anime_prep_is_valid", True), ("has_rows", True)}, "every check of the run's assets"
    prep = next(
        e.dagster_event.event_specific_data.materialization
        for e in materializations
        if e.dagster_event.asset_key == PREP
    )
    assert prep.metadata["dagster/row_count"].value == 150, "automated run must use the settings file's limit"


def _failure_text(instance, run_id: str) -> str:
    events = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE})
    return "\n".join((e.message or "")[:1500] for e in events)


# --------------------------------------------------------------------------------------------------
# content-versioned assets (semantic_ids, rqvae_model): their dependents rebuild only on a changed data version


def _id_graph(state: dict):
    """The project's shape from anime_prep to recommendation_eval. ``rqvae_model`` and ``semantic_ids``
    carry the project's content-version tag and report ``state['quantizer']`` / ``state['ids']`` as their
    data version, as the real assets do (quantizer fingerprint / ID-space hash)."""
    from animind_assets import automation
    from animind_assets.meta import CONTENT_VERSION_TAGS

    @dg.asset(code_version="1")
    def anime_prep():
        return 1

    @dg.asset(code_version="1", deps=[anime_prep])
    def anime_embeddings():
        return 1

    @dg.asset(code_version="1", deps=[anime_embeddings], tags=CONTENT_VERSION_TAGS)
    def rqvae_model():
        return dg.MaterializeResult(data_version=dg.DataVersion(state["quantizer"]))

    @dg.asset(code_version="1", deps=[anime_prep, anime_embeddings, rqvae_model], tags=CONTENT_VERSION_TAGS)
    def semantic_ids():
        return dg.MaterializeResult(data_version=dg.DataVersion(state["ids"]))

    @dg.asset(code_version="1", deps=[anime_prep, semantic_ids])
    def llm_prep_dataset():
        return 1

    @dg.asset(code_version="1", deps=[llm_prep_dataset, semantic_ids, anime_prep, rqvae_model])
    def finetuned_model():
        return 1

    @dg.asset(code_version="1", deps=[finetuned_model, llm_prep_dataset])
    def recommendation_eval():
        return 1

    return automation.apply_automation(
        [anime_prep, anime_embeddings, rqvae_model, semantic_ids, llm_prep_dataset, finetuned_model, recommendation_eval]
    )


LLM = {"llm_prep_dataset": 1, "finetuned_model": 1, "recommendation_eval": 1}


def _bump(assets, key: str, version: str):
    return [
        a.map_asset_specs(lambda s: s.replace_attributes(code_version=version)) if dg.AssetKey(key) in a.keys else a
        for a in assets
    ]


def test_the_project_tags_its_content_versioned_assets():
    """``rqvae_model`` and ``semantic_ids`` report content fingerprints as data versions and carry the tag
    that makes the automation wait for a changed data version (``automation.DATA_VERSION_GATES``)."""
    from animind_assets import automation
    from animind_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    gates = automation.DATA_VERSION_GATES.resolve(graph)
    assert gates == {dg.AssetKey("rqvae_model"), dg.AssetKey("semantic_ids")}


def test_llm_assets_rebuild_only_when_semantic_ids_change():
    """semantic_ids re-materialized with every ID kept (same data version): llm_prep_dataset,
    finetuned_model and recommendation_eval are NOT requested; with changed IDs all three are requested
    on the next tick, in one run. An upstream change chains anime_embeddings -> rqvae_model ->
    semantic_ids into one run but never pulls the LLM assets into it."""
    state = {"quantizer": "q1", "ids": "ids1"}
    assets = _id_graph(state)
    instance = dg.DagsterInstance.ephemeral()
    ticker = Ticker(assets, instance, {})
    ticker.tick()
    assert dg.materialize(assets, instance=instance).success
    assert ticker.tick() == {}

    # the embedding code changed (as after 3 changed texts, the embeddings are rebuilt): the chain up to
    # semantic_ids goes in one run; the LLM assets wait for semantic_ids' result
    bumped = _bump(assets, "anime_embeddings", "2")
    requested = ticker.tick(bumped)
    assert requested == {"anime_embeddings": 1, "rqvae_model": 1, "semantic_ids": 1}, ticker.explain("llm_prep_dataset")
    assert dg.materialize(bumped, instance=instance, selection=["anime_embeddings", "rqvae_model", "semantic_ids"]).success
    # quantizer kept and every ID kept: same data versions -> nothing downstream
    assert ticker.tick(bumped) == {}, ticker.explain("llm_prep_dataset")
    assert ticker.tick(bumped) == {}

    # semantic_ids rebuilt by hand, same IDs: still nothing
    assert dg.materialize(bumped, instance=instance, selection=["semantic_ids"]).success
    assert ticker.tick(bumped) == {}, ticker.explain("llm_prep_dataset")

    # IDs changed: the LLM chain, all three on one tick (one run)
    state["ids"] = "ids2"
    assert dg.materialize(bumped, instance=instance, selection=["semantic_ids"]).success
    assert ticker.tick(bumped) == LLM, ticker.explain("llm_prep_dataset")
    assert ticker.tick(bumped) == {}, "requested once"
    assert dg.materialize(bumped, instance=instance, selection=list(LLM)).success
    assert ticker.tick(bumped) == {}


def test_quantizer_refit_by_hand_trains_the_lm_once():
    """rqvae_model refit alone (new fingerprint): semantic_ids follows on the next tick; finetuned_model,
    which also reads the quantizer, waits for semantic_ids instead of training beside it, then goes once
    with llm_prep_dataset when the IDs changed."""
    state = {"quantizer": "q1", "ids": "ids1"}
    assets = _id_graph(state)
    instance = dg.DagsterInstance.ephemeral()
    ticker = Ticker(assets, instance, {})
    ticker.tick()
    assert dg.materialize(assets, instance=instance).success
    assert ticker.tick() == {}

    state["quantizer"] = "q2"
    assert dg.materialize(assets, instance=instance, selection=["rqvae_model"]).success
    assert ticker.tick() == {"semantic_ids": 1}, ticker.explain("finetuned_model")
    state["ids"] = "ids2"
    assert dg.materialize(assets, instance=instance, selection=["semantic_ids"]).success
    assert ticker.tick() == LLM, ticker.explain("finetuned_model")
    assert dg.materialize(assets, instance=instance, selection=list(LLM)).success
    assert ticker.tick() == {}

    # a refit that happens to give the same IDs still retrains the LM once (its warm start reads the quantizer)
    state["quantizer"] = "q3"
    assert dg.materialize(assets, instance=instance, selection=["rqvae_model"]).success
    assert ticker.tick() == {"semantic_ids": 1}
    assert dg.materialize(assets, instance=instance, selection=["semantic_ids"]).success
    assert ticker.tick() == {"finetuned_model": 1, "recommendation_eval": 1}, ticker.explain("finetuned_model")


def test_model_built_on_changed_ids_is_stale_with_the_reason():
    """Dagster's staleness follows the ID space: a semantic_ids rebuild with the same IDs leaves the LLM
    asset fresh; changed IDs make it stale ("new data version"), and its next build records which ID
    version it was built on and why it changed (``semantic_ids_provenance``)."""
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver

    from animind_assets.defs.llm.shared import semantic_ids_provenance

    state = {"ids": "ids1", "reason": "first assignment: no previous IDs"}

    @dg.asset(code_version="1")
    def semantic_ids():
        return dg.MaterializeResult(data_version=dg.DataVersion(state["ids"]), metadata={"id_change_reason": state["reason"]})

    @dg.asset(code_version="1", deps=[semantic_ids])
    def llm_prep_dataset(context):
        return dg.MaterializeResult(metadata=semantic_ids_provenance(context, "llm_prep_dataset"))

    assets = [semantic_ids, llm_prep_dataset]
    instance = dg.DagsterInstance.ephemeral()

    def build(*keys):
        result = dg.materialize(assets, instance=instance, selection=list(keys))
        assert result.success
        mats = result.asset_materializations_for_node("llm_prep_dataset")
        return mats[0].metadata if mats else None

    md = build("semantic_ids", "llm_prep_dataset")
    assert md["semantic_ids_version"].value == "ids1"
    assert md["semantic_ids_change"].value == "first build on semantic IDs ids1"
    state["reason"] = "same quantizer q: 150 IDs kept (3 of them re-encoded to the same codes), 0 changed, 0 added, 0 removed"
    build("semantic_ids")
    assert get_stale_status_resolver(instance, assets).get_status(dg.AssetKey("llm_prep_dataset")) == StaleStatus.FRESH

    state["ids"], state["reason"] = "ids2", "same quantizer q: 147 IDs kept, 3 changed, 0 added, 0 removed"
    build("semantic_ids")
    resolver = get_stale_status_resolver(instance, assets)
    assert resolver.get_status(dg.AssetKey("llm_prep_dataset")) == StaleStatus.STALE
    causes = resolver.get_stale_causes(dg.AssetKey("llm_prep_dataset"))
    assert any("semantic_ids" in str(c) and "new data version" in str(c) for c in causes), causes
    md = build("llm_prep_dataset")
    assert md["semantic_ids_change"].value == f"semantic IDs changed ids1 -> ids2: {state['reason']}"


def test_rates_are_over_the_work_done_with_wall_time_beside():
    """``rate_metadata``: count, wall seconds and the rate side by side; no rate for a handful of items
    (3 texts in 10.2 s including a model load would read 0.29/s), a note saying why instead."""
    from animind_assets.meta import MIN_ITEMS_FOR_RATE, rate_metadata, round_float

    few = rate_metadata("rows_embedded", 3, 10.2, unit="texts")
    assert few["rows_embedded"].value == 3 and few["rows_embedded_seconds"].value == 10.2
    assert "rows_embedded_per_s" not in few and "3 texts in 10.2 s wall" in few["rows_embedded_rate_note"].value
    many = rate_metadata("rows_embedded", 16_211, 812.3456, unit="texts")
    assert many["rows_embedded_seconds"].value == 812.35
    assert many["rows_embedded_per_s"].value == round_float(16_211 / 812.3456) == 19.96
    assert MIN_ITEMS_FOR_RATE > 3
    assert round_float(12_345.6789) == 12_345.68 and round_float(0.0123456) == 0.01235
