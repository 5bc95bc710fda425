"""Automation of the AniMind asset graph: observe the sources, react to real changes, alert on failures.

What ``definitions_kwargs`` adds to ``dg.Definitions``:

* ``observe_sources`` job + schedule (cron ``$ANIMIND_OBSERVE_CRON``, default hourly, running by default):
  observes ``anime_catalog_source`` and ``watchlist_source``. Their data version is a *content
  fingerprint*, so an observation only counts as an update when the content really changed.
* Declarative automation (``AUTOMATION_CONDITION``, applied to every unpartitioned materializable
  asset that has no condition of its own): an asset is requested when one of its dependencies got a
  new data version / materialization (or is requested on the same tick, so a whole downstream chain
  goes in one run) or when its own ``code_version`` changed - but only if it has been materialized
  before (the automation keeps what you built up to date; it never starts building the expensive
  parts of the graph nobody asked for), and never while a dependency is missing or in progress.
  Partitioned assets (the RQ-VAE preset ``rqvae_variants``) are left alone: big variants are
  launched by hand or by backfill. An asset is also not requested while a *blocking* check of one of
  its dependencies has failed on the dependency's latest materialization.
* Checks run wherever their asset runs: every asset check of an automated asset (separately defined
  ``@asset_check`` functions and ``check_specs`` alike) gets ``CHECK_AUTOMATION_CONDITION``: it is requested
  on the tick its asset is requested, so it goes into the same run (Dagster groups a check with its
  asset), and a blocking check that fails there stops the downstream steps of that run. It is also
  requested when its asset was updated by a run that did not evaluate it. Without a condition of
  their own, separately defined checks would be left out of automated runs (Dagster 1.13 only
  runs the checks declared inside the asset's op there). Manual and scheduled runs
  (``full_rebuild``) select an asset's checks by default.
* ``animind_automation`` automation-condition sensor, running by default, evaluates those conditions.
* ``full_rebuild`` job + weekly schedule (``$ANIMIND_REBUILD_CRON``, default Sunday 03:00 UTC; stopped by
  default, ``ANIMIND_REBUILD_SCHEDULE=running`` turns it on): observes the sources and materializes every
  unpartitioned asset.
* ``animind_run_failure_alert`` run-failure sensor (running by default): logs the failure and appends one
  JSON line to ``$ANIMIND_ALERTS_PATH`` (default ``<data dir>/alerts.jsonl``). No network.
* ``executor`` = ``dagster_k8s.k8s_job_executor`` when ``ANIMIND_EXECUTOR=k8s`` (one pod per step; set
  by the Helm values in ``docker/helm``); otherwise Dagster's default multiprocess executor.

Environment knobs: ``ANIMIND_OBSERVE_CRON``, ``ANIMIND_REBUILD_CRON``, ``ANIMIND_REBUILD_SCHEDULE``
(running|stopped), ``ANIMIND_AUTOMATION_EXCLUDE`` (comma-separated asset keys or ``group:<name>`` left
without automation), ``ANIMIND_AUTOMATION_INTERVAL_S`` (sensor interval, default 30),
``ANIMIND_ALERTS_PATH``, ``ANIMIND_EXECUTOR`` (k8s|multiprocess), ``ANIMIND_CRON_TIMEZONE`` (default UTC).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from animind_assets.meta import CONTENT_VERSION_TAGS

SOURCE_KEYS = (dg.AssetKey("anime_catalog_source"), dg.AssetKey("watchlist_source"))

OBSERVE_JOB_NAME = "observe_sources"
REBUILD_JOB_NAME = "full_rebuild"
AUTOMATION_SENSOR_NAME = "animind_automation"
FAILURE_SENSOR_NAME = "animind_run_failure_alert"
DEFAULT_OBSERVE_CRON = "0 * * * *"
DEFAULT_REBUILD_CRON = "0 3 * * 0"
AUTOMATION_TAG = "animind/automation"


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def observe_cron() -> str:
    return _env("ANIMIND_OBSERVE_CRON", DEFAULT_OBSERVE_CRON)


def rebuild_cron() -> str:
    return _env("ANIMIND_REBUILD_CRON", DEFAULT_REBUILD_CRON)


def cron_timezone() -> str:
    return _env("ANIMIND_CRON_TIMEZONE", "UTC")


def alerts_path() -> Path:
    explicit = os.environ.get("ANIMIND_ALERTS_PATH", "").strip()
    if explicit:
        return Path(explicit)
    from animind_assets.resources import data_dir

    return data_dir() / "alerts.jsonl"


#: The assets tagged ``animind/data_version: content`` (``meta.CONTENT_VERSION_TAGS``): their data version
#: is a fingerprint of their content (``semantic_ids``: the ID space; ``rqvae_model``: the quantizer
#: weights) and a rebuild often yields the same content. Their dependents react only to a *changed*
#: data version, on the tick after they materialized, and never join them in the same run
#: (``deps_updated``). Resolved against the asset graph each time a condition is evaluated.
DATA_VERSION_GATES = dg.AssetSelection.tag(*next(iter(CONTENT_VERSION_TAGS.items())))


def deps_updated() -> dg.AutomationCondition:
    """A dependency changed since the last tick, or will be requested on this tick.

    For ordinary dependencies this is Dagster's ``any_deps_updated``: a new materialization, or an
    observation of an observable source whose data version differs from the previous one (so an hourly
    observation that finds the same fingerprint requests nothing), not counting updates by a run that
    also materialized this asset; ``will_be_requested`` chains the downstream assets into the same run.

    Dependencies in ``DATA_VERSION_GATES`` count only when their data version changed
    (``data_version_changed``): ``semantic_ids`` re-materialized with every ID kept has the same data
    version, so ``llm_prep_dataset``, ``finetuned_model``, ``recommendation_eval`` and the other
    assets built on the IDs are not requested. Because nobody knows before the run whether the IDs will
    change, their dependents never chain onto a gate requested on the same tick: they follow on the next
    tick (one sensor interval later), in a run of their own, and only when the content did change.
    """
    AC = dg.AutomationCondition
    ordinary = AC.any_deps_match(
        (AC.newly_updated() & ~AC.executed_with_root_target()).with_label("newly_updated_without_root")
        | AC.will_be_requested()
    ).ignore(DATA_VERSION_GATES).with_label("any_deps_updated (dependencies without a content data version)")
    gated = AC.any_deps_match(
        (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("data_version_changed_without_root")
    ).allow(DATA_VERSION_GATES).with_label("a content-versioned dependency changed its data version")
    return (ordinary | gated).with_label("deps_updated")


def waits_for_content_versioned_dep() -> dg.AutomationCondition:
    """A content-versioned dependency (``DATA_VERSION_GATES``) is requested on this tick and no ordinary
    dependency is: wait for its result instead of running beside it on what it replaces.

    E.g. ``rqvae_model`` refit by hand: on the next tick ``semantic_ids`` and ``finetuned_model`` both
    react to the new quantizer; ``finetuned_model`` waits one tick for ``semantic_ids``, so it is trained
    once, after ``llm_prep_dataset`` caught up with the new IDs, not once now and once more after.
    ``semantic_ids`` itself is not held back when ``anime_embeddings`` (ordinary) goes in the same run as
    ``rqvae_model``: then both are in one run, in dependency order.
    """
    AC = dg.AutomationCondition
    return (
        AC.any_deps_match(AC.will_be_requested()).allow(DATA_VERSION_GATES)
        & ~AC.any_deps_match(AC.will_be_requested()).ignore(DATA_VERSION_GATES)
    ).with_label("a content-versioned dependency is requested on this tick (wait for its result)")


def automation_condition() -> dg.AutomationCondition:
    """Refresh an already-built asset when an upstream data version changed or its code version changed
    (``deps_updated``: content-versioned dependencies count only when their data version changed)."""
    AC = dg.AutomationCondition
    return (
        AC.in_latest_time_window()
        & (deps_updated() | AC.code_version_changed()).since_last_handled()
        & ~AC.missing()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
        & ~waits_for_content_versioned_dep()
        & AC.all_deps_blocking_checks_passed()
    ).with_label("animind: upstream data or code changed")


def check_automation_condition() -> dg.AutomationCondition:
    """A check runs with its asset: requested whenever a dependency (its asset) is requested on the
    same tick, so the sensor puts check and asset in one run, and blocking checks gate the downstream
    steps of that run. Also requested when its asset was updated by a run that did not execute the
    check (``any_deps_updated`` ignores updates by runs that also planned this check), i.e. Dagster's
    ``eager`` for checks.
    """
    AC = dg.AutomationCondition
    with_asset = AC.any_deps_match(AC.will_be_requested()).with_label("asset requested on this tick")
    after_asset = (
        AC.any_deps_updated().since_last_handled() & ~AC.any_deps_in_progress() & ~AC.in_progress()
    ).with_label("asset updated without this check")
    return (with_asset | after_asset).with_label("animind: runs with its asset")


AUTOMATION_CONDITION = automation_condition()
CHECK_AUTOMATION_CONDITION = check_automation_condition()


def _excluded() -> tuple[set[str], set[str]]:
    keys: set[str] = set()
    groups: set[str] = set()
    for item in os.environ.get("ANIMIND_AUTOMATION_EXCLUDE", "").split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("group:"):
            groups.add(item[len("group:") :])
        else:
            keys.add(item)
    return keys, groups


def _iter_specs(assets: Iterable[Any]) -> Iterable[tuple[Any, dg.AssetSpec]]:
    for obj in assets:
        if isinstance(obj, dg.AssetsDefinition):
            for spec in obj.specs:
                yield obj, spec


def _is_materializable(obj: Any) -> bool:
    return isinstance(obj, dg.AssetsDefinition) and obj.is_materializable


def should_automate(spec: dg.AssetSpec) -> bool:
    """Unpartitioned, not excluded by env/tag, and without a condition set by its author."""
    if spec.partitions_def is not None:
        return False
    if spec.automation_condition is not None:
        return False
    if (spec.tags or {}).get(AUTOMATION_TAG, "").lower() in ("manual", "off", "none"):
        return False
    keys, groups = _excluded()
    if spec.key.to_user_string() in keys or (spec.group_name or "default") in groups:
        return False
    return True


def apply_automation(assets: Sequence[Any]) -> list[Any]:
    """The same assets with ``AUTOMATION_CONDITION`` on every materializable spec that ``should_automate``
    and ``CHECK_AUTOMATION_CONDITION`` on the checks declared inside those assets (``check_specs``)."""
    out: list[Any] = []
    for obj in assets:
        if _is_materializable(obj) and any(should_automate(s) for s in obj.specs):
            automated = {s.key for s in obj.specs if should_automate(s)}
            obj = obj.map_asset_specs(
                lambda spec: spec.replace_attributes(automation_condition=AUTOMATION_CONDITION)
                if should_automate(spec)
                else spec
            )
            obj = _with_check_conditions(obj, automated)
        out.append(obj)
    return out


def _with_check_conditions(obj: dg.AssetsDefinition, asset_keys: set[dg.AssetKey]) -> dg.AssetsDefinition:
    """``obj`` with ``CHECK_AUTOMATION_CONDITION`` on each of its check specs that targets one of
    ``asset_keys`` and has no condition of its own (Dagster has no public mapper for check specs, so the
    definition is rebuilt from its attributes, as ``AssetsDefinition.with_attributes`` does)."""
    from dagster._core.definitions.asset_checks.asset_checks_definition import AssetChecksDefinition
    from dagster_shared.record import replace

    from animind_assets.quiet import known_warnings_silenced

    specs = dict(obj.node_check_specs_by_output_name)
    changed = False
    for name, spec in specs.items():
        if spec.asset_key in asset_keys and spec.automation_condition is None:
            specs[name] = replace(spec, automation_condition=CHECK_AUTOMATION_CONDITION)
            changed = True
    if not changed:
        return obj
    attrs = {**obj.get_attributes_dict(), "check_specs_by_output_name": specs}
    if isinstance(obj, AssetChecksDefinition):
        # keep the type: Dagster converts a plain AssetsDefinition holding only checks back with
        # AssetChecksDefinition(**attrs) when it builds the repository, which passes the beta parameter
        # `execution_type` outside any silenced block (the one beta notice left in the server log)
        with known_warnings_silenced():
            return AssetChecksDefinition(**attrs)
    return obj.__class__.dagster_internal_init(**attrs)


def apply_check_automation(checks: Sequence[Any], assets: Sequence[Any]) -> list[Any]:
    """The separately defined asset checks, each with ``CHECK_AUTOMATION_CONDITION`` when the asset it
    checks carries ``AUTOMATION_CONDITION`` in ``assets`` (the output of ``apply_automation``) and the
    check has no condition of its own. Checks of manual/partitioned/excluded assets are left alone."""
    automated = {
        spec.key
        for _, spec in _iter_specs(assets)
        if spec.automation_condition is not None and spec.automation_condition == AUTOMATION_CONDITION
    }
    return [
        _with_check_conditions(c, automated) if isinstance(c, dg.AssetsDefinition) else c for c in checks
    ]


def unpartitioned_materializable_keys(assets: Sequence[Any]) -> list[dg.AssetKey]:
    return [
        spec.key for obj, spec in _iter_specs(assets) if _is_materializable(obj) and spec.partitions_def is None
    ]


def _all_keys(assets: Sequence[Any]) -> set[dg.AssetKey]:
    keys: set[dg.AssetKey] = set()
    for obj in assets:
        if isinstance(obj, dg.AssetsDefinition):
            keys.update(obj.keys)
        elif isinstance(obj, dg.SourceAsset):
            keys.add(obj.key)
        elif isinstance(obj, dg.AssetSpec):
            keys.add(obj.key)
    return keys


def source_keys(assets: Sequence[Any]) -> list[dg.AssetKey]:
    """The observable sources present in ``assets`` (``observable_source_asset`` gives ``SourceAsset``s)."""
    present = _all_keys(assets)
    return [k for k in SOURCE_KEYS if k in present]


# --------------------------------------------------------------------------------------------------
# run-failure alert


_ALERT_TAGS = (
    "dagster/partition",
    "dagster/schedule_name",
    "dagster/sensor_name",
    "dagster/backfill",
    "dagster/auto_materialize",
    "dagster/from_automation_condition",
)


def _error_text(err: Any, limit: int = 2000) -> str:
    """The error and its causes (the user's exception sits under Dagster's step-execution wrapper)."""
    parts = []
    seen = 0
    while err is not None and seen < 5:
        parts.append((err.message or "").strip())
        err = getattr(err, "cause", None) or getattr(err, "context", None)
        seen += 1
    return " <- ".join(p for p in parts if p)[:limit]


def _planned_assets(context: dg.RunFailureSensorContext) -> set[dg.AssetKey]:
    """Asset keys the failed run planned to materialize (``run.asset_selection`` is None for full jobs)."""
    try:
        records = context.instance.get_records_for_run(
            context.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED
        ).records
    except Exception:  # noqa: BLE001
        return set()
    return {r.asset_key for r in records if r.asset_key is not None}


def alert_record(context: dg.RunFailureSensorContext) -> dict:
    run = context.dagster_run
    failure = context.failure_event
    message = failure.message or ""
    step_failures = []
    try:
        for event in context.get_step_failure_events():
            err = event.event_specific_data.error if event.event_specific_data else None
            step_failures.append(
                {
                    "step": event.step_key,
                    "error": (_error_text(err) if err is not None else event.message or ""),
                }
            )
    except Exception:  # noqa: BLE001 - the alert must be written even when events cannot be read
        pass
    assets = sorted(k.to_user_string() for k in (run.asset_selection or _planned_assets(context)))
    return {
        "kind": "run_failure",
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run.run_id,
        "job_name": run.job_name,
        "assets": assets,
        "tags": {k: v for k, v in (run.tags or {}).items() if k in _ALERT_TAGS},
        "message": message[:2000],
        "step_failures": step_failures,
    }


def append_alert(record: dict, path: Path | None = None) -> Path:
    """Append one JSON line under an inter-process file lock (sensors may run in threads/processes)."""
    from filelock import FileLock

    target = Path(path) if path is not None else alerts_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str)
    with FileLock(str(target) + ".lock", timeout=60):
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    return target


@dg.run_failure_sensor(
    name=FAILURE_SENSOR_NAME,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Logs every failed run and appends an alert record to data/alerts.jsonl (no network).",
)
def run_failure_alert(context: dg.RunFailureSensorContext) -> None:
    record = alert_record(context)
    path = append_alert(record)
    context.log.error(
        f"run {record['run_id']} ({record['job_name']}) failed: {record['message'][:300]} "
        f"-> alert appended to {path}"
    )


# --------------------------------------------------------------------------------------------------
# definitions

from animind_assets.run_health import run_health_sensor  # noqa: E402  (rule 7: dead runs never hold the gpu pool)


def _status(name: str, default: str) -> dg.DefaultScheduleStatus:
    value = _env(name, default).lower()
    return dg.DefaultScheduleStatus.RUNNING if value in ("running", "on", "1", "true") else dg.DefaultScheduleStatus.STOPPED


def _executor():
    kind = _env("ANIMIND_EXECUTOR", "multiprocess").lower()
    if kind in ("k8s", "kubernetes", "k8s_job"):
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    return None


def definitions_kwargs(
    assets: Sequence[Any], *, include_assets: bool = False, checks: Sequence[Any] | None = None
) -> dict:
    """Keyword arguments for ``dg.Definitions``: ``jobs``, ``schedules``, ``sensors`` (+ ``executor``
    when ``ANIMIND_EXECUTOR=k8s``). With ``include_assets=True`` also ``assets``: ``assets`` with the
    automation condition applied (``apply_automation``), to be passed as ``Definitions(assets=...)``
    instead of the untransformed list; with ``checks`` also ``asset_checks``: those checks with the
    check condition of their asset (``apply_check_automation``)."""
    sources = source_keys(assets)
    rebuild_keys = unpartitioned_materializable_keys(assets)
    jobs: list = []
    schedules: list = []
    if sources:
        observe_job = dg.define_asset_job(
            OBSERVE_JOB_NAME,
            selection=dg.AssetSelection.assets(*sources),
            description="Observe the source catalog and watch lists (data version = content fingerprint).",
            tags={"animind/kind": "observe"},
        )
        jobs.append(observe_job)
        schedules.append(
            dg.ScheduleDefinition(
                name=f"{OBSERVE_JOB_NAME}_schedule",
                job=observe_job,
                cron_schedule=observe_cron(),
                execution_timezone=cron_timezone(),
                default_status=_status("ANIMIND_OBSERVE_SCHEDULE", "running"),
                description="Observe the sources; a changed fingerprint triggers the downstream refresh.",
            )
        )
    if rebuild_keys:
        rebuild_job = dg.define_asset_job(
            REBUILD_JOB_NAME,
            selection=dg.AssetSelection.assets(*sources, *rebuild_keys),
            description="Observe the sources and rebuild every unpartitioned asset.",
            tags={"animind/kind": "full_rebuild"},
        )
        jobs.append(rebuild_job)
        schedules.append(
            dg.ScheduleDefinition(
                name=f"{REBUILD_JOB_NAME}_weekly",
                job=rebuild_job,
                cron_schedule=rebuild_cron(),
                execution_timezone=cron_timezone(),
                default_status=_status("ANIMIND_REBUILD_SCHEDULE", "stopped"),
                description="Weekly full rebuild (stopped by default: ANIMIND_REBUILD_SCHEDULE=running).",
            )
        )
    sensors = [
        dg.AutomationConditionSensorDefinition(
            AUTOMATION_SENSOR_NAME,
            target=dg.AssetSelection.all(),
            default_status=dg.DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=int(_env("ANIMIND_AUTOMATION_INTERVAL_S", "30")),
            description="Evaluates the automation conditions (source changed / code changed -> refresh).",
        ),
        run_failure_alert,
        run_health_sensor,
    ]
    kwargs: dict = {"jobs": jobs, "schedules": schedules, "sensors": sensors}
    executor = _executor()
    if executor is not None:
        kwargs["executor"] = executor
    if include_assets:
        kwargs["assets"] = apply_automation(assets)
        if checks is not None:
            kwargs["asset_checks"] = apply_check_automation(checks, kwargs["assets"])
    return kwargs
