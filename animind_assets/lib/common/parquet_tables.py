"""Parquet tables on any fsspec path that many processes / pods may write at once, with no lock.

The multi-pod alternative to the embedded DuckDB file (one writer per file, a file lock that NFS does
not honour reliably). Layout under ``root`` (a local folder or an ``s3://bucket/prefix`` URL)::

    <root>/<table>/_manifest.json                      unpartitioned table: the committed version
    <root>/<table>/data-<uuid>.parquet                 its data object(s)
    <root>/<table>/<partition>/_manifest.json          one partition of a partitioned table
    <root>/<table>/<partition>/data-<uuid>.parquet

Commit protocol (per table or per partition, the unit one Dagster step writes):

1. the frame is written to a *new* object ``data-<uuid>.parquet`` (never overwritten, never visible
   to readers on its own: readers only open the files a manifest names);
2. the commit is the replacement of the small ``_manifest.json`` (rows, columns, schema, files, size,
   writer, time): ``os.replace`` of a temp file on a local/NFS folder, a single-object PUT on S3-type
   stores (both atomic for readers: they see the old manifest or the new one, never a mix);
3. the data files of the previous version are deleted afterwards (best effort; a reader that raced
   the deletion re-reads the manifest once).

Two writers of *different* partitions touch disjoint objects, so they never conflict; two writers of
the *same* partition both produce complete versions and the last commit wins (as the DuckDB backend's
replace does). A writer killed at any point leaves either the old version or the new one published,
plus at worst an orphan data object that ``vacuum`` removes.

Only ``fsspec`` / ``universal-pathlib`` / ``polars`` / ``pyarrow``: no Dagster here.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import polars as pl
from upath import UPath

MANIFEST = "_manifest.json"
FORMAT_VERSION = 1


class TableNotFoundError(FileNotFoundError):
    """No committed version of the table / partition at the path (never written, or only orphans)."""


class CorruptManifestError(RuntimeError):
    """A manifest that does not parse or names files that are not there (the path is in the message)."""


@dataclass
class Manifest:
    """The committed version of one table or partition.

    ``files``: data object names relative to the manifest's folder; ``num_rows``: rows over all files;
    ``columns``: ``{name: polars dtype string}``; ``size_bytes``: total bytes of the data objects.
    """

    files: list[str]
    num_rows: int
    columns: dict[str, str]
    size_bytes: int
    written_at: str
    writer: str
    partition: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise CorruptManifestError(f"{where}: unreadable table manifest ({exc})") from exc


def partition_dir_name(partition_key: str) -> str:
    """A partition key as one safe path segment: ``/``, ``|``, ``%`` and the like percent-encoded, and a
    leading ``.`` / ``_`` too (so ``..`` cannot climb and no key collides with ``_manifest.json`` or
    hidden temp files). ``unquote`` gives the key back."""
    if not partition_key:
        raise ValueError("empty partition key")
    name = quote(partition_key, safe="=-_.,:+@")
    if name[0] in "._":
        name = f"%{ord(name[0]):02X}{name[1:]}"
    return name


def _is_local(path: UPath) -> bool:
    return (getattr(path, "protocol", "") or "") in ("", "file", "local")


def _writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ParquetTableStore:
    """Read / write / list Parquet tables under ``root`` with atomic per-table / per-partition commits.

    Args:
        root: local folder or fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file:///...``).
        storage_options: fsspec options for remote roots (e.g. ``{"endpoint_url": ...}`` for an
            S3-compatible server). Credentials belong in the environment / instance role, not here.

    Raises (on read): ``TableNotFoundError`` when no version was committed; ``CorruptManifestError``
    when the manifest cannot be read or names missing files (both name the path).
    """

    def __init__(self, root: str | os.PathLike, storage_options: dict | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        root_path = UPath(str(root), **self.storage_options)
        if _is_local(root_path):
            root_path = UPath(os.path.abspath(root_path.path))
        self.root = root_path

    # -- paths ---------------------------------------------------------------------------------
    def table_path(self, table: str | tuple[str, ...] | list[str]) -> UPath:
        parts = (table,) if isinstance(table, str) else tuple(table)
        return self.root.joinpath(*parts)

    def location(self, table, partition: str | None = None) -> UPath:
        """Folder holding the manifest of ``table`` (or of one of its partitions)."""
        path = self.table_path(table)
        return path / partition_dir_name(partition) if partition is not None else path

    # -- write ---------------------------------------------------------------------------------
    def write(self, location: UPath, df: pl.DataFrame, partition: str | None = None, extra: dict | None = None) -> Manifest:
        """Publish ``df`` as the new version at ``location`` (a folder; see ``location``).

        The data object is written first under a fresh name, then the manifest is replaced in one
        atomic step, then the previous version's data objects are removed. Returns the manifest.
        """
        if not isinstance(df, pl.DataFrame):
            raise TypeError(f"{location}: expected a polars DataFrame, got {type(df).__name__}")
        fs = location.fs
        previous = self._read_manifest_or_none(location)
        name = f"data-{uuid.uuid4().hex}.parquet"
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd", statistics=True)
        payload = buf.getvalue()
        if _is_local(location):
            folder = Path(location.path)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / name)
        else:
            fs.pipe_file((location / name).path, payload)
        manifest = Manifest(
            files=[name],
            num_rows=df.height,
            columns={c: str(t) for c, t in df.schema.items()},
            size_bytes=len(payload),
            written_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            writer=_writer_id(),
            partition=partition,
            extra=dict(extra or {}),
        )
        self._commit_manifest(location, manifest)
        if previous is not None:
            for old in previous.files:
                if old not in manifest.files:
                    try:
                        (location / old).unlink()
                    except FileNotFoundError:
                        pass
        return manifest

    def _commit_manifest(self, location: UPath, manifest: Manifest) -> None:
        text = manifest.to_json().encode("utf-8")
        if _is_local(location):
            folder = Path(location.path)
            tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / MANIFEST)
        else:
            location.fs.pipe_file((location / MANIFEST).path, text)

    # -- read ----------------------------------------------------------------------------------
    def _read_manifest_or_none(self, location: UPath) -> Manifest | None:
        path = location / MANIFEST
        try:
            # one GET (cat_file), not HEAD + ranged GETs: an object store may replace the manifest in
            # between (s3fs then raises FileExpired for the changed ETag)
            text = location.fs.cat_file(path.path).decode("utf-8")
        except FileNotFoundError:
            return None
        return Manifest.from_json(text, str(path))

    def manifest(self, location: UPath) -> Manifest:
        found = self._read_manifest_or_none(location)
        if found is None:
            raise TableNotFoundError(f"{location}: no committed table version ({MANIFEST} missing)")
        return found

    def exists(self, location: UPath) -> bool:
        return (location / MANIFEST).exists()

    def read(self, location: UPath, columns: list[str] | None = None) -> pl.DataFrame:
        """The committed version at ``location`` as a polars DataFrame (``columns`` to project).

        A data object that vanishes between the manifest read and the data read means a writer published a
        newer version meanwhile (and removed the old objects): the read starts again from the new manifest,
        as long as the manifest keeps changing (up to 50 times, with a short back-off). A manifest that names
        a missing object and does not change is a broken table: ``CorruptManifestError``."""
        manifest = self.manifest(location)
        for attempt in range(50):
            try:
                frames = [
                    pl.read_parquet(io.BytesIO(location.fs.cat_file((location / name).path)), columns=columns)
                    for name in manifest.files
                ]
                break
            except FileNotFoundError as exc:
                newer = self.manifest(location)
                if newer.files == manifest.files:  # unchanged and still naming a missing object: not a race
                    raise CorruptManifestError(f"{location}: manifest names a missing data file ({exc})") from exc
                manifest = newer  # a writer replaced the version meanwhile: read the new one
                time.sleep(min(0.5, 0.01 * 2 ** attempt))
        else:
            raise CorruptManifestError(f"{location}: the version changed under 50 consecutive reads; retry later")
        df = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
        if df.height != manifest.num_rows:
            raise CorruptManifestError(f"{location}: {df.height} rows read, manifest says {manifest.num_rows}")
        return df

    def partitions(self, table) -> dict[str, UPath]:
        """Committed partitions of ``table``: ``{partition_key: folder}`` (sorted by key)."""
        base = self.table_path(table)
        if not base.exists():
            return {}
        found = {}
        for child in base.iterdir():
            if child.name.startswith((".", "_")) or (child.name.startswith("data-") and child.name.endswith(".parquet")):
                continue  # temp files, the table's own manifest, its unpartitioned data objects
            if (child / MANIFEST).exists():
                found[unquote(child.name)] = child
        return dict(sorted(found.items()))

    def read_partitions(self, table, keys: list[str] | None = None) -> pl.DataFrame:
        """Union of the committed partitions of ``table`` (all, or ``keys``; a missing key raises)."""
        available = self.partitions(table)
        wanted = list(available) if keys is None else list(keys)
        missing = [k for k in wanted if k not in available]
        if missing:
            raise TableNotFoundError(f"{self.table_path(table)}: partitions not committed: {missing[:10]}")
        if not wanted:
            raise TableNotFoundError(f"{self.table_path(table)}: no committed partition")
        return pl.concat([self.read(available[k]) for k in wanted], how="vertical")

    def read_table(self, table) -> pl.DataFrame:
        """The whole table: the unpartitioned version when committed, else the union of its partitions."""
        location = self.location(table)
        if self.exists(location):
            return self.read(location)
        return self.read_partitions(table)

    def table_exists(self, table) -> bool:
        return self.exists(self.location(table)) or bool(self.partitions(table))

    # -- maintenance ---------------------------------------------------------------------------
    def vacuum(self, location: UPath, older_than_s: float = 3600.0) -> list[str]:
        """Delete data objects at ``location`` that no manifest names, and temporary manifests
        (``._manifest.json.<hex>.tmp``), older than ``older_than_s`` (orphans of killed writers; young
        ones may belong to a write in progress). Returns the removed names."""
        manifest = self._read_manifest_or_none(location)
        keep = set(manifest.files) if manifest else set()
        now = _dt.datetime.now(_dt.timezone.utc).timestamp()
        removed = []
        if not location.exists():
            return removed
        for child in location.iterdir():
            name = child.name
            orphan_manifest = name.startswith(f".{MANIFEST}.") and name.endswith(".tmp")
            if not (name.startswith("data-") or name.startswith(".data-") or orphan_manifest) or name in keep:
                continue
            info = child.fs.info(child.path)
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            if mtime is not None and now - float(mtime) < older_than_s:
                continue
            child.unlink()
            removed.append(name)
        return removed
