"""DuckDB tables (polars) under an inter-process file lock: the IO manager (row-count guard, table and
Parquet export committed together, crash recovery) and the warehouse reader."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
from dagster._utils.backoff import backoff
from dagster_duckdb.io_manager import DuckDbClient
from dagster_duckdb_polars import DuckDBPolarsIOManager
from dagster._core.storage.db_io_manager import DbIOManager
from filelock import FileLock
from pydantic import Field

from animind_assets.lib.common.faults import crash_point
from animind_assets.lib.common.storage import as_path, sweep_stale_temps
from animind_assets.resources.paths import default_duckdb_path

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
