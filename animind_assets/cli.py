"""``animind`` command line: run the demo graph, observe sources, print where things are.

    animind demo                 observe the sources and materialize every asset (demo source by default)
    animind demo --select anime_prep+   any Dagster asset selection
    animind paths                print the data folder, DuckDB file, exports and DAGSTER_HOME
    animind runs clean           mark runs whose processes died as failed, free the pool slots they hold
                                 and finish/undo interrupted table+export writes

Runs use the project's persistent Dagster instance (``$DAGSTER_HOME``, default ``.dagster_home/`` in the
project root), so ``dagster dev`` afterwards shows the runs, lineage and metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _ensure_dagster_home() -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    home = _ensure_dagster_home()
    warnings.filterwarnings("ignore", category=UserWarning)
    import dagster as dg
    from dagster._core.definitions.observe import observe

    from animind_assets.definitions import defs

    instance = dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    t0 = time.perf_counter()
    sources = [a for a in defs.assets or [] if isinstance(a, dg.SourceAsset) and a.is_observable]
    if sources:
        print(f"[animind] observing {len(sources)} source(s) ...", flush=True)
        observe(sources, instance=instance, resources=defs.resources)
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
    if partitioned:
        print(f"[animind] skipping partitioned assets (launch partitions from the UI): {', '.join(partitioned)}")
    print(f"[animind] materializing {len(materializable)} assets into DAGSTER_HOME={home}", flush=True)
    job = defs.get_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance,
        asset_selection=materializable,
        raise_on_error=False,
        tags={"animind/trigger": "cli-demo"},
    )
    elapsed = time.perf_counter() - t0
    ok = result.success
    checks = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    failed_checks = [e for e in checks if not e.event_specific_data.passed]  # type: ignore[union-attr]
    print(
        f"[animind] run {result.run_id}: {'SUCCESS' if ok else 'FAILURE'}; "
        f"{len(result.get_asset_materialization_events())} materializations, "
        f"{len(checks)} checks ({len(failed_checks)} failed) in {elapsed:.1f}s",
        flush=True,
    )
    print("[animind] open the UI with:  dagster dev   (then http://127.0.0.1:3000)")
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
