"""Sharded semantic-ID encoding ($ANIMIND_EMBEDDING_SHARDS=N, issue 16 item 2).

Library: the code table round-trips, and a union mixing quantizers, duplicating ids or with ragged codes
raises naming the table, column, shard and fix. Dagster: ``semantic_id_codes`` encodes each shard in its own
run and ``semantic_ids`` built from the union equals the unsharded ``semantic_ids`` row for row; after a
quantizer refit the un-re-encoded shards stop ``semantic_ids`` (previous table kept) until they are backfilled.
"""

from __future__ import annotations

import importlib
import os

import dagster as dg
import numpy as np
import polars as pl
import pytest

from animind_assets.lib.common.sharding import shard_keys
from animind_assets.lib.semantic_ids.encode_table import code_frame, codes_from_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_code_table_round_trip_sorted_by_id():
    codes = np.array([[3, 1], [0, 2], [1, 1]])
    df = code_frame([30, 10, 20], codes, ["h30", "h10", "h20"], "fpA")
    assert df.schema["codes"] == pl.List(pl.Int64) and df.height == 3
    ids, c, h = codes_from_frame(df, "fpA")
    assert ids.tolist() == [10, 20, 30] and c.tolist() == [[0, 2], [1, 1], [3, 1]] and h == ["h10", "h20", "h30"]
    with pytest.raises(ValueError, match="one row per item"):
        code_frame([1, 2], codes, ["a", "b"], "fp")


def test_code_table_errors_name_table_column_shard_and_fix():
    a = code_frame([1, 2], np.array([[0, 1], [1, 0]]), ["a", "b"], "old").with_columns(pl.lit("0-of-2").alias("shard"))
    b = code_frame([3], np.array([[1, 1]]), ["c"], "new").with_columns(pl.lit("1-of-2").alias("shard"))
    with pytest.raises(ValueError, match=r"semantic_id_codes.quantizer_fingerprint: 2 of 3 rows in shard\(s\) \['0-of-2'\].*backfill"):
        codes_from_frame(pl.concat([a, b]), "new")
    with pytest.raises(ValueError, match=r"semantic_id_codes.anime_id: duplicate ids, e.g. \[1, 2\]"):
        codes_from_frame(pl.concat([a, a]), "old")
    ragged = pl.DataFrame({"anime_id": [1, 2, 3], "codes": [[0, 1], [1], [1, 1]], "vector_hash": ["a", "b", "c"],
                           "quantizer_fingerprint": ["f"] * 3})
    with pytest.raises(ValueError, match=r"semantic_id_codes.codes: null or ragged .* e.g. anime_id \[2\]"):
        codes_from_frame(ragged, "f")
    with pytest.raises(ValueError, match="no rows"):
        codes_from_frame(a.head(0), "old")
    with pytest.raises(ValueError, match="missing column"):
        codes_from_frame(a.drop("vector_hash"), "old")


# ------------------------------------------------------------------------------------------ Dagster
N, DIM, SHARDS = 240, 16, 3


def _catalog():
    rng = np.random.default_rng(0)
    ids = np.arange(1, N + 1) * 7
    centers = rng.normal(size=(12, DIM))
    x = centers[np.arange(N) % 12] + 0.35 * rng.normal(size=(N, DIM))
    return ids, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _frames():
    ids, x = _catalog()
    prep = pl.DataFrame({"anime_id": ids, "name": [f"A{i}" for i in ids], "title": [f"A{i}" for i in ids]})
    emb = pl.DataFrame({"anime_id": ids, "embedding": pl.Series(x.tolist(), dtype=pl.Array(pl.Float32, DIM)),
                        "dim": [DIM] * N, "model": ["synthetic"] * N})
    return prep, emb


def _modules(monkeypatch, shards: int):
    monkeypatch.setenv("ANIMIND_EMBEDDING_SHARDS", str(shards))
    import animind_assets.defs.semantic_ids.semantic_id_codes as C
    import animind_assets.defs.semantic_ids.semantic_ids as S

    vars(C).pop("semantic_id_codes", None)  # reload keeps old names; the reload decides whether it exists
    return importlib.reload(S), importlib.reload(C)


@pytest.fixture
def restore_modules():
    yield
    os.environ.pop("ANIMIND_EMBEDDING_SHARDS", None)
    import animind_assets.defs.semantic_ids.semantic_id_codes as C
    import animind_assets.defs.semantic_ids.semantic_ids as S

    importlib.reload(S)
    vars(C).pop("semantic_id_codes", None)  # reload keeps old names; unsharded, the asset must not exist
    importlib.reload(C)


def _resources(root):
    from animind_assets.resources import (
        AniMindDuckDBIOManager,
        ArtifactStoreResource,
        MlflowResource,
        ParquetExports,
    )

    return {
        "io_manager": AniMindDuckDBIOManager(database=str(root / "w.duckdb"), schema="animind"),
        "artifacts": ArtifactStoreResource(root=str(root / "artifacts")),
        "exports": ParquetExports(root=str(root / "exports")),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", enabled=False),
    }


def _run_config(seed=0, refit=False):
    return {"ops": {"rqvae_model": {"config": {"preset": "default", "codebook_size": 16, "kmeans_iters": 5,
                                               "seed": seed, "refit": refit}},
                    "semantic_ids": {"config": {"min_level_usage": 0.3}}}}


def _table(res) -> pl.DataFrame:
    return res.output_for_node("semantic_ids").select("anime_id", "semantic_id", "codes", "collision_group_size").sort("anime_id")


def test_sharded_encoding_equals_unsharded_and_refit_needs_a_backfill(tmp_path, monkeypatch, restore_modules):
    from animind_assets.defs.embeddings.sharding import (
        select_shard,
        sharded_asset_kwargs,
    )
    from animind_assets.defs.semantic_ids.rqvae_model import rqvae_model

    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    prep, emb = _frames()

    @dg.asset(name="anime_prep")
    def prep_stub() -> pl.DataFrame:
        return prep

    # -- unsharded reference
    S0, C0 = _modules(monkeypatch, 0)
    assert not hasattr(C0, "semantic_id_codes")  # unsharded: the asset does not exist

    @dg.asset(name="anime_embeddings")
    def emb_all() -> pl.DataFrame:
        return emb

    (tmp_path / "a").mkdir()
    ref = dg.materialize([prep_stub, emb_all, rqvae_model, S0.semantic_ids], resources=_resources(tmp_path / "a"),
                         run_config=_run_config())
    reference = _table(ref)
    assert reference.height == N and reference["semantic_id"].n_unique() == N

    # -- sharded: embeddings and codes per shard (one run each), semantic_ids on the union
    S, C = _modules(monkeypatch, SHARDS)
    deps = S.semantic_ids.dependency_keys
    assert dg.AssetKey("semantic_id_codes") in deps and dg.AssetKey("anime_embeddings") not in deps

    @dg.asset(name="anime_embeddings", **sharded_asset_kwargs(SHARDS))
    def emb_sharded(context) -> pl.DataFrame:
        return select_shard(emb, context.partition_key, "anime_id").with_columns(pl.lit(context.partition_key).alias("shard"))

    assets = [prep_stub, emb_sharded, rqvae_model, C.semantic_id_codes, S.semantic_ids]
    root = tmp_path / "b"
    root.mkdir()
    res, inst = _resources(root), dg.DagsterInstance.ephemeral()

    def run(name, partition_key=None, run_config=None, raise_on_error=True):
        ops = (run_config or _run_config())["ops"]
        return dg.materialize(assets, resources=res, instance=inst, selection=dg.AssetSelection.assets(name),
                              partition_key=partition_key, run_config={"ops": {k: v for k, v in ops.items() if k == name}},
                              raise_on_error=raise_on_error)

    run("anime_prep")
    for key in shard_keys(SHARDS):
        run("anime_embeddings", key)
    run("rqvae_model")
    sizes = []
    for key in shard_keys(SHARDS):
        r = run("semantic_id_codes", key)
        out = r.output_for_node("semantic_id_codes")
        assert set(out["shard"].to_list()) == {key}
        sizes.append(out.height)
    assert sum(sizes) == N and min(sizes) > 0
    sharded = run("semantic_ids")
    assert _table(sharded).equals(reference)  # same IDs, codes and collision groups, row for row
    md = {k: v.value for k, v in sharded.asset_materializations_for_node("semantic_ids")[0].metadata.items()}
    assert md["encoded_in"] == "semantic_id_codes shards" and md["ids_added"] == N

    # -- refit the quantizer: shards encoded by the old one stop semantic_ids, its table stays
    run("rqvae_model", run_config=_run_config(seed=1, refit=True))
    bad = run("semantic_ids", raise_on_error=False)
    assert not bad.success
    error = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error
    err = error.message + (error.cause.message if error.cause else "")
    assert "quantizer_fingerprint" in err and "backfill those shards of semantic_id_codes" in err, err
    assert all(k in err for k in shard_keys(SHARDS)), err
    from animind_assets.resources import DuckDBWarehouse

    kept = DuckDBWarehouse(database=str(root / "w.duckdb"), schema="animind").read_table("semantic_ids")
    assert kept.height == N  # the previous IDs are still published
    for key in shard_keys(SHARDS):
        run("semantic_id_codes", key)
    again = run("semantic_ids")
    md = {k: v.value for k, v in again.asset_materializations_for_node("semantic_ids")[0].metadata.items()}
    assert md["assignment_mode"] == "reassigned" and md["dagster/row_count"] == N
