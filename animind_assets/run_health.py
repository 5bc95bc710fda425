"""Crashes never hang later runs (rule 7 of issue 12): find runs whose processes died, mark them
failed and free the concurrency-pool slots (the ``gpu`` pool) they still hold.

Why this is needed: the shipped instances launch runs with Dagster's ``DefaultRunLauncher`` (a
subprocess per run), which has no worker health check, so the daemon's run monitoring cannot see that a
STARTED run was killed (``kill -9``, OOM killer, a reboot). Such a run stays STARTED forever and keeps its
``gpu`` slot: every later GPU step waits for a slot that is never released.

``dead_runs(instance)``: runs in STARTING / STARTED / CANCELING whose processes are all gone. Every Dagster
event records the pid of the process that wrote it (run worker, step subprocesses, or the process calling
``execute_in_process``); a run is dead when none of those pids is alive on this machine AND the run has
written no event for ``quiet_s`` seconds (the second condition keeps runs of another machine/container,
whose pids are not visible here, from being reaped while they are still logging).

``release_dead_runs(instance)``: reports each dead run as failed (``RUN_FAILURE`` with the reason) and frees
its concurrency slots and pending claims; it also frees slots still held by runs that already ended.
Called by ``animind runs clean`` and by the ``animind_automation`` sensor on every tick.
Also: ``install_pool_wait_backoff()`` (see its docstring) stops a step that waits for a pool slot from
spinning at 100% CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg
from dagster import DagsterRunStatus

ACTIVE = (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING)
DEFAULT_QUIET_S = 300.0


@dataclass
class DeadRun:
    run_id: str
    job_name: str
    status: str
    pids: list[int]
    quiet_s: float
    reason: str


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _run_pids_and_last_event(instance: dg.DagsterInstance, run_id: str) -> tuple[set[int], float | None]:
    pids: set[int] = set()
    last_ts = None
    for rec in instance.get_records_for_run(run_id, limit=10_000).records:
        entry = rec.event_log_entry
        last_ts = entry.timestamp if last_ts is None else max(last_ts, entry.timestamp)
        ev = entry.dagster_event
        if ev is not None and ev.pid:
            pids.add(int(ev.pid))
    return pids, last_ts


def dead_runs(instance: dg.DagsterInstance, quiet_s: float = DEFAULT_QUIET_S, now: float | None = None) -> list[DeadRun]:
    """Runs in STARTING/STARTED/CANCELING whose processes are gone (see the module docstring)."""
    now = time.time() if now is None else now
    out: list[DeadRun] = []
    for rec in instance.get_run_records(filters=dg.RunsFilter(statuses=list(ACTIVE)), limit=1000):
        run = rec.dagster_run
        pids, last_ts = _run_pids_and_last_event(instance, run.run_id)
        last = last_ts or (rec.update_timestamp.timestamp() if rec.update_timestamp else now)
        quiet = now - last
        if quiet < quiet_s:
            continue
        if not pids:
            if run.status == DagsterRunStatus.STARTED:
                continue  # no evidence either way
            reason = f"run {run.status.value} for {quiet:.0f}s without any process writing events"
        elif any(_pid_alive(p) for p in pids):
            continue
        else:
            reason = f"every process of the run is gone (pids {sorted(pids)}); last event {quiet:.0f}s ago"
        out.append(DeadRun(run.run_id, run.job_name, run.status.value, sorted(pids), quiet, reason))
    return out


def release_dead_runs(
    instance: dg.DagsterInstance, quiet_s: float = DEFAULT_QUIET_S, log: Callable[[str], None] | None = None
) -> dict[str, list[str]]:
    """Mark dead runs failed and free their pool slots; free slots held by runs that already ended.
    Returns ``{"failed": [run ids], "slots_freed": [run ids]}``; ``log`` gets one line per action."""
    log = log or (lambda _m: None)
    failed, freed = [], []
    for dead in dead_runs(instance, quiet_s=quiet_s):
        run = instance.get_run_by_id(dead.run_id)
        if run is None or run.status not in ACTIVE:
            continue
        instance.report_run_failed(run, f"AniMind run health: marked failed, {dead.reason}")
        failed.append(dead.run_id)
        log(f"run {dead.run_id} ({dead.job_name}) marked FAILURE: {dead.reason}")
    storage = instance.event_log_storage
    if getattr(storage, "supports_global_concurrency_limits", False):
        holders = set(storage.get_concurrency_run_ids())
        if holders:
            finished = {
                r.dagster_run.run_id
                for r in instance.get_run_records(filters=dg.RunsFilter(run_ids=list(holders)))
                if r.dagster_run.is_finished
            }
            missing = holders - {r.dagster_run.run_id for r in instance.get_run_records(filters=dg.RunsFilter(run_ids=list(holders)))}
            for run_id in sorted(finished | missing):
                storage.free_concurrency_slots_for_run(run_id)
                freed.append(run_id)
                log(f"freed the concurrency slots held by {'deleted' if run_id in missing else 'ended'} run {run_id}")
    return {"failed": failed, "slots_freed": freed}


# ------------------------------------------------------------------------------------ pool wait backoff
POOL_WAIT_SLEEP_S = 0.05
_INSTALLED = False


def install_pool_wait_backoff(sleep_s: float = POOL_WAIT_SLEEP_S) -> None:
    """Make a run that waits for a pool slot sleep instead of spinning.

    Dagster's multiprocess executor loops ``get_steps_to_execute`` without sleeping while its only
    runnable step is blocked on a pool claim (the claim itself is rate-limited, the loop is not), so a run
    waiting for the ``gpu`` slot burns a full core. This wraps ``InstanceConcurrencyContext.claim`` so a
    refused claim sleeps ``sleep_s`` before returning; the executor then polls ~20 times a second
    (measured: ~1% CPU instead of ~95%). Idempotent; installed when ``animind_assets.gpu`` is imported."""
    global _INSTALLED
    if _INSTALLED:
        return
    from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

    original = InstanceConcurrencyContext.claim

    def claim(self, concurrency_key, step_key, step_priority=0):  # type: ignore[no-untyped-def]
        ok = original(self, concurrency_key, step_key, step_priority)
        if not ok:
            time.sleep(sleep_s)
        return ok

    claim.__doc__ = original.__doc__
    InstanceConcurrencyContext.claim = claim  # type: ignore[method-assign]
    _INSTALLED = True


RUN_HEALTH_SENSOR_NAME = "animind_run_health"


@dg.sensor(
    name=RUN_HEALTH_SENSOR_NAME,
    minimum_interval_seconds=int(os.environ.get("ANIMIND_RUN_HEALTH_INTERVAL_S", "60")),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks runs whose processes died as failed and frees the pool slots they hold (rule 7).",
)
def run_health_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    quiet = float(os.environ.get("ANIMIND_RUN_HEALTH_QUIET_S", str(DEFAULT_QUIET_S)))
    out = release_dead_runs(context.instance, quiet_s=quiet, log=context.log.warning)
    return dg.SkipReason(
        f"{len(out['failed'])} dead run(s) marked failed, slots of {len(out['slots_freed'])} ended run(s) freed"
    )
