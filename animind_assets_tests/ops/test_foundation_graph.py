"""In-process materialization of the foundation graph on a small fixture, storage behaviour."""

from __future__ import annotations

import multiprocessing as mp
import warnings

import dagster as dg
import polars as pl
import pytest

warnings.filterwarnings("ignore", category=dg.BetaWarning) if hasattr(dg, "BetaWarning") else None


def _resources(source):
    from animind_assets.definitions import build_resources

    return build_resources(anime_source=source, mlflow_enabled=False)


def test_materialize_foundation_from_sqlite_fixture(animind_env, sqlite_path):
    from animind_assets.defs.sources.anime_catalog_source import anime_catalog_source
    from animind_assets.defs.prep.anime_prep import anime_prep, anime_prep_is_valid
    from animind_assets.defs.prep.user_interactions import user_interactions
    from animind_assets.resources import AnimeSource

    source = AnimeSource(kind="sqlite", sqlite_path=str(sqlite_path))
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [anime_catalog_source, anime_prep, user_interactions, anime_prep_is_valid],
        resources=_resources(source),
        instance=instance,
        selection=["anime_prep", "user_interactions"],
    )
    assert result.success
    mats = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert mats["anime_prep"]["dagster/row_count"].value == 5
    assert mats["anime_prep"]["dropped_rows"].value == 3
    assert mats["user_interactions"]["dagster/row_count"].value == 6
    assert mats["user_interactions"]["quarantined_rows"].value == 6
    assert "data:image/png;base64" in mats["anime_prep"]["top_genres"].value
    assert "dagster/column_schema" in mats["anime_prep"]
    # tables in DuckDB, Parquet exports and quarantine files on disk
    from animind_assets.resources import DuckDBWarehouse, default_duckdb_path

    wh = DuckDBWarehouse(database=default_duckdb_path(), schema="main")
    table = wh.read_table("anime_prep")
    assert table.height == 5 and table["genres"].dtype == pl.List(pl.Utf8)
    assert (animind_env / "exports" / "anime_prep.parquet").exists()
    q = pl.read_parquet(animind_env / "exports" / "quarantine" / "user_interactions.parquet")
    assert q.height == 6 and set(q["reason"]) >= {"unknown_anime", "duplicate_user_anime"}
    checks = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert checks and all(e.event_specific_data.passed for e in checks)
    # metadata that tells the truth: every column described, the plot also inline (< 1,000 chars), floats rounded
    schema = mats["anime_prep"]["dagster/column_schema"].value
    assert all(c.description for c in schema.columns), [c.name for c in schema.columns if not c.description]
    assert "rows" not in mats["anime_prep"] and "anime" not in mats["user_interactions"]
    inline = mats["anime_prep"]["top_genres_inline"].value
    assert inline.startswith("![") and "data:image/svg+xml;base64," in inline and len(inline) < 1000
    assert mats["anime_prep"]["filters"].value.startswith("include_adult=False")
    assert mats["anime_prep"]["limit"].value == "none"
    assert mats["anime_prep"]["source_rows"].value == mats["anime_prep"]["input_rows"].value == 8
    assert mats["user_interactions"]["scored_fraction"].value == round(mats["user_interactions"]["scored_fraction"].value, 4)

    # a configured limit is shown with its effect: 8 source rows, stop after 2 kept rows
    limited = dg.materialize(
        [anime_catalog_source, anime_prep],
        resources=_resources(source),
        instance=instance,
        selection=["anime_prep"],
        run_config={"ops": {"anime_prep": {"config": {"limit": 2}}}},
    )
    md = limited.asset_materializations_for_node("anime_prep")[0].metadata
    assert md["dagster/row_count"].value == 2 and md["limit"].value == 2 and md["source_rows"].value == 8
    assert md["input_rows"].value < 8
    assert "limit 2 -> 2 rows" in md["filters"].value and "of 8 source rows" in md["filters"].value
    assert "limit 2 (config)" in md["row_flow"].value


def test_source_fingerprint_changes_with_content(sqlite_path):
    import sqlite3

    from animind_assets.resources import AnimeSource

    src = AnimeSource(kind="sqlite", sqlite_path=str(sqlite_path))
    fp1 = src.read_catalog().fingerprint()
    assert src.read_catalog().fingerprint() == fp1
    conn = sqlite3.connect(sqlite_path)
    conn.execute("UPDATE anime SET name = 'Cowboy Bebop!' WHERE anime_id = 1")
    conn.commit()
    conn.close()
    assert src.read_catalog().fingerprint() != fp1


def test_bad_source_config_is_a_clear_error():
    from animind_assets.resources import AnimeSource

    with pytest.raises(ValueError, match="sqlite_path"):
        AnimeSource(kind="sqlite").read_catalog()
    with pytest.raises(ValueError, match="demo, sqlite or kaggle_csv"):
        AnimeSource(kind="parquet").read_catalog()


def _writer(db: str, worker: int, n: int) -> None:
    from animind_assets.resources import locked_duckdb

    for i in range(n):
        with locked_duckdb(db) as conn:
            conn.execute("create table if not exists t (worker int, i int)")
            conn.execute("insert into t values (?, ?)", [worker, i])


@pytest.mark.slow
def test_concurrent_processes_share_the_duckdb_file(tmp_path):
    db = str(tmp_path / "x.duckdb")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db, w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    from animind_assets.resources import locked_duckdb

    with locked_duckdb(db) as conn:
        assert conn.execute("select count(*) from t").fetchone()[0] == 45


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    from animind_assets.lib.common.storage import ArtifactStore

    store = ArtifactStore(tmp_path / "artifacts")
    store.write_json({"a": 1}, "m", "ok.json")
    with pytest.raises(RuntimeError):
        with store.atomic_file("m", "ok.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert store.read_json("m", "ok.json") == {"a": 1}
    with pytest.raises(RuntimeError):
        with store.atomic_dir("model") as d:
            (d / "weights.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not store.path("model").exists()
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["m"]
    assert [p.name for p in (tmp_path / "artifacts" / "m").iterdir()] == ["ok.json"]


def test_artifact_store_accepts_fsspec_urls():
    from animind_assets.lib.common.storage import ArtifactStore

    store = ArtifactStore("memory://bucket/animind")
    store.write_json({"k": [1, 2]}, "semantic_ids", "special_tokens.json")
    assert store.read_json("semantic_ids", "special_tokens.json") == {"k": [1, 2]}
    with store.atomic_dir("model") as d:
        (d / "config.json").write_text("{}")
    assert store.exists("model", "config.json")


def test_definitions_load_and_every_asset_has_code_version():
    from animind_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"anime_catalog_source", "watchlist_source", "anime_prep", "user_interactions"} <= keys
    for key in graph.materializable_asset_keys:
        assert graph.get(key).code_version, f"{key.to_user_string()} has no code_version"


def test_cli_demo_is_quiet_one_line_per_step(tmp_path):
    """`animind demo` (a real subprocess on a fresh DAGSTER_HOME, the foundation group on a SQLite source)
    prints one line per step (start time, seconds, rows, check results) and the summary; no Dagster
    DEBUG events and no beta warnings. The settings file's limit shows up in the rows."""
    import os
    import sys
    from pathlib import Path

    from animind_assets_tests.conftest import add_synthetic_anime, write_sqlite

    db = write_sqlite(tmp_path / "src.sqlite")
    add_synthetic_anime(db, 40)
    settings = tmp_path / "animind.yaml"
    settings.write_text("anime_prep:\n  limit: 30\n")
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "ANIMIND_DATA_DIR": str(tmp_path / "data"),
        "ANIMIND_SOURCE": "sqlite",
        "ANIMIND_SQLITE_PATH": str(db),
        "ANIMIND_SETTINGS": str(settings),
        "DAGSTER_DISABLE_TELEMETRY": "yes",
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    out, err, returncode = run_cli_to_files(
        [sys.executable, "-m", "animind_assets.cli", "demo", "--select", "group:prep"], root, env, tmp_path
    )
    assert returncode == 0, f"{out}\n{err[-3000:]}"
    lines = out.strip().splitlines()
    assert len(lines) == 2 + 3 + 2, out  # observe + plan, one line per step (3), summary + UI hint
    assert all(line.startswith("[animind] ") for line in lines), out
    assert any("[1/3] anime_prep: started" in line and "30 rows" in line for line in lines), out
    assert any("check anime_prep:anime_prep_is_valid: started" in line and "anime_prep_is_valid passed" in line for line in lines), out
    assert "SUCCESS; 2 materializations, 1 checks (0 failed)" in out
    for noise in ("DEBUG", "STEP_START", "BetaWarning", "PreviewWarning"):
        assert noise not in out and noise not in err, f"{noise} printed:\n{out}\n{err[-3000:]}"


def run_cli_to_files(cmd: list[str], cwd, env: dict, tmp_path, timeout: float = 600) -> tuple[str, str, int]:
    """Run the CLI in its own session with stdout/stderr in files, then kill whatever it left behind.

    Pipes would tie the test to every process that inherited them: Dagster's compute-log capture starts
    ``tail -F`` children, and a CLI that died without closing its capture would leave them holding the pipe,
    so ``communicate`` would wait for its whole timeout. Files return as soon as the CLI exits."""
    import os
    import signal
    import subprocess

    out_p, err_p = tmp_path / "cli.out", tmp_path / "cli.err"
    with out_p.open("w") as fo, err_p.open("w") as fe:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fo, stderr=fe, text=True, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # leftover children (compute-log tails), if any
            except ProcessLookupError:
                pass
    return out_p.read_text(), err_p.read_text(), returncode


CHATTY_DRIVER = """
# A step that talks like the ML libraries do during the demo's embedding/fine-tune steps: a FutureWarning
# attributed to a library module, a UserWarning, a tqdm bar, INFO/WARNING log lines of transformers/mlflow,
# and one ERROR log line (a real error, which must stay visible). anime_prep calls it (patched into the
# library function before the asset module imports it); the real anime_embeddings step adds the
# transformers "Loading weights" bar of the offline MiniLM.
import logging
import sys
import warnings

import animind_assets.lib.data.prep as prep

_clean = prep.clean_anime


def chatty_clean_anime(*args, **kwargs):
    from tqdm import tqdm

    for _ in tqdm(range(50), desc="Map"):
        pass
    warnings.warn_explicit("`foo` is deprecated and will be removed in v5", FutureWarning, "transformers/trainer.py", 1, module="transformers.trainer")
    warnings.warn("padding side is right; use left for generation", UserWarning)
    logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("transformers").error("REAL-ERROR-LINE from a library")
    return _clean(*args, **kwargs)


prep.clean_anime = chatty_clean_anime
from animind_assets.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_cli_demo_hides_library_chatter(tmp_path):
    """Quiet `animind demo` on anime_prep (which here also emits library warnings, a tqdm bar and library
    log lines) and the real anime_embeddings (the offline MiniLM: transformers' "Loading weights" bar):
    stdout is one line per step plus the summary, stderr holds no progress bar, no FutureWarning/
    UserWarning, no library INFO/WARNING line and no Dagster notice; the library ERROR line still shows;
    the summary names the file holding the hidden warnings. With --verbose the warnings come back."""
    import os
    import sys
    from pathlib import Path

    from animind_assets_tests.conftest import add_synthetic_anime, write_sqlite

    db = write_sqlite(tmp_path / "src.sqlite")
    add_synthetic_anime(db, 20)
    settings = tmp_path / "animind.yaml"
    settings.write_text("anime_prep:\n  limit: 12\n")
    driver = tmp_path / "driver.py"
    driver.write_text(CHATTY_DRIVER)
    root = Path(__file__).resolve().parents[2]
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("TQDM_", "HF_HUB_DISABLE", "HF_DATASETS_DISABLE", "TRANSFORMERS_VERBOSITY", "MLFLOW_LOGGING"))
    }
    env.update({
        "ANIMIND_SOURCE": "sqlite",
        "ANIMIND_SQLITE_PATH": str(db),
        "ANIMIND_SETTINGS": str(settings),
        "DAGSTER_DISABLE_TELEMETRY": "yes",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    })

    def demo(*extra):
        tag = "verbose" if extra else "quiet"  # fresh folders: the embedding model is loaded in both runs
        run_env = {**env, "DAGSTER_HOME": str(tmp_path / f"home_{tag}"), "ANIMIND_DATA_DIR": str(tmp_path / f"data_{tag}")}
        run_dir = tmp_path / f"cli_{tag}"
        run_dir.mkdir()
        stdout, stderr, code = run_cli_to_files(
            [sys.executable, str(driver), "demo", "--select", "anime_prep anime_embeddings", *extra], root, run_env, run_dir, 900
        )
        assert code == 0, f"{stdout}\n{stderr[-3000:]}"
        return stdout, stderr

    out, err = demo()
    lines = out.strip().splitlines()
    steps = [line for line in lines if line.startswith("[animind] [")]
    assert len(steps) == len({line.split("]")[1] for line in steps}) >= 2, out
    assert len(lines) == 2 + len(steps) + 2, out  # observe + plan, one line per step, summary + UI hint
    assert any("anime_embeddings: started" in line and "12 rows" in line for line in steps), out
    for noise in ("it/s]", "Loading weights", "Map:", "FutureWarning", "UserWarning", "Some weights were not",
                  "MLflow database", "BetaWarning", "PreviewWarning", "DEBUG"):
        assert noise not in out and noise not in err, f"{noise!r} leaked:\nSTDOUT\n{out}\nSTDERR\n{err[-4000:]}"
    assert "REAL-ERROR-LINE from a library" in err, f"library errors must stay visible:\n{err[-3000:]}"
    summary = next(line for line in lines if "SUCCESS" in line)
    assert "library warning(s) hidden: " in summary, summary
    hidden_file = Path(summary.split("hidden: ")[1].split(" (--verbose")[0])
    hidden = hidden_file.read_text()
    assert "is deprecated and will be removed in v5" in hidden and "padding side is right" in hidden, hidden

    out_v, err_v = demo("--verbose")
    assert "FutureWarning" in err_v and "padding side is right" in err_v, err_v[-3000:]
    assert "Loading weights" in err_v, err_v[-3000:]


def test_known_dagster_notices_stay_silenced_after_the_definitions_load(tmp_path):
    """A process that loads the code location (code server, run and step workers) ignores Dagster's beta
    notices afterwards, e.g. ``Output(data_version=...)`` in semantic_ids: load_from_defs_folder imports the
    asset modules inside a catch_warnings block that used to drop the filter (the server log showed the
    notice once per semantic_ids step). Other warnings still show."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = (
        "import warnings\n"
        "import animind_assets.definitions\n"
        "import dagster as dg\n"
        "dg.Output(1, data_version=dg.DataVersion('x'))\n"
        "warnings.warn('a real warning', UserWarning)\n"
    )
    env = {**os.environ, "ANIMIND_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path),
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BetaWarning" not in proc.stderr and "PreviewWarning" not in proc.stderr, proc.stderr[-3000:]
    assert "UserWarning: a real warning" in proc.stderr, proc.stderr[-3000:]


def test_cli_settings_error_is_one_line(tmp_path):
    """A bad settings file (unknown key, or a missing file named by $ANIMIND_SETTINGS) makes `animind demo` print
    one line naming the file and the key and exit 1, not Dagster's chained import tracebacks (newcomer finding)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    typo = tmp_path / "typo.yaml"
    typo.write_text("anime_prep:\n  limitt: 150\n")
    for settings, expected in ((typo, "anime_prep.limitt"), (tmp_path / "missing.yaml", "does not exist")):
        env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "ANIMIND_DATA_DIR": str(tmp_path / "data"),
               "ANIMIND_SETTINGS": str(settings)}
        proc = subprocess.run([sys.executable, "-m", "animind_assets.cli", "demo", "--select", "anime_prep"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert proc.returncode == 1, proc
        assert len(lines) == 1 and lines[0].startswith("[animind] settings error:"), lines
        assert str(settings) in lines[0] and expected in lines[0], lines


def test_cli_failed_step_names_the_file_and_counts_the_steps_not_run(tmp_path):
    """Shared case e13 (every anime adult-rated) through `animind demo`: the failed step's line names the file
    and the table, nothing is written, and the summary says how many planned steps did not run."""
    import os
    import sys
    from pathlib import Path

    from animind_assets_tests.conftest import shared_cases

    case = shared_cases() / "sqlite" / "e13_all_excluded.sqlite"
    if not case.exists():
        pytest.skip(f"shared case {case} absent")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "ANIMIND_DATA_DIR": str(tmp_path / "data"),
           "ANIMIND_SOURCE": "sqlite", "ANIMIND_SQLITE_PATH": str(case)}
    out, err, code = run_cli_to_files(
        [sys.executable, "-m", "animind_assets.cli", "demo", "--select", "anime_prep user_interactions"], root, env, tmp_path
    )
    assert code == 1, (out, err)
    failed = [line for line in out.splitlines() if "anime_prep: FAILED" in line]
    assert failed and "0 of 5 rows kept (adult_excluded 5)" in failed[0] and str(case) in failed[0], out
    assert "(table anime)" in failed[0] and "nothing was written" in failed[0], out
    assert "2 of 3 planned steps not run" in out, out


def test_cli_progress_survives_a_failed_event_log_read():
    """The CLI's step lines read the event log while the run thread writes it; a failed read (SQLite
    'database is locked' on a loaded machine) must not end the CLI (which would orphan the run thread and
    its compute-log children): the poll is skipped, counted, and the next one catches up from the same cursor."""
    from types import SimpleNamespace

    from animind_assets.cli import StepProgress

    calls = {"n": 0}

    class FlakyInstance:
        def get_records_for_run(self, run_id, cursor=None, of_type=None, limit=None):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("database is locked")
            assert cursor is None  # the failed read did not move the cursor
            return SimpleNamespace(records=[], cursor="c1", has_more=False)

    lines: list[str] = []
    progress = StepProgress(FlakyInstance(), "run-1", total=2, out=lines.append)
    progress.poll()  # must not raise
    assert progress.poll_errors == 1 and "database is locked" in progress.last_poll_error
    progress.poll()
    assert progress.cursor == "c1" and calls["n"] == 2
