"""Semantic IDs: disambiguation, tokens/vocab, frame validation, co-watch recall on a hand-made
example, bucket coherence, and in-process materialization rqvae_model -> semantic_ids ->
semantic_id_report (+ a rqvae_variants partition) on a tiny synthetic catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from animind_assets.lib.semantic_ids.evaluation import (
    bucket_genre_coherence,
    cowatch_recall,
    positive_graph,
    proxy_neighbours,
    rank_semantic,
    recall_value,
    select_queries,
)
from animind_assets.lib.semantic_ids.assign import (
    DEFAULT_SPECIAL_TOKENS,
    assign_semantic_ids,
    build_vocab,
    collision_group_sizes,
    frame_vectors,
    level_sizes,
    semantic_id_frame,
    semantic_id_strings,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
def test_collision_disambiguation_appends_a_unique_level():
    codes = np.array([[1, 2], [1, 2], [0, 0], [1, 2], [3, 3]])
    ids = np.array([30, 10, 5, 20, 1])
    full = assign_semantic_ids(codes, order_key=ids)
    assert full.shape == (5, 3)
    assert np.array_equal(full[:, :2], codes)
    # the collision group {30, 10, 20} is numbered by ascending id; unique rows get 0
    assert full[:, 2].tolist() == [2, 0, 0, 1, 0]
    assert len({tuple(r) for r in full.tolist()}) == 5
    assert collision_group_sizes(codes).tolist() == [3, 3, 1, 3, 1]
    # default order is row order
    assert assign_semantic_ids(codes)[:, 2].tolist() == [0, 1, 0, 2, 0]
    assert assign_semantic_ids(np.zeros((0, 3), dtype=int)).shape == (0, 4)


def test_tokens_vocab_and_frame():
    full = assign_semantic_ids(np.array([[47, 203, 9], [47, 203, 9], [1, 2, 3]]))
    assert semantic_id_strings(full)[:2] == ["<L1_47><L2_203><L3_9><L4_0>", "<L1_47><L2_203><L3_9><L4_1>"]
    sizes = level_sizes(full, 256)
    assert sizes == [256, 256, 256, 2]
    vocab = build_vocab(sizes, DEFAULT_SPECIAL_TOKENS + ["<watch>"])
    assert vocab["tokens"][:6] == DEFAULT_SPECIAL_TOKENS  # specials first, deduplicated
    assert vocab["tokens"][6] == "<L1_0>" and vocab["tokens"][-1] == "<L4_1>"
    assert vocab["vocab_size"] == 6 + 3 * 256 + 2
    assert vocab["token_to_id"]["<L2_0>"] == 6 + 256
    with pytest.raises(ValueError, match="level tokens"):
        build_vocab(sizes, ["<L1_0>"])
    df = semantic_id_frame([5, 6, 7], full)
    assert df.schema["codes"] == pl.List(pl.Int64) and df.schema["semantic_id"] == pl.Utf8
    assert df.columns == ["anime_id", "codes", "semantic_id", "code_l1", "code_l2", "code_l3", "code_l4", "collision_group_size"]
    assert df["collision_group_size"].to_list() == [2, 2, 1]


def test_frame_vectors_validates_inputs():
    arr = pl.DataFrame({"anime_id": [2, 1], "embedding": [[0.0, 1.0], [1.0, 0.0]]}).with_columns(
        pl.col("embedding").cast(pl.Array(pl.Float32, 2))
    )
    ids, x = frame_vectors(arr)
    assert ids.tolist() == [1, 2] and x.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    lst = pl.DataFrame({"anime_id": [1, 2], "embedding": [[1.0, 0.0], [0.0, 1.0]]})
    assert frame_vectors(lst)[1].shape == (2, 2)
    with pytest.raises(ValueError, match="duplicate ids"):
        frame_vectors(pl.DataFrame({"anime_id": [1, 1], "embedding": [[1.0], [2.0]]}))
    with pytest.raises(ValueError, match=r"ragged.*anime_id \[3\]"):
        frame_vectors(pl.DataFrame({"anime_id": [1, 2, 3], "embedding": [[1.0, 0.0], [2.0, 0.0], [1.0]]}))
    with pytest.raises(ValueError, match=r"non-finite.*\[2\]"):
        frame_vectors(pl.DataFrame({"anime_id": [1, 2], "embedding": [[1.0, 0.0], [float("nan"), 0.0]]}))
    with pytest.raises(ValueError, match="missing column 'embedding'"):
        frame_vectors(pl.DataFrame({"anime_id": [1]}))


# ---------------------------------------------------------------------------------------------
def _hand_graph():
    """5 items (ids 10..14). Positives (status 2, score >= 7):
    u1: 10 11 12, u2: 10 11, u3: 10 13, u4: 11 12; u5 rated 13 and 14 with score 5 (ignored),
    u6 has 14 as 'dropped' (ignored)."""
    rows = [
        (1, 10, 8, 2), (1, 11, 9, 2), (1, 12, 7, 2),
        (2, 10, 10, 2), (2, 11, 7, 2),
        (3, 10, 8, 2), (3, 13, 9, 2),
        (4, 11, 8, 2), (4, 12, 8, 2),
        (5, 13, 5, 2), (5, 14, 5, 2),
        (6, 14, 9, 4),
    ]
    u, i, s, st = map(np.array, zip(*rows))
    return positive_graph(u, i, st, s, item_universe=np.array([10, 11, 12, 13, 14]))


def test_cowatch_recall_hand_example():
    g = _hand_graph()
    assert g.support.tolist() == [3, 3, 2, 1, 0]
    assert select_queries(g, min_support=3, max_queries=0).tolist() in ([0, 1], [1, 0])
    # proxy of item 10 (support 3): co(11)=2 -> 2/(3+3-2)=0.5, co(12)=1 -> 1/(3+2-1)=0.25,
    # co(13)=1 -> 1/(3+1-1)=0.333
    prox = proxy_neighbours(g, np.array([0]), k=2)[0]
    assert prox.tolist() == [1, 3]  # items 11, 13
    # semantic ranking: 14 shares the longest prefix with 10, then 12 and 11 share 1 level;
    # among those, cosine decides (12 is closer to 10 than 11 is), never the item id
    codes = np.array([[0, 0, 0], [0, 1, 0], [0, 2, 0], [1, 0, 0], [0, 0, 1]])
    vec = np.array([[1, 0], [0.5, 0.5], [0.9, 0.1], [1, 0.01], [0, 1]], dtype=np.float32)
    unit = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    assert rank_semantic(codes, unit, 0, 4).tolist() == [4, 2, 1, 3]
    assert recall_value(prox, np.array([4, 2]), 2) == 0.0
    assert recall_value(prox, np.array([2, 1]), 2) == 0.5
    assert recall_value(np.array([1]), np.array([1, 2]), 2) == 1.0  # denominator min(K, |proxy|)

    rep = cowatch_recall([10, 11, 12, 13, 14], codes, vec, g, k=2, min_support=3, max_queries=10, seed=0)
    assert rep["evaluated_queries"] == 2
    # query 10: semantic top-2 [14, 12] vs proxy {11, 13} -> 0; cosine top-2 [13, 12] -> 0.5
    # query 11 (support 3): co(10)=2 -> 0.5, co(12)=2 -> 2/(3+2-2)=0.667 -> proxy [12, 10];
    #   semantic: prefix depth 1 for 10, 12, 14 -> cosine to 11: 14 (0.707) ~ 10 (0.707) > 12 ...
    sem_11 = rank_semantic(codes, unit, 1, 2)
    exp_11 = recall_value(np.array([2, 0]), sem_11, 2)
    assert rep["methods"]["semantic_id"]["mean_recall"] == pytest.approx((0.0 + exp_11) / 2)
    assert rep["methods"]["embedding_cosine"]["mean_recall"] > 0
    assert 0 <= rep["methods"]["random"]["mean_recall"] <= 1
    # random expectation: K*|proxy| / ((n-1) * min(K, |proxy|)) = 2*2/(4*2) = 0.5 for both
    assert rep["random_expected"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="item universe"):
        cowatch_recall([11, 10, 12, 13, 14], codes, vec, g, k=2)


def test_bucket_genre_coherence_beats_random_for_genre_buckets():
    genres = [{"action", "shounen"}] * 30 + [{"romance", "drama"}] * 30 + [{"comedy"}] * 30
    first = np.repeat([0, 1, 2], 30)
    rep = bucket_genre_coherence(first, genres, sample_size=10, min_bucket=20, seed=1)
    assert rep["inspected_genre_jaccard"] == pytest.approx(1.0)
    assert rep["all_buckets_genre_jaccard"] == pytest.approx(1.0)
    assert rep["inspected_genre_jaccard_random"] < 0.6
    assert rep["buckets"] == 3 and rep["eligible_buckets"] == 3


# ---------------------------------------------------------------------------------------------
# in-process materialization on a tiny synthetic catalogue
N_ANIME, N_GENRES, DIM = 240, 8, 24
GENRES = ["Action", "Romance", "Comedy", "Drama", "Horror", "Sports", "Mecha", "Music"]


def _synthetic(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.arange(1, N_ANIME + 1) * 3
    genre = np.arange(N_ANIME) % N_GENRES
    centers = rng.normal(size=(N_GENRES, DIM))
    x = centers[genre] + 0.3 * rng.normal(size=(N_ANIME, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    prep = pl.DataFrame(
        {
            "anime_id": ids,
            "name": [f"Anime {i}" for i in ids],
            "english_name": [None] * N_ANIME,
            "title": [f"Anime {i}" for i in ids],
            "genres": [[GENRES[g], GENRES[(g + 1) % N_GENRES]] for g in genre],
        },
        schema_overrides={"english_name": pl.Utf8},
    )
    emb = pl.DataFrame(
        {
            "anime_id": ids,
            "embedding": pl.Series(x.tolist(), dtype=pl.Array(pl.Float32, DIM)),
            "dim": [DIM] * N_ANIME,
            "text_hash": ["h"] * N_ANIME,
            "model": ["synthetic"] * N_ANIME,
            "model_fingerprint": ["fp"] * N_ANIME,
        }
    )
    rows = []
    for user in range(120):  # each user completes ~12 anime of one genre, mostly liked
        g = user % N_GENRES
        pool = ids[genre == g]
        for a in rng.choice(pool, size=12, replace=False):
            rows.append((user, int(a), int(rng.integers(6, 11)), 2))
    u, a, s, st = map(list, zip(*rows))
    ui = pl.DataFrame({"user_id": u, "anime_id": a, "score": s, "status": st, "watched_episodes": [1] * len(u), "seq": [0] * len(u)})
    return prep, emb, ui


def _stubs(prep, emb, ui):
    @dg.asset(name="anime_prep", group_name="stub")
    def anime_prep_stub() -> pl.DataFrame:
        return prep

    @dg.asset(name="anime_embeddings", group_name="stub")
    def anime_embeddings_stub() -> pl.DataFrame:
        return emb

    @dg.asset(name="user_interactions", group_name="stub")
    def user_interactions_stub() -> pl.DataFrame:
        return ui

    return [anime_prep_stub, anime_embeddings_stub, user_interactions_stub]


def _resources(tmp_path: Path, mlflow_enabled: bool):
    from animind_assets.resources import AniMindDuckDBIOManager, ArtifactStoreResource, MlflowResource, ParquetExports

    return {
        "io_manager": AniMindDuckDBIOManager(database=str(tmp_path / "warehouse.duckdb"), schema="animind"),
        "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
        "exports": ParquetExports(root=str(tmp_path / "exports")),
        "mlflow": MlflowResource(
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            artifact_location=str(tmp_path / "mlartifacts"),
            enabled=mlflow_enabled,
        ),
    }


TINY_RQVAE = {
    "preset": "rqvae", "hidden_dims": [32], "latent_dim": 8, "levels": 3, "codebook_size": 16,
    "epochs": 3, "batch_size": 64, "warmup_steps": 2, "kmeans_iters": 5, "restart_window": 5,
}


@pytest.mark.slow
def test_materialize_rqvae_semantic_ids_report(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    from animind_assets.defs.semantic_ids.rqvae_model import rqvae_model
    from animind_assets.defs.semantic_ids.semantic_id_report import semantic_id_report
    from animind_assets.defs.semantic_ids.semantic_ids import semantic_ids

    prep, emb, ui = _synthetic()
    res = dg.materialize(
        [*_stubs(prep, emb, ui), rqvae_model, semantic_ids, semantic_id_report],
        resources=_resources(tmp_path, mlflow_enabled=True),
        run_config={
            "ops": {
                "rqvae_model": {"config": TINY_RQVAE},
                "semantic_ids": {"config": {"min_level_usage": 0.3}},
                "semantic_id_report": {"config": {"recall_k": 5, "recall_min_support": 3, "cluster_min_bucket": 5}},
            }
        },
    )
    assert res.success
    # rqvae_model: checkpoint at the deterministic path + metrics + MLflow run
    md = res.asset_materializations_for_node("rqvae_model")[0].metadata
    ckpt = tmp_path / "artifacts" / "rqvae_model" / "model.pt"
    assert ckpt.exists() and (tmp_path / "artifacts" / "rqvae_model" / "last.pt").exists()
    payload = torch.load(ckpt, weights_only=True)
    assert payload["kind"] == "rqvae" and payload["embedding_model"] == "synthetic"
    assert torch.equal(payload["item_ids"], torch.as_tensor(np.sort(prep["anime_id"].to_numpy())))
    for key in ("unique_fraction_before_disambiguation", "perplexity_l1", "usage_l3", "residual_norm_l2",
                "recon_loss", "commit_loss", "grad_norm", "train_samples_per_s", "mlflow_run_id", "loss_plot"):
        assert key in md, key
    assert md["epochs_completed"].value == 3

    # semantic_ids: table, checks, exports
    sid = res.output_for_node("semantic_ids")
    assert sid.height == N_ANIME and sid["semantic_id"].n_unique() == N_ANIME
    assert sid["semantic_id"][0].startswith("<L1_") and sid["semantic_id"][0].count("<L") == 4
    checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
    assert checks["every_anime_has_id"].passed and checks["ids_unique"].passed and checks["level_usage_floor"].passed
    assert "collision_rate_before_disambiguation" in checks
    out = tmp_path / "artifacts" / "semantic_ids"
    for name in ("semantic_ids.jsonl", "semantic_vocab.json", "special_tokens.json", "semantic_lookup.tsv", "semantic_id_to_anime.jsonl"):
        assert (out / name).exists(), name
    vocab = json.loads((out / "semantic_vocab.json").read_text())
    assert vocab["tokens"][:6] == DEFAULT_SPECIAL_TOKENS
    assert vocab["token_to_id"]["<L1_0>"] == 6
    first = json.loads((out / "semantic_ids.jsonl").read_text().splitlines()[0])
    assert set(first) == {"anime_id", "name", "english_name", "genres", "semantic_id", "tokens", "codes"}
    assert "".join(first["tokens"]) == first["semantic_id"]
    lookup = (out / "semantic_lookup.tsv").read_text().splitlines()
    assert lookup[0].split("\t") == ["anime_id", "name", "english_name", "semantic_id", "level_tokens_json", "codes_json"]
    assert len(lookup) == N_ANIME + 1
    assert (tmp_path / "exports" / "semantic_ids.parquet").exists()

    # semantic_id_report: recall of the three rankings + cluster coherence
    rep = res.output_for_node("semantic_id_report")
    by = {r["method"]: r for r in rep.iter_rows(named=True)}
    assert set(by) == {"semantic_id", "embedding_cosine", "random"}
    assert by["embedding_cosine"]["mean_recall"] > by["random"]["mean_recall"]
    assert by["semantic_id"]["mean_recall"] > by["random"]["mean_recall"]
    rmd = res.asset_materializations_for_node("semantic_id_report")[0].metadata
    assert rmd["genre_jaccard_all_buckets"].value > rmd["genre_jaccard_all_random"].value
    assert (tmp_path / "artifacts" / "semantic_id_report" / "recall_report.json").exists()

    # a missing embedding fails the blocking check and the report does not run; nothing new is written
    import hashlib

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    before = {p: digest(p) for p in [*out.iterdir(), tmp_path / "exports" / "semantic_ids.parquet"]}
    prep2 = pl.concat([prep, prep.head(1).with_columns(pl.lit(999_999, dtype=pl.Int64).alias("anime_id"))])
    res2 = dg.materialize(
        [*_stubs(prep2, emb, ui), semantic_ids, semantic_id_report],
        selection=["anime_prep", "anime_embeddings", "user_interactions", "semantic_ids", "semantic_id_report"],
        resources=_resources(tmp_path, mlflow_enabled=False),
        run_config={"ops": {"semantic_ids": {"config": {"min_level_usage": 0.3}}}},
        raise_on_error=False,
    )
    assert not res2.success
    checks2 = {c.check_name: c for c in res2.get_asset_check_evaluations()}
    assert not checks2["every_anime_has_id"].passed
    assert not res2.asset_materializations_for_node("semantic_id_report")
    assert not res2.asset_materializations_for_node("semantic_ids")
    assert {p: digest(p) for p in before} == before  # before issue 12: exports rewritten before the check failed
    assert sorted(out.iterdir()) == sorted(p for p in before if p.parent == out)


@pytest.mark.slow
def test_materialize_rqvae_variants_partition(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    from animind_assets.defs.semantic_ids.rqvae_variants import VARIANTS, rqvae_variants

    assert VARIANTS == ["default", "rqkmeans", "rqvae", "conservative", "aggressive"]
    prep, emb, ui = _synthetic(1)
    res = dg.materialize(
        [*_stubs(prep, emb, ui), rqvae_variants],
        selection=["anime_embeddings", "user_interactions", "rqvae_variants"],
        partition_key="default",
        resources=_resources(tmp_path, mlflow_enabled=False),
        run_config={"ops": {"rqvae_variants": {"config": {"codebook_size": 16, "kmeans_iters": 5, "recall_k": 5, "recall_min_support": 3}}}},
    )
    assert res.success
    md = res.asset_materializations_for_node("rqvae_variants")[0].metadata
    assert md["quantizer"].value == "rqkmeans" and md["preset"].value == "default"
    assert md["recall@5_semantic_id"].value > md["recall@5_random"].value
    assert (tmp_path / "artifacts" / "rqvae_variants" / "default" / "model.pt").exists()
    assert not (tmp_path / "artifacts" / "rqvae_model").exists()
