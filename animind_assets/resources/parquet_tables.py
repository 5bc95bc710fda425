"""Multi-pod table backend: Parquet datasets on an fsspec path (no shared file lock), atomic per-partition
commits; selected with ``ANIMIND_TABLE_BACKEND=parquet``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import dagster as dg
import duckdb
from dagster._core.storage.upath_io_manager import UPathIOManager
from pydantic import Field

from animind_assets.lib.common.faults import crash_point
from animind_assets.lib.common.storage import as_path
from animind_assets.resources.duckdb_io import (
    _PENDING_EXPORTS,
    AniMindDuckDBIOManager,
    DuckDBWarehouse,
    _asset_name,
    _sweep_orphan_staged,
    check_output_rows,
    publish_exports,
)
from animind_assets.resources.paths import data_dir, default_duckdb_path

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
