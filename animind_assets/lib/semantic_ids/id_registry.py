"""Stable semantic-ID assignment across rebuilds: the ID registry (item -> full ID, retired IDs reserved),
``stable_assign`` (keep existing items' IDs, next free disambiguation index for new/changed items) and the
``id_space_version`` hash that downstream data versions follow. No Dagster."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from animind_assets.lib.semantic_ids.assign import assign_semantic_ids
REGISTRY_FILE = "id_registry.parquet"
REGISTRY_META = "id_registry.json"
REGISTRY_FORMAT = "animind-semantic-id-registry"


# ------------------------------------------------------------------------------------------------
# stable ID assignment
# ------------------------------------------------------------------------------------------------
@dataclass
class IdRegistry:
    """Every ID handed out under one fitted quantizer.

    ``frame``: ``item_id`` Int64, ``codes`` List(Int64) (full ID incl. the disambiguation level),
    ``vector_hash`` Utf8, ``status`` Utf8 (``active`` | ``retired``); ``quantizer`` = the
    ``model_fingerprint`` the codes came from.
    """

    quantizer: str
    frame: pl.DataFrame

    def active(self) -> pl.DataFrame:
        return self.frame.filter(pl.col("status") == "active")


@dataclass
class StableAssignment:
    """Result of ``stable_assign``.

    ``full``: ``(n, levels + 1)`` int64 IDs in the order of the input ``item_ids``; ``registry``:
    the registry to store; ``mode``: ``initial`` | ``incremental`` | ``reassigned``; ``counts``:
    kept / changed / added / removed / retired / reencoded_same_codes; ``changed_ids`` /
    ``added_ids`` / ``removed_ids``: item ids (sorted).
    """

    full: np.ndarray
    registry: IdRegistry
    mode: str
    counts: dict[str, int]
    changed_ids: list[int]
    added_ids: list[int]
    removed_ids: list[int]

    @property
    def ids_changed(self) -> bool:
        return bool(self.counts["changed"] or self.counts["added"] or self.counts["removed"])


def _compare(prev_active: dict[int, tuple], item_ids: Sequence[int], full: np.ndarray) -> tuple[list, list, list, list]:
    kept, changed, added = [], [], []
    for iid, row in zip(item_ids, full.tolist()):
        old = prev_active.get(iid)
        if old is None:
            added.append(iid)
        elif tuple(old) == tuple(row):
            kept.append(iid)
        else:
            changed.append(iid)
    current = set(item_ids)
    removed = sorted(i for i in prev_active if i not in current)
    return kept, changed, added, removed


def stable_assign(
    item_ids: Sequence[int] | np.ndarray,
    codes: np.ndarray,
    hashes: Sequence[str],
    quantizer: str,
    previous: IdRegistry | None = None,
    release_removed: bool = False,
) -> StableAssignment:
    """Semantic IDs for the current items, keeping previous IDs where the policy allows.

    ``item_ids``: ``(n,)`` unique ints; ``codes``: ``(n, levels)`` quantizer codes; ``hashes``:
    ``vector_hashes`` of the vectors the codes came from; ``quantizer``: ``model_fingerprint`` of the
    quantizer; ``previous``: the registry of the last assignment (``None`` = first build).
    Raises ``ValueError`` on length mismatches or duplicate item ids.
    """
    ids = [int(i) for i in np.asarray(item_ids).tolist()]
    codes = np.asarray(codes, dtype=np.int64)
    n = len(ids)
    if codes.ndim != 2 or codes.shape[0] != n or len(hashes) != n:
        raise ValueError(f"stable_assign: {n} item ids, codes of shape {codes.shape}, {len(hashes)} hashes")
    if len(set(ids)) != n:
        raise ValueError("stable_assign: duplicate item ids")
    levels = codes.shape[1]
    prev_ok = previous is not None and previous.frame.height > 0
    prev_active: dict[int, tuple] = {}
    prev_hash: dict[int, str] = {}
    if prev_ok:
        act = previous.active()
        prev_active = {int(i): tuple(c) for i, c in zip(act["item_id"].to_list(), act["codes"].to_list())}
        prev_hash = dict(zip((int(i) for i in act["item_id"].to_list()), act["vector_hash"].to_list()))
        prev_levels = len(next(iter(prev_active.values()))) - 1 if prev_active else levels
    same_space = prev_ok and previous.quantizer == quantizer and prev_levels == levels

    if not same_space:
        full = assign_semantic_ids(codes, order_key=np.asarray(ids, dtype=np.int64))
        kept, changed, added, removed = _compare(prev_active, ids, full)
        mode = "initial" if not prev_ok else "reassigned"
        frame = pl.DataFrame(
            {
                "item_id": pl.Series(ids, dtype=pl.Int64),
                "codes": pl.Series(full.tolist(), dtype=pl.List(pl.Int64)),
                "vector_hash": pl.Series(list(hashes), dtype=pl.Utf8),
                "status": pl.Series(["active"] * n, dtype=pl.Utf8),
            }
        )
        counts = {"kept": len(kept), "changed": len(changed), "added": len(added), "removed": len(removed),
                  "retired": 0, "reencoded_same_codes": 0}
        return StableAssignment(full, IdRegistry(quantizer, frame), mode, counts, sorted(changed), sorted(added), removed)

    # same quantizer: keep what can be kept, give the rest the next free index of their prefix
    # every ID ever handed out under this quantizer stays taken, unless release_removed (then only
    # the IDs that kept items still hold, added below, are taken)
    reserved: set[tuple] = set() if release_removed else {tuple(c) for c in previous.frame["codes"].to_list()}
    full = np.zeros((n, levels + 1), dtype=np.int64)
    pending: list[int] = []
    reencoded_same = 0
    kept, changed, added = [], [], []
    for row, iid in enumerate(ids):
        old = prev_active.get(iid)
        if old is not None and prev_hash.get(iid) == hashes[row]:
            full[row] = old
            kept.append(iid)
        elif old is not None and tuple(old[:-1]) == tuple(codes[row].tolist()):
            full[row] = old
            kept.append(iid)
            reencoded_same += 1
        else:
            pending.append(row)
    current = set(ids)
    removed = sorted(i for i in prev_active if i not in current)
    pending_set = set(pending)
    taken = reserved | {tuple(full[r].tolist()) for r in range(n) if r not in pending_set}
    next_free: dict[tuple, int] = {}
    for row in sorted(pending, key=lambda r: ids[r]):
        prefix = tuple(codes[row].tolist())
        d = next_free.get(prefix, 0)
        while prefix + (d,) in taken:
            d += 1
        taken.add(prefix + (d,))
        next_free[prefix] = d + 1
        full[row, :levels] = codes[row]
        full[row, levels] = d
        (changed if ids[row] in prev_active else added).append(ids[row])

    retired_rows = []
    if not release_removed:
        old_retired = previous.frame.filter(pl.col("status") == "retired")
        retired_rows.append(old_retired)
        freed = [(i, prev_active[i], prev_hash.get(i, "")) for i in sorted(set(changed) | set(removed))]
        if freed:
            retired_rows.append(
                pl.DataFrame(
                    {
                        "item_id": pl.Series([f[0] for f in freed], dtype=pl.Int64),
                        "codes": pl.Series([list(f[1]) for f in freed], dtype=pl.List(pl.Int64)),
                        "vector_hash": pl.Series([f[2] for f in freed], dtype=pl.Utf8),
                        "status": pl.Series(["retired"] * len(freed), dtype=pl.Utf8),
                    }
                )
            )
    active = pl.DataFrame(
        {
            "item_id": pl.Series(ids, dtype=pl.Int64),
            "codes": pl.Series(full.tolist(), dtype=pl.List(pl.Int64)),
            "vector_hash": pl.Series(list(hashes), dtype=pl.Utf8),
            "status": pl.Series(["active"] * n, dtype=pl.Utf8),
        }
    )
    frame = pl.concat([active, *retired_rows], how="vertical") if retired_rows else active
    retired_n = frame.filter(pl.col("status") == "retired").height
    counts = {"kept": len(kept), "changed": len(changed), "added": len(added), "removed": len(removed),
              "retired": retired_n, "reencoded_same_codes": reencoded_same}
    return StableAssignment(full, IdRegistry(quantizer, frame), "incremental", counts, sorted(changed), sorted(added), removed)


def save_registry(folder: str | Path, registry: IdRegistry, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``id_registry.parquet`` + ``id_registry.json`` into the local folder ``folder``."""
    folder = Path(folder)
    registry.frame.write_parquet(folder / REGISTRY_FILE)
    meta = {"format": REGISTRY_FORMAT, "format_version": 1, "quantizer": registry.quantizer,
            "active": registry.active().height, "retired": registry.frame.height - registry.active().height,
            **dict(extra or {})}
    (folder / REGISTRY_META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")


def load_registry(parquet: str | Path, meta_json: str | Path) -> IdRegistry:
    """Read a registry written by ``save_registry``; ``ValueError`` naming the file when it is not one."""
    meta = json.loads(Path(meta_json).read_text(encoding="utf-8"))
    if meta.get("format") != REGISTRY_FORMAT:
        raise ValueError(f"{meta_json}: not a semantic-ID registry (format={meta.get('format')!r})")
    frame = pl.read_parquet(parquet)
    need = {"item_id", "codes", "vector_hash", "status"}
    if not need <= set(frame.columns):
        raise ValueError(f"{parquet}: missing columns {sorted(need - set(frame.columns))}")
    return IdRegistry(str(meta["quantizer"]), frame.select(["item_id", "codes", "vector_hash", "status"]))


def id_space_version(item_ids: Sequence[int] | np.ndarray, semantic_ids: Sequence[str], level_sizes: Sequence[int]) -> str:
    """SHA-256 (16 hex) of the sorted ``(item id, semantic ID)`` pairs and the vocabulary level
    sizes: changes exactly when an item's ID, the item set or the ID vocabulary changes."""
    pairs = sorted(zip((int(i) for i in np.asarray(item_ids).tolist()), semantic_ids))
    h = hashlib.sha256()
    h.update(json.dumps([int(s) for s in level_sizes]).encode())
    for i, s in pairs:
        h.update(f"{i}\t{s}\n".encode())
    return h.hexdigest()[:16]


__all__ = [
    "DriftReport",
    "DriftThresholds",
    "IdRegistry",
    "RefitDecision",
    "StableAssignment",
    "code_distributions",
    "config_changes",
    "decide_refit",
    "drift_from_codes",
    "fit_reference",
    "fit_settings",
    "id_space_version",
    "load_registry",
    "measure_drift",
    "model_fingerprint",
    "quantizer_code_fingerprint",
    "save_registry",
    "stable_assign",
    "vector_hashes",
]

