"""``animind`` command line: run the demo graph, observe sources, print where things are.

    animind demo                 observe the sources and materialize every asset (demo source by default)
    animind demo --select anime_prep+   any Dagster asset selection
    animind demo --verbose       also print Dagster's event log (DEBUG) instead of one line per step
    animind paths                print the data folder, DuckDB file, exports and DAGSTER_HOME
    animind runs clean           mark runs whose processes died as failed, free the pool slots they hold
                                 and finish/undo interrupted table+export writes

Quiet by default: one line per step (its start time, wall time, rows written, check results; on a
terminal the line shows "running" while the step runs and is then completed in place), then a summary.
Step failures print their error. Library progress bars, log chatter and Python warnings are held back
(``animind_assets.quiet.LibraryChatter``: the warnings go to a file the summary names);
``--verbose`` shows every Dagster event and all library output.

Runs use the project's persistent Dagster instance (``$DAGSTER_HOME``, default ``.dagster_home/`` in the
project root), so ``dagster dev`` afterwards shows the runs, lineage and metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _ensure_dagster_home() -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


class StepProgress:
    """Reads a run's events from the instance and prints one line per step, when the step ends.

    ``poll()`` fetches the events since the last call (``instance.get_records_for_run`` with a cursor), so
    it can run beside an in-process execution in another thread. A line carries the step's start time,
    its wall time, the rows written (``dagster/row_count`` of the step's materializations) and the
    results of the checks it evaluated; a failure carries the first line of its error. With
    ``live=True`` (a terminal) the step's line is shown as "running" when it starts and rewritten in
    place when it ends, so a long step is visible without adding lines.
    """

    KINDS = ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED", "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION")

    def __init__(
        self,
        instance,
        run_id: str,
        total: int,
        out: Callable[[str], Any] = print,
        labels: dict[str, str] | None = None,
        live: Callable[[str], Any] | None = None,
    ) -> None:
        self.labels = dict(labels or {})  # step key -> what the user reads (check steps: "check asset:name")
        self.instance = instance
        self.run_id = run_id
        self.total = total
        self.out = out
        self.cursor = None
        self.poll_errors = 0  # event-log reads that failed and were retried on the next tick
        self.last_poll_error = ""
        self.done = 0
        self.rows: dict[str, list[str]] = {}
        self.checks: dict[str, list[str]] = {}
        self.failed_checks: list[str] = []
        self.passed_checks = 0
        self.live = live  # writes a provisional line (no newline) that the next line replaces
        self.started: dict[str, float] = {}

    def _line(self, text: str) -> None:
        self.out(f"[animind] {text}")

    def poll(self) -> None:
        """Print the lines of the steps that started/finished since the last poll. Reading the event log
        can fail transiently while the run thread writes it (e.g. SQLite ``database is locked`` or the
        run's event database being created on a loaded machine): such a poll is skipped and retried on the
        next tick (the cursor is kept, nothing is lost). The run itself never depends on this display."""
        try:
            self._poll()
        except Exception as exc:  # noqa: BLE001 - display only; the run thread owns the outcome
            self.poll_errors += 1
            self.last_poll_error = f"{type(exc).__name__}: {exc}"

    def _poll(self) -> None:
        import dagster as dg

        types = {getattr(dg.DagsterEventType, k) for k in self.KINDS}
        while True:
            conn = self.instance.get_records_for_run(self.run_id, cursor=self.cursor, of_type=types, limit=500)
            for record in conn.records:
                self._handle(record.event_log_entry)
            self.cursor = conn.cursor
            if not conn.has_more:
                return

    def _handle(self, entry) -> None:
        event = entry.dagster_event
        if event is None:
            return
        step = self.labels.get(event.step_key or "", event.step_key or "?")
        kind = event.event_type_value
        if kind == "STEP_START":
            self.started[step] = entry.timestamp
            if self.live is not None:
                self.live(f"[animind] [{self.done + 1}/{self.total}] {step}: started {time.strftime('%H:%M:%S', time.localtime(entry.timestamp))}, running ...")
        elif kind == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            rows = mat.metadata.get("dagster/row_count")
            label = mat.asset_key.to_user_string()
            self.rows.setdefault(step, []).append(
                f"{label}: {rows.value:,} rows" if rows is not None and label != step else
                (f"{rows.value:,} rows" if rows is not None else "materialized")
            )
        elif kind == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            name = ev.asset_check_key.name
            if ev.passed:
                self.passed_checks += 1
                self.checks.setdefault(step, []).append(f"{name} passed")
            else:
                severity = getattr(getattr(ev, "severity", None), "value", "ERROR")
                self.failed_checks.append(f"{ev.asset_check_key.to_user_string()} ({severity})")
                desc = (ev.description or "").strip().splitlines()
                self.checks.setdefault(step, []).append(f"{name} FAILED{': ' + desc[0][:160] if desc else ''}")
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED"):
            self.done += 1
            start = self.started.pop(step, None)
            parts = []
            if kind == "STEP_SUCCESS":
                secs = (event.event_specific_data.duration_ms or 0.0) / 1000.0
                began = time.strftime("%H:%M:%S", time.localtime(start if start is not None else entry.timestamp - secs))
                parts.append(f"started {began}, done in {secs:.1f}s")
            elif kind == "STEP_FAILURE":
                err = getattr(event.event_specific_data, "error", None)
                cause = err
                while cause is not None and getattr(cause, "cause", None) is not None:
                    cause = cause.cause
                msg = ((cause.message if cause is not None else None) or event.message or "").strip().splitlines()
                parts.append("FAILED" + (f": {msg[0][:300]}" if msg else ""))
            else:
                parts.append("skipped (an upstream step or blocking check failed)")
            parts += self.rows.pop(step, [])
            parts += self.checks.pop(step, [])
            self._line(f"[{self.done}/{self.total}] {step}: " + "; ".join(parts))


def _live_writer(stream=None) -> Callable[[str], Any] | None:
    """On a terminal: a writer that shows a provisional line, replaced by the next line printed."""
    stream = stream or sys.stdout
    if not stream.isatty():
        return None

    def write(text: str) -> None:
        stream.write("\r\x1b[K" + text)
        stream.flush()

    return write


def stop_compute_log_tails() -> int:
    """Terminate the ``tail -F`` children that Dagster's compute-log capture left running; returns how many.

    The in-process run mirrors its stdout/stderr through ``tail -F`` child processes. When the capture is not
    closed before the interpreter exits (its generator is finalized late, after the run thread ended), those
    children outlive the CLI, holding its stdout/stderr open: a caller reading the CLI through pipes
    (``animind demo | tee log``, ``subprocess.run(capture_output=True)``) then never sees end-of-file. Run at
    exit (``atexit``) after the run has finished; only this process's own ``tail`` children are touched."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a Dagster dependency
        return 0
    stopped = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "tail":
                child.terminate()
                stopped += 1
        except psutil.Error:
            continue
    return stopped


def cmd_demo(args: argparse.Namespace) -> int:
    import atexit

    atexit.register(stop_compute_log_tails)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from animind_assets.quiet import LibraryChatter

    chatter = LibraryChatter(verbose=args.verbose).start()  # before the libraries are imported
    try:
        return _demo(args, chatter)
    finally:
        chatter.stop()


def _demo(args: argparse.Namespace, chatter) -> int:
    from animind_assets.quiet import dagster_console_run_config, silence_known_warnings

    home = _ensure_dagster_home()
    silence_known_warnings()
    import logging

    import dagster as dg
    from dagster._core.definitions.observe import observe
    from dagster._core.utils import make_new_run_id

    if not args.verbose:
        logging.getLogger("dagster").setLevel(logging.CRITICAL)
    from animind_assets.definitions import defs

    instance = dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    t0 = time.perf_counter()
    sources = [a for a in defs.assets or [] if isinstance(a, dg.SourceAsset) and a.is_observable]
    if sources:
        t_obs = time.perf_counter()
        obs = observe(sources, instance=instance, resources=defs.resources, run_config=dagster_console_run_config(args.verbose))
        versions = [
            f"{e.asset_key.to_user_string()} {e.event_specific_data.asset_observation.data_version or '-'}"
            for e in obs.all_events
            if e.event_type_value == "ASSET_OBSERVATION"
        ]
        print(f"[animind] observed {len(sources)} source(s) in {time.perf_counter() - t_obs:.1f}s: {'; '.join(versions)}", flush=True)
    if args.select:
        parts = [p for p in args.select.replace(",", " ").split() if p]
        selection = dg.AssetSelection.from_string(parts[0])
        for part in parts[1:]:
            selection = selection | dg.AssetSelection.from_string(part)
    else:
        # Everything that runs offline on the demo source; the Amazon Beauty group needs ../shared data
        # (select it explicitly: --select "group:beauty").
        selection = dg.AssetSelection.all() - dg.AssetSelection.groups("beauty")
    keys = selection.resolve(graph)
    partitioned = sorted(k.to_user_string() for k in keys if graph.get(k).is_partitioned)
    materializable = [k for k in keys if graph.get(k).is_materializable and not graph.get(k).is_partitioned]
    job = defs.resolve_implicit_global_asset_job_def()
    from dagster._core.execution.api import create_execution_plan

    plan = create_execution_plan(job.get_subset(asset_selection=set(materializable)), run_config=dagster_console_run_config(args.verbose))
    total = len(plan.step_keys_to_execute)
    print(
        f"[animind] materializing {len(materializable)} assets ({total} steps incl. checks) into DAGSTER_HOME={home}"
        + (f"; partitioned assets skipped (launch partitions from the UI): {', '.join(partitioned)}" if partitioned else ""),
        flush=True,
    )
    run_id = make_new_run_id()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = job.execute_in_process(
                instance=instance,
                asset_selection=materializable,
                raise_on_error=False,
                run_id=run_id,
                run_config=dagster_console_run_config(args.verbose),
                tags={"animind/trigger": "cli-demo"},
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = exc

    labels = {}
    for check_key in job.asset_layer.asset_graph.asset_check_keys:
        labels[f"{check_key.asset_key.to_python_identifier()}_{check_key.name}"] = f"check {check_key.to_user_string()}"
    live = _live_writer()

    def out(line: str) -> None:
        print(("\r\x1b[K" if live else "") + line, flush=True)

    progress = StepProgress(instance, run_id, total, out=out, labels=labels, live=live)
    worker = threading.Thread(target=work, name="animind-demo-run", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        if not args.verbose:
            progress.poll()
    if "error" in box:
        raise box["error"]
    if not args.verbose:
        progress.poll()
        if progress.poll_errors and progress.done < progress.total:
            print(f"[animind]   step lines incomplete: {progress.poll_errors} event-log read(s) failed, last: "
                  f"{progress.last_poll_error[:200]} (the run's own result follows)", flush=True)
    result = box["result"]
    elapsed = time.perf_counter() - t0
    ok = result.success
    checks = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    failed_checks = [e for e in checks if not e.event_specific_data.passed]  # type: ignore[union-attr]
    hidden = ""
    if chatter.hidden:
        from animind_assets.resources import data_dir

        path = chatter.write(data_dir() / "logs" / f"demo-{result.run_id}-warnings.txt")
        hidden = f"; {len(chatter.hidden)} library warning(s) hidden: {path} (--verbose prints them)"
    print(
        f"[animind] run {result.run_id}: {'SUCCESS' if ok else 'FAILURE'}; "
        f"{len(result.get_asset_materialization_events())} materializations, "
        f"{len(checks)} checks ({len(failed_checks)} failed) in {elapsed:.1f}s{hidden}",
        flush=True,
    )
    if not args.verbose and progress.done < progress.total:
        print(f"[animind]   {progress.total - progress.done} of {progress.total} planned steps not run "
              "(Dagster does not start the steps below a failed step or blocking check)")
    for e in failed_checks:
        key = e.event_specific_data.asset_check_key  # type: ignore[union-attr]
        print(f"[animind]   failed check {key.to_user_string()}: {(e.event_specific_data.description or '').strip()[:300]}")
    print(f"[animind] open the UI with:  DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '$PWD/.dagster_home')} .venv/bin/dg dev   (then http://127.0.0.1:3000)")
    return 0 if ok else 1


def cmd_paths(_: argparse.Namespace) -> int:
    from animind_assets.resources import data_dir, default_duckdb_path

    print(f"data dir     : {data_dir()}")
    print(f"duckdb       : {default_duckdb_path()}")
    print(f"exports      : {data_dir() / 'exports'}")
    print(f"artifacts    : {data_dir() / 'artifacts'}")
    print(f"DAGSTER_HOME : {_ensure_dagster_home()}")
    return 0


def cmd_runs_clean(args: argparse.Namespace) -> int:
    _ensure_dagster_home()
    import dagster as dg

    from animind_assets.resources import default_duckdb_path, locked_duckdb, recover_exports
    from animind_assets.run_health import release_dead_runs

    with dg.DagsterInstance.get() as instance:
        out = release_dead_runs(instance, quiet_s=args.quiet_seconds, log=print)
    db = default_duckdb_path()
    rec = {"published": 0, "discarded": 0}
    if Path(db).exists():
        with locked_duckdb(db) as conn:
            rec = recover_exports(conn, db, log=print)
    print(
        f"[animind] {len(out['failed'])} dead run(s) marked failed; slots of {len(out['slots_freed'])} ended run(s) "
        f"freed; interrupted exports: {rec['published']} published, {rec['discarded']} discarded"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="animind", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="observe sources and materialize the asset graph")
    demo.add_argument("--select", default=None, help="asset selections separated by spaces/commas, e.g. 'anime_prep+' (default: every unpartitioned asset)")
    demo.add_argument("--verbose", "-v", action="store_true", help="print Dagster's event log (DEBUG) instead of one line per step")
    demo.set_defaults(func=cmd_demo)
    paths = sub.add_parser("paths", help="print where data and the Dagster instance live")
    paths.set_defaults(func=cmd_paths)
    runs = sub.add_parser("runs", help="run housekeeping")
    runs_sub = runs.add_subparsers(dest="runs_cmd", required=True)
    clean = runs_sub.add_parser("clean", help="fail runs whose processes died, free their pool slots, recover exports")
    clean.add_argument("--quiet-seconds", type=float, default=60.0,
                       help="a run must also have written no event for this long (default 60)")
    clean.set_defaults(func=cmd_runs_clean)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - a settings-file error is one line unless --verbose
        settings_error = _settings_error(exc)
        if settings_error is None or getattr(args, "verbose", False):
            raise
        print(f"[animind] settings error: {settings_error}", file=sys.stderr)
        return 1


def _settings_error(exc: BaseException):
    """The ``SettingsError`` in ``exc``'s cause/context chain (Dagster wraps import-time errors), else None."""
    from animind_assets.settings import SettingsError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SettingsError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
