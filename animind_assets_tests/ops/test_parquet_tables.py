"""Multi-pod table backend: Parquet datasets with atomic per-partition commits (lib/common/parquet_tables.py,
``ParquetTablesIOManager`` / ``ParquetWarehouse`` in resources.py).

Concurrency is tested with real processes: two writers of different partitions of one table started
at the same instant (a barrier), each committing many versions while a third process keeps reading;
on a local folder and on an S3-compatible server (moto's server mode on 127.0.0.1). A writer killed
with SIGKILL mid-write leaves the previous version readable.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from animind_assets.lib.common.parquet_tables import (
    MANIFEST,
    CorruptManifestError,
    ParquetTableStore,
    TableNotFoundError,
    partition_dir_name,
)

warnings.filterwarnings("ignore", category=getattr(dg, "BetaWarning", Warning))

from animind_assets_tests.parquet_workers import ROUNDS, ROWS, check_version as _check_version, frame as _frame, reader, writer


def _run_concurrent_writers(root: str, options: dict, rounds: int = ROUNDS) -> None:
    """Two writer processes (partitions shard=0 / shard=1 of one table) and one reader process start
    at one barrier; the reader checks every version it sees is whole; then the final state is checked."""
    ctx = mp.get_context("spawn")
    parts = ["shard=0", "shard=1"]
    barrier = ctx.Barrier(3)
    stop = ctx.Event()
    errors = ctx.Queue()
    writers = [ctx.Process(target=writer, args=(root, options, "anime_embeddings", p, barrier, rounds)) for p in parts]
    reader_proc = ctx.Process(target=reader, args=(root, options, "anime_embeddings", parts, barrier, stop, errors))
    for proc in [*writers, reader_proc]:
        proc.start()
    for proc in writers:
        proc.join(timeout=300)
        assert proc.exitcode == 0, f"writer exit code {proc.exitcode}"
    stop.set()
    reader_proc.join(timeout=60)
    assert errors.empty(), errors.get()
    assert reader_proc.exitcode == 0

    store = ParquetTableStore(root, options)
    assert list(store.partitions("anime_embeddings")) == parts
    for p in parts:
        assert _check_version(store.read(store.location("anime_embeddings", p)), p) == rounds - 1
        manifest = store.manifest(store.location("anime_embeddings", p))
        assert manifest.num_rows == ROWS and manifest.partition == p and len(manifest.files) == 1
        # the versions replaced along the way were removed: one data object per partition remains
        names = [c.name for c in store.location("anime_embeddings", p).iterdir()]
        assert sorted(names) == sorted([MANIFEST, *manifest.files]), names
    union = store.read_partitions("anime_embeddings")
    assert union.height == 2 * ROWS and sorted(union["shard"].unique().to_list()) == parts


# -- library ---------------------------------------------------------------------------------------
def test_write_read_replace_and_layout(tmp_path):
    store = ParquetTableStore(tmp_path / "tables")
    loc = store.location("anime_prep")
    with pytest.raises(TableNotFoundError, match="anime_prep"):
        store.read(loc)
    first = store.write(loc, _frame("all", 0, 100))
    assert _check_version_small(store.read(loc)) == 0
    second = store.write(loc, _frame("all", 1, 100))
    assert store.read(loc)["round"].unique().to_list() == [1]
    assert not (Path(loc.path) / first.files[0]).exists(), "the replaced version's data object is removed"
    assert (Path(loc.path) / second.files[0]).exists()
    assert second.columns == {"item_id": "Int64", "shard": "String", "round": "Int32", "vec": "List(Float32)"}
    assert store.read_table("anime_prep").height == 100
    assert store.read(loc, columns=["item_id"]).columns == ["item_id"]
    # partition keys become one safe path segment and come back unchanged
    keys = ("2024-01-01", "a/b", "..", "x|y", "_manifest.json", ".hidden", "100%")
    for key in keys:
        store.write(store.location("parts", key), _frame(key, 0, 10), partition=key)
    assert set(store.partitions("parts")) == set(keys)
    assert partition_dir_name("..") not in ("..", ".") and "/" not in partition_dir_name("a/b")
    assert not partition_dir_name("_manifest.json").startswith("_")
    assert store.read_partitions("parts", ["a/b", "x|y"]).height == 20
    with pytest.raises(TableNotFoundError, match="not committed"):
        store.read_partitions("parts", ["nope"])
    with pytest.raises(TypeError, match="polars DataFrame"):
        store.write(loc, {"a": [1]})


def _check_version_small(df: pl.DataFrame) -> int:
    rounds = df["round"].unique().to_list()
    assert len(rounds) == 1
    return rounds[0]


def test_failed_commit_keeps_previous_version_and_vacuum_removes_orphan(tmp_path, monkeypatch):
    store = ParquetTableStore(tmp_path)
    loc = store.location("semantic_ids")
    store.write(loc, _frame("all", 0, 50))

    def boom(*_a, **_k):
        raise OSError("disk full while committing")

    monkeypatch.setattr(store, "_commit_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write(loc, _frame("all", 1, 50))
    monkeypatch.undo()
    assert store.read(loc)["round"].unique().to_list() == [0], "the good version stays published"
    orphans = [p.name for p in Path(loc.path).glob("data-*.parquet") if p.name not in store.manifest(loc).files]
    assert len(orphans) == 1
    assert store.vacuum(loc, older_than_s=3600) == [], "a young orphan may be a write in progress"
    assert store.vacuum(loc, older_than_s=0) == orphans
    assert store.read(loc).height == 50


def test_corrupt_manifest_and_missing_file_are_named(tmp_path):
    store = ParquetTableStore(tmp_path)
    loc = store.location("t")
    m = store.write(loc, _frame("all", 0, 5))
    (Path(loc.path) / m.files[0]).unlink()
    with pytest.raises(CorruptManifestError, match="missing data file"):
        store.read(loc)
    (Path(loc.path) / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptManifestError, match=r"_manifest\.json"):
        store.read(loc)


def test_read_follows_versions_published_during_the_read(tmp_path, monkeypatch):
    """A writer that publishes a new version (removing the old data object) between the reader's manifest
    read and its data read, twice in a row, makes the reader follow to the newest version, not fail."""
    store = ParquetTableStore(tmp_path)
    loc = store.location("t")
    store.write(loc, _frame("all", 0, 5))
    fs_type = type(loc.fs)
    original = fs_type.cat_file
    rounds = iter([1, 2])

    def racing_cat_file(self, path, *args, **kwargs):
        if os.path.basename(str(path)).startswith("data-"):
            r = next(rounds, None)
            if r is not None:
                store.write(loc, _frame("all", r, 5))  # publishes round r, removes the object we are about to read
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(fs_type, "cat_file", racing_cat_file)
    df = store.read(loc)
    assert df.height == 5 and set(df["round"].to_list()) == {2}


_KILL_WRITER = """
import sys, polars as pl
from animind_assets.lib.common.parquet_tables import ParquetTableStore
store = ParquetTableStore(sys.argv[1]); loc = store.location("big")
r = 1
print("ready", flush=True)
while True:
    n = 400_000
    store.write(loc, pl.DataFrame({"round": pl.Series([r] * n, dtype=pl.Int32), "x": pl.arange(0, n, eager=True)}))
    r += 1
"""


def test_sigkill_mid_write_leaves_a_whole_version(tmp_path):
    """A writer killed with SIGKILL at arbitrary points: the table always reads as one whole version."""
    store = ParquetTableStore(tmp_path)
    loc = store.location("big")
    store.write(loc, pl.DataFrame({"round": pl.Series([0] * 400_000, dtype=pl.Int32), "x": pl.arange(0, 400_000, eager=True)}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for delay in (0.4, 0.9, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        df = store.read(loc)
        assert df.height == 400_000 and df["round"].n_unique() == 1
        assert df["x"].to_list()[:3] == [0, 1, 2]
    # a writer killed while writing its manifest leaves ._manifest.json.<hex>.tmp: vacuum removes it too
    (Path(loc.path) / f".{MANIFEST}.deadbeef.tmp").write_bytes(b"{")
    store.vacuum(loc, older_than_s=0)
    left = sorted(p.name for p in Path(loc.path).iterdir())
    assert left == sorted([MANIFEST, *store.manifest(loc).files]), left


def test_two_processes_write_different_partitions_local(tmp_path):
    _run_concurrent_writers(str(tmp_path / "tables"), {})


@pytest.fixture()
def s3_server(monkeypatch):
    """moto's S3-compatible server on 127.0.0.1 (a free port) with one bucket."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")
    pytest.importorskip("s3fs", reason="s3fs not installed")
    import boto3

    for var, value in {
        "AWS_ACCESS_KEY_ID": "animind-test",
        "AWS_SECRET_ACCESS_KEY": "animind-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(var, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="animind")
    yield endpoint
    server.stop()


def test_two_processes_write_different_partitions_s3(s3_server):
    _run_concurrent_writers("s3://animind/warehouse", {"endpoint_url": s3_server}, rounds=6)


# -- Dagster layer -----------------------------------------------------------------------------------
shards = dg.StaticPartitionsDefinition(["0", "1", "2", "3"])


@dg.asset(partitions_def=shards, code_version="1")
def sharded_table(context) -> pl.DataFrame:
    return _frame(f"shard={context.partition_key}", int(os.environ.get("ANIMIND_TEST_ROUND", "0")))


@dg.asset(code_version="1")
def union_of_shards(sharded_table: pl.DataFrame) -> pl.DataFrame:
    return sharded_table.group_by("shard").agg(pl.len().alias("rows"), pl.col("round").max()).sort("shard")


def _materialize_partition(root: str, partition: str, barrier, rounds: int) -> None:
    from animind_assets.resources import ParquetTablesIOManager

    barrier.wait(timeout=120)
    for r in range(rounds):
        os.environ["ANIMIND_TEST_ROUND"] = str(r)
        result = dg.materialize(
            [sharded_table], partition_key=partition, resources={"io_manager": ParquetTablesIOManager(root=root)},
            instance=dg.DagsterInstance.ephemeral(),
        )
        assert result.success


@pytest.mark.slow
def test_dagster_partitions_from_two_processes_then_union(tmp_path):
    """Two processes materialize different partitions of one asset at the same time through the IO
    manager; a downstream asset then loads all partitions as one frame."""
    from animind_assets.resources import ParquetTablesIOManager

    root = str(tmp_path / "tables")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_materialize_partition, args=(root, p, barrier, 2)) for p in ("0", "1")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    io = ParquetTablesIOManager(root=root)
    result = dg.materialize(
        [sharded_table, union_of_shards], partition_key="2", resources={"io_manager": io},
        selection=[sharded_table], instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    mat = result.asset_materializations_for_node("sharded_table")[0]
    assert mat.metadata["dagster/row_count"].value == ROWS
    assert mat.metadata["path"].value.endswith("sharded_table/2")
    # an unpartitioned downstream reads the committed partitions (missing ones are an error unless allowed)
    instance = dg.DagsterInstance.ephemeral()
    with pytest.raises(Exception, match="3"):
        dg.materialize([sharded_table, union_of_shards], resources={"io_manager": io}, selection=[union_of_shards], instance=instance)
    dg.materialize([sharded_table, union_of_shards], partition_key="3", resources={"io_manager": io}, selection=[sharded_table], instance=instance)
    result = dg.materialize([sharded_table, union_of_shards], resources={"io_manager": io}, selection=[union_of_shards], instance=instance)
    union = result.output_for_node("union_of_shards")
    assert union["shard"].to_list() == ["shard=0", "shard=1", "shard=2", "shard=3"]
    assert union["rows"].to_list() == [ROWS] * 4
    assert union["round"].to_list() == [1, 1, 0, 0]
    store = ParquetTableStore(root)
    assert set(store.partitions("sharded_table")) == {"0", "1", "2", "3"}
    assert store.read_table("union_of_shards").height == 4


def test_backend_selection_and_project_assets_on_parquet(animind_env, sqlite_path, monkeypatch):
    """ANIMIND_TABLE_BACKEND=parquet: the project's own anime_prep / user_interactions go through the
    Parquet backend and the warehouse resource reads them back."""
    from animind_assets import definitions as project
    from animind_assets.resources import (
        AniMindDuckDBIOManager,
        AnimeSource,
        ParquetTablesIOManager,
        ParquetWarehouse,
        table_resources,
    )

    assert isinstance(table_resources()["io_manager"], AniMindDuckDBIOManager), "DuckDB stays the default"
    monkeypatch.setenv("ANIMIND_TABLE_BACKEND", "lakehouse")
    with pytest.raises(ValueError, match="duckdb' or 'parquet"):
        table_resources()
    monkeypatch.setenv("ANIMIND_TABLE_BACKEND", "parquet")
    monkeypatch.setenv("ANIMIND_TABLE_STORAGE_OPTIONS", json.dumps({"secret": "x"}))
    with pytest.raises(ValueError, match="credential"):
        table_resources()
    monkeypatch.setenv("ANIMIND_TABLE_STORAGE_OPTIONS", json.dumps({"client_kwargs": {"region_name": "eu-west-1"}}))
    resources = project.build_resources(anime_source=AnimeSource(kind="sqlite", sqlite_path=str(sqlite_path)), mlflow_enabled=False)
    assert isinstance(resources["io_manager"], ParquetTablesIOManager)
    assert isinstance(resources["warehouse"], ParquetWarehouse)
    assert resources["io_manager"].root == str(animind_env / "tables")
    assert resources["io_manager"].storage_options == {"client_kwargs": {"region_name": "eu-west-1"}}
    monkeypatch.delenv("ANIMIND_TABLE_STORAGE_OPTIONS")
    resources = project.build_resources(anime_source=AnimeSource(kind="sqlite", sqlite_path=str(sqlite_path)), mlflow_enabled=False)

    result = dg.materialize(
        project.all_assets, resources=resources, selection=["anime_prep", "user_interactions"],
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    prep = resources["warehouse"].read_table("anime_prep")
    assert prep.equals(result.output_for_node("anime_prep"))
    assert resources["warehouse"].read_table("user_interactions").height == result.output_for_node("user_interactions").height
    assert resources["warehouse"].read_table("never_built") is None
    with resources["warehouse"].connect() as conn:
        assert conn.execute("select count(*) from anime_prep").fetchone()[0] == prep.height
    assert (animind_env / "tables" / "anime_prep" / MANIFEST).exists()
    assert not (animind_env / "animind.duckdb").exists(), "no DuckDB file in the Parquet mode"
