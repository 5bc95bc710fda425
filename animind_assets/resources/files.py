"""File artifacts (local folder or fsspec URL) and the Parquet exports of every table."""

from __future__ import annotations

import os

import dagster as dg
from pydantic import Field

from animind_assets.lib.common.storage import ArtifactStore
from animind_assets.resources.duckdb_io import _PENDING_EXPORTS, _remove
from animind_assets.resources.paths import data_dir

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
