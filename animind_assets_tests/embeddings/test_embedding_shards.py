"""Item-hash sharding of ``anime_embeddings`` ($ANIMIND_EMBEDDING_SHARDS): stable shard assignment, a sharded
backfill equal to the unsharded table row for row, per-shard incremental reuse and checks, a failed shard
rerun alone, the unsharded -> sharded transition, and the multi-pod Parquet backend.

The Dagster tests use the real embedded all-MiniLM-L6-v2 on 7 short texts (model loaded once per process).
"""

from __future__ import annotations

import importlib
import os

import dagster as dg
import numpy as np
import polars as pl
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from animind_assets.lib.common import sharding as S  # noqa: E402


# ------------------------------------------------------------------------------------------ library
def test_shard_assignment_is_pinned_and_type_stable():
    # pinned values: blake2b-64 of the decimal/UTF-8 id, mod n. A change here moves items between
    # shards of existing deployments (every shard would re-embed), so it must be deliberate.
    assert [S.shard_of(x, 7) for x in (0, 1, 42, "tt0111161", 10**12)] == [2, 2, 1, 3, 2]
    assert S.assign_shards(range(1, 13), 3).tolist() == [2, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1]
    assert S.shard_of(42, 7) == S.shard_of(np.int64(42), 7) == S.shard_of(np.int32(42), 7) == S.shard_of("42", 7)
    assert S.assign_shards(np.arange(5, dtype=np.int64), 4).dtype == np.int32


def test_shards_balanced_and_keys():
    counts = np.bincount(S.assign_shards(range(100_000), 4), minlength=4)
    assert counts.sum() == 100_000 and (np.abs(counts - 25_000) < 500).all(), counts
    assert S.shard_keys(3) == ["0-of-3", "1-of-3", "2-of-3"]
    assert S.shard_keys(16)[0] == "00-of-16" and S.shard_keys(16) == sorted(S.shard_keys(16))
    assert S.parse_shard_key("03-of-16") == S.ShardKey(3, 16) and str(S.ShardKey(3, 16)) == "03-of-16"
    assert S.shard_sizes([1, 2, 3, 4, 5, 6], 3) == {"0-of-3": 0, "1-of-3": 3, "2-of-3": 3}
    mask = S.shard_mask([1, 2, 3, 4, 5, 6], "1-of-3")
    assert mask.tolist() == [False, False, True, True, False, True]


@pytest.mark.parametrize("bad", ["3-of-16", "16-of-16", "a-of-2", "0-of-0", "1of2", ""])
def test_bad_shard_keys_raise(bad):
    with pytest.raises(ValueError, match="shard"):
        S.parse_shard_key(bad)


def test_bad_ids_and_counts_raise():
    with pytest.raises(ValueError, match="None"):
        S.shard_of(None, 4)
    with pytest.raises(TypeError, match="float"):
        S.shard_of(1.0, 4)
    with pytest.raises(ValueError, match="n_shards"):
        S.assign_shards([1], 0)


def test_env_parsing(monkeypatch):
    from animind_assets.defs.embeddings import sharding as DS

    monkeypatch.delenv(DS.SHARDS_ENV, raising=False)
    assert DS.embedding_shards() == 0 and DS.sharded_asset_kwargs() == {}
    monkeypatch.setenv(DS.SHARDS_ENV, "4")
    kw = DS.sharded_asset_kwargs()
    assert kw["partitions_def"].get_partition_keys() == S.shard_keys(4)
    assert kw["metadata"] == {"partition_expr": "shard"}
    assert kw["backfill_policy"].max_partitions_per_run == 1
    for bad in ("four", "-1", "999999"):
        monkeypatch.setenv(DS.SHARDS_ENV, bad)
        with pytest.raises(ValueError):
            DS.embedding_shards()


def test_empty_shard_raises_naming_table_and_shard():
    from animind_assets.defs.embeddings.sharding import shard_input

    frame = pl.DataFrame({"anime_id": [1, 2, 5], "anime_text": ["a", "b", "c"]})  # all in shard 2-of-3
    assert shard_input(frame, "2-of-3", "anime_id", "anime_prep")["anime_id"].to_list() == [1, 2, 5]
    with pytest.raises(ValueError, match=r"anime_prep: none of its 3 rows hash to shard 0-of-3"):
        shard_input(frame, "0-of-3", "anime_id", "anime_prep")


# ----------------------------------------------------------------------------------------- Dagster
# two anime per shard of 3 (ids picked by their shard), plus one more in shard 2
TEXTS = {
    15: "Title: Cowboy Bebop. Type: TV. Genres: Action, Sci-Fi. Synopsis: Bounty hunters drift through space in 2071.",
    17: "Title: Trigun. Type: TV. Genres: Action, Comedy. Synopsis: A gunman with a $60 billion bounty avoids killing.",
    3: "Title: Clannad. Type: TV. Genres: Drama, Romance, Slice of Life. Synopsis: A delinquent meets a shy girl at school.",
    4: "Title: Mushishi. Type: TV. Genres: Mystery, Supernatural. Synopsis: A wanderer studies primitive life forms called mushi.",
    1: "Title: K-On!. Type: TV. Genres: Music, Comedy. Synopsis: Four girls join the light music club.",
    2: "Title: Monster. Type: TV. Genres: Mystery, Thriller. Synopsis: A surgeon hunts the boy whose life he once saved.",
    5: "Title: Haikyuu!!. Type: TV. Genres: Sports, Comedy. Synopsis: A short boy aims for the top of high-school volleyball.",
}
KEYS = S.shard_keys(3)
RUN_CONFIG = {"ops": {"anime_embeddings": {"config": {"device": "cpu"}}}}
SEEN: dict[str, pl.DataFrame] = {}


def _prep_asset(texts: dict):
    @dg.asset(name="anime_prep")
    def fake_prep() -> pl.DataFrame:
        return pl.DataFrame({"anime_id": pl.Series(list(texts), dtype=pl.Int64), "anime_text": list(texts.values())})

    return fake_prep


@dg.asset
def union_probe(anime_embeddings: pl.DataFrame) -> None:
    """An unpartitioned downstream (like rqvae_model): records the frame the IO manager hands it."""
    SEEN["union"] = anime_embeddings


def _module(monkeypatch, shards: int):
    """``anime_embeddings`` module defined with ``shards`` shards (0 = unpartitioned)."""
    import animind_assets.defs.embeddings.anime_embeddings as M

    monkeypatch.setenv("ANIMIND_EMBEDDING_SHARDS", str(shards))
    return importlib.reload(M)


@pytest.fixture
def restore_module():
    yield
    os.environ.pop("ANIMIND_EMBEDDING_SHARDS", None)
    import animind_assets.defs.embeddings.anime_embeddings as M

    importlib.reload(M)


def _duckdb(path):
    from animind_assets.resources import AniMindDuckDBIOManager, DuckDBWarehouse, ParquetExports

    return {
        "io_manager": AniMindDuckDBIOManager(database=str(path), schema="main"),
        "warehouse": DuckDBWarehouse(database=str(path), schema="main"),
        "exports": ParquetExports(root=str(path.parent / "exports")),
    }


def _parquet(root):
    from animind_assets.resources import ParquetExports, ParquetTablesIOManager, ParquetWarehouse

    return {
        "io_manager": ParquetTablesIOManager(root=str(root), storage_options={}),
        "warehouse": ParquetWarehouse(root=str(root), storage_options={}),
        "exports": ParquetExports(root=str(root.parent / "exports")),
    }


def _assets(M, texts, probe=False):
    checks = [M.anime_embeddings_finite, M.anime_embeddings_unit_norm, M.anime_embeddings_no_collapse]
    return [_prep_asset(texts), M.anime_embeddings, *checks, *([union_probe] if probe else [])]


def _materialize(M, texts, resources, instance, partition_key=None, probe=False, raise_on_error=True):
    selection = None
    if partition_key is not None:  # the (unpartitioned) upstream, then one shard run as a backfill makes it
        prep = dg.materialize(_assets(M, texts), resources=resources, instance=instance, selection=dg.AssetSelection.assets("anime_prep"))
        assert prep.success
        selection = dg.AssetSelection.assets("anime_embeddings")
    elif probe:
        selection = dg.AssetSelection.assets("union_probe")
    return dg.materialize(
        _assets(M, texts, probe),
        resources=resources,
        instance=instance,
        run_config=RUN_CONFIG if partition_key is not None or not probe else {},
        partition_key=partition_key,
        selection=selection,
        raise_on_error=raise_on_error,
    )


def _md(result):
    md = result.asset_materializations_for_node("anime_embeddings")[0].metadata
    return {k: getattr(v, "value", v) for k, v in md.items()}


def _checks(result):
    return [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]


def _same_rows(a: pl.DataFrame, b: pl.DataFrame) -> None:
    a, b = a.sort("anime_id"), b.sort("anime_id")
    assert a["anime_id"].to_list() == b["anime_id"].to_list()
    for col in ("text_hash", "model_fingerprint", "dim", "model"):
        assert a[col].to_list() == b[col].to_list(), col
    np.testing.assert_allclose(a["embedding"].to_numpy(), b["embedding"].to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_sharded_backfill_equals_unsharded_incremental_failed_shard_and_transition(
    animind_env, tmp_path, monkeypatch, restore_module
):
    from animind_assets.resources import DuckDBWarehouse

    instance = dg.DagsterInstance.ephemeral()
    # -- unsharded reference table
    M0 = _module(monkeypatch, 0)
    db_u = tmp_path / "u" / "animind.duckdb"
    db_u.parent.mkdir()
    assert _materialize(M0, TEXTS, _duckdb(db_u), instance).success
    unsharded = DuckDBWarehouse(database=str(db_u)).read_table("anime_embeddings")
    assert unsharded.height == len(TEXTS) and "shard" not in unsharded.columns

    # -- sharded backfill (one run per shard) on a fresh database == the unsharded table
    M = _module(monkeypatch, 3)
    assert M.anime_embeddings.partitions_def.get_partition_keys() == KEYS
    db_s = tmp_path / "s" / "animind.duckdb"
    db_s.parent.mkdir()
    res_s = _duckdb(db_s)
    sizes = S.shard_sizes(list(TEXTS), 3)
    for key in KEYS:
        r = _materialize(M, TEXTS, res_s, instance, partition_key=key)
        md = _md(r)
        assert (md["rows_embedded"], md["rows_reused"], md["dagster/row_count"]) == (sizes[key], 0, sizes[key])
        checks = _checks(r)
        assert len(checks) == 3 and all(c.passed for c in checks)
        assert {c.partition for c in checks} == {key}  # the checks ran on this shard
    sharded = DuckDBWarehouse(database=str(db_s)).read_table("anime_embeddings")
    assert sorted(sharded["shard"].unique().to_list()) == KEYS
    assert all(S.shard_of(i, 3) == S.parse_shard_key(k).index for i, k in zip(sharded["anime_id"], sharded["shard"]))
    _same_rows(sharded, unsharded)
    # the unpartitioned downstream gets the union of the shards as one frame
    assert _materialize(M, TEXTS, res_s, instance, probe=True).success
    _same_rows(SEEN["union"], unsharded)

    # -- incremental per shard: one text of shard 1 changes; only that shard reruns, reusing its other rows
    texts2 = dict(TEXTS)
    texts2[3] = TEXTS[3] + " Second season."
    before = DuckDBWarehouse(database=str(db_s)).read_table("anime_embeddings").sort("anime_id")
    md = _md(_materialize(M, texts2, res_s, instance, partition_key="1-of-3"))
    assert (md["rows_embedded"], md["rows_reused"], md["rows_dropped"]) == (1, sizes["1-of-3"] - 1, 0)
    after = DuckDBWarehouse(database=str(db_s)).read_table("anime_embeddings").sort("anime_id")
    assert after.height == before.height
    changed = after.join(before, on="anime_id", suffix="_b").filter(pl.col("embedded_at") != pl.col("embedded_at_b"))
    assert changed["anime_id"].to_list() == [3]

    # -- a failed shard leaves its previous rows (and the other shards) in place and reruns alone
    texts3 = dict(texts2)
    texts3[2] = TEXTS[2] + " Remastered."  # shard 2
    real_build = M.build_embeddings

    def failing_build(*a, **k):
        raise RuntimeError("simulated pod failure (OOM-killed worker)")

    monkeypatch.setattr(M, "build_embeddings", failing_build)
    r = _materialize(M, texts3, res_s, instance, partition_key="2-of-3", raise_on_error=False)
    assert not r.success
    assert DuckDBWarehouse(database=str(db_s)).read_table("anime_embeddings").sort("anime_id").equals(after)
    monkeypatch.setattr(M, "build_embeddings", real_build)
    md = _md(_materialize(M, texts3, res_s, instance, partition_key="2-of-3"))
    assert (md["rows_embedded"], md["rows_reused"]) == (1, sizes["2-of-3"] - 1)
    final = DuckDBWarehouse(database=str(db_s)).read_table("anime_embeddings").sort("anime_id")
    untouched = final.filter(pl.col("shard") != "2-of-3")
    assert untouched.equals(after.filter(pl.col("shard") != "2-of-3"))

    # -- transition: the unsharded table's vectors are reused by the first sharded backfill
    res_u = _duckdb(db_u)
    for key in KEYS:
        md = _md(_materialize(M, TEXTS, res_u, instance, partition_key=key))
        assert (md["rows_embedded"], md["rows_reused"]) == (0, sizes[key])
    assert _materialize(M, TEXTS, res_u, instance, probe=True).success
    assert SEEN["union"].height == len(TEXTS)  # old rows (shard NULL) are not part of any shard
    _same_rows(SEEN["union"], unsharded)


@pytest.mark.slow
def test_sharded_backfill_on_parquet_backend(animind_env, tmp_path, monkeypatch, restore_module):
    from animind_assets.resources import ParquetWarehouse

    instance = dg.DagsterInstance.ephemeral()
    M0 = _module(monkeypatch, 0)
    root_u = tmp_path / "u" / "tables"
    assert _materialize(M0, TEXTS, _parquet(root_u), instance).success
    unsharded = ParquetWarehouse(root=str(root_u), storage_options={}).read_table("anime_embeddings")

    M = _module(monkeypatch, 3)
    root_s = tmp_path / "s" / "tables"
    res = _parquet(root_s)
    for key in KEYS:
        r = _materialize(M, TEXTS, res, instance, partition_key=key)
        assert all(c.passed for c in _checks(r))
    # one dataset folder per shard
    assert sorted(p.name for p in (root_s / "anime_embeddings").iterdir() if p.is_dir()) == KEYS
    assert _materialize(M, TEXTS, res, instance, probe=True).success
    _same_rows(SEEN["union"], unsharded)
    # a rerun of one shard reuses its own partition
    md = _md(_materialize(M, TEXTS, res, instance, partition_key="2-of-3"))
    assert (md["rows_embedded"], md["rows_reused"]) == (0, S.shard_sizes(list(TEXTS), 3)["2-of-3"])
