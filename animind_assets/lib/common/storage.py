"""File-artifact storage: local paths by default, any fsspec/UPath URL (``s3://``, ``gs://``, ...)
by configuration. Every write is atomic: a failed step never leaves a half-written artifact.

Local targets are written to a temporary sibling and renamed into place (``os.replace`` for files,
rename-swap for folders). Remote targets are written to a local temporary folder first and uploaded
only once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
from upath import UPath


TEMP_MARKERS = (".tmp-", ".old-")
STALE_AFTER_S = 6 * 3600.0


def _temp_name(local: Path, kind: str) -> Path:
    """``.<name>.tmp-p<pid>-<hex8>`` (or ``.old-``): hidden, tagged with the writing process so
    ``sweep_stale_temps`` can tell a dead writer's leftovers from a live writer's work."""
    return local.with_name(f".{local.name}.{kind}-p{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike, stale_after_s: float = STALE_AFTER_S, log=None) -> list[str]:
    """Delete the temp files/folders that ``atomic_file`` / ``atomic_dir`` leave behind when their
    process is killed (``.<name>.tmp-p<pid>-<hex>`` and ``.<name>.old-...``) directly inside ``folder``.

    A temp entry is stale when its writer process (pid in the name) no longer exists on this machine,
    or, for names without a pid (older releases, other machines' writers on shared storage), when it
    was last modified more than ``stale_after_s`` seconds ago. Local folders only (remote writes are
    staged in a local temp dir that the OS cleans). Returns the removed paths; ``log`` gets one line."""
    import re
    import time

    target = as_path(folder)
    if not _is_local(target):
        return []
    local = Path(target.path)
    if not local.is_dir():
        return []
    removed: list[str] = []
    now = time.time()
    for entry in local.iterdir():
        name = entry.name
        if not name.startswith(".") or not any(m in name for m in TEMP_MARKERS):
            continue
        m = re.search(r"\.(?:tmp|old)-p(\d+)-[0-9a-f]{8}$", name)
        if m:
            stale = int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))
        else:
            try:
                stale = now - entry.stat().st_mtime > stale_after_s
            except FileNotFoundError:
                continue
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(str(entry))
    if removed and log is not None:
        log(f"swept {len(removed)} stale temp file(s) left by killed runs in {local}: {[Path(r).name for r in removed[:5]]}")
    return removed


def _is_local(path: UPath | Path) -> bool:
    protocol = getattr(path, "protocol", "") or ""
    return protocol in ("", "file", "local")


def as_path(url: str | os.PathLike) -> UPath:
    return UPath(str(url))


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a local temp file path; on success move it to ``dest`` (local or remote)."""
    target = as_path(dest)
    if _is_local(target):
        local = Path(target.path)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(local, "tmp")
        try:
            yield tmp
            os.replace(tmp, local)
        finally:
            if tmp.exists():
                tmp.unlink()
    else:
        with tempfile.TemporaryDirectory(prefix="animind-") as tmpdir:
            tmp = Path(tmpdir) / target.name
            yield tmp
            target.parent.mkdir(parents=True, exist_ok=True)
            target.fs.put_file(str(tmp), target.path)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty local temp folder; on success it replaces ``dest`` as a whole."""
    target = as_path(dest)
    if _is_local(target):
        local = Path(target.path)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(local, "tmp")
        tmp.mkdir()
        try:
            yield tmp
            old = None
            if local.exists():
                old = _temp_name(local, "old")
                os.replace(local, old)
            os.replace(tmp, local)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory(prefix="animind-") as tmpdir:
            tmp = Path(tmpdir) / "out"
            tmp.mkdir()
            yield tmp
            if target.exists():
                target.fs.rm(target.path, recursive=True)
            target.fs.put(str(tmp), target.path, recursive=True)


def write_parquet(df: pl.DataFrame, dest: str | os.PathLike) -> str:
    with atomic_file(dest) as tmp:
        df.write_parquet(tmp)
    return str(dest)


def write_json(obj: Any, dest: str | os.PathLike, indent: int | None = 2) -> str:
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False, default=str), encoding="utf-8")
    return str(dest)


def write_jsonl(rows, dest: str | os.PathLike) -> str:
    with atomic_file(dest) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return str(dest)


@contextlib.contextmanager
def local_copy(src: str | os.PathLike) -> Iterator[Path]:
    """Yield a local path for ``src`` (itself when local, else a downloaded temp copy)."""
    source = as_path(src)
    if _is_local(source):
        yield Path(source.path)
        return
    with tempfile.TemporaryDirectory(prefix="animind-") as tmpdir:
        local = Path(tmpdir) / source.name
        source.fs.get(source.path, str(local), recursive=source.is_dir())
        yield local


class ArtifactStore:
    """Root folder (local path or fsspec URL) under which assets keep files and model folders.

    ``store.path("rqvae_model", "default", "model.pt")`` -> ``<root>/rqvae_model/default/model.pt``.
    """

    def __init__(self, root: str | os.PathLike = "data/artifacts") -> None:
        self.root = as_path(root)
        if _is_local(self.root):
            self.root = as_path(os.path.abspath(self.root.path))

    def path(self, *parts: str) -> UPath:
        return self.root.joinpath(*parts)

    def exists(self, *parts: str) -> bool:
        return self.path(*parts).exists()

    def atomic_file(self, *parts: str):
        return atomic_file(self.path(*parts))

    def atomic_dir(self, *parts: str):
        return atomic_dir(self.path(*parts))

    def sweep(self, *parts: str, log=None) -> list[str]:
        """``sweep_stale_temps`` of ``<root>/<parts...>`` (call at step start)."""
        return sweep_stale_temps(self.path(*parts), log=log)

    def local_copy(self, *parts: str):
        return local_copy(self.path(*parts))

    def write_parquet(self, df: pl.DataFrame, *parts: str) -> str:
        return write_parquet(df, self.path(*parts))

    def write_json(self, obj: Any, *parts: str) -> str:
        return write_json(obj, self.path(*parts))

    def write_jsonl(self, rows, *parts: str) -> str:
        return write_jsonl(rows, self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        with self.path(*parts).open("r", encoding="utf-8") as fh:
            return json.load(fh)
