"""Stable semantic IDs (issue 13 item 3) and small catalogs (issue 12 rule 9).

Library: ``stable_assign`` keeps full IDs, gives new/changed items the next free disambiguation
index, reserves retired IDs; ``decide_refit`` / drift; small-catalog adaptation.
Dagster: rqvae_model -> semantic_ids rebuilt after 3 changed embeddings keeps every other ID and
says so; a rebuild without changes keeps the data version; refit on request; drift threshold;
100 items with 3 x 256 codes.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import dagster as dg

from animind_assets.lib.semantic_ids.quantizers import QuantizerConfig, preset_config, train_quantizer
from animind_assets.lib.semantic_ids.quantizers.config import small_catalog_codebook
from animind_assets.lib.semantic_ids.stable import DriftThresholds, config_changes, decide_refit, drift_from_codes, fit_reference, model_fingerprint, quantizer_code_fingerprint, vector_hashes
from animind_assets.lib.semantic_ids.id_registry import id_space_version, stable_assign

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# library
def _hashes(n, tag="v"):
    return [f"{tag}{i}" for i in range(n)]


def test_stable_assign_keeps_ids_and_gives_next_free_index():
    ids = [10, 20, 30, 40]
    codes = np.array([[1, 2], [1, 2], [3, 4], [5, 6]])
    first = stable_assign(ids, codes, _hashes(4), "q1", None)
    assert first.mode == "initial" and first.counts["added"] == 4
    assert first.full.tolist() == [[1, 2, 0], [1, 2, 1], [3, 4, 0], [5, 6, 0]]

    # item 10 (index 0 in group (1,2)) is removed, item 50 is new in the same group, item 40 moved
    # into that group, item 30's vector changed but it encodes to the same codes -> keeps its ID
    ids2 = [20, 30, 40, 50]
    codes2 = np.array([[1, 2], [3, 4], [1, 2], [1, 2]])
    hashes2 = ["v1", "changed", "changed", "new"]
    a = stable_assign(ids2, codes2, hashes2, "q1", first.registry)
    full = {i: row for i, row in zip(ids2, a.full.tolist())}
    assert full[20] == [1, 2, 1]  # kept, disambiguation index included
    assert full[30] == [3, 4, 0]  # vector changed, same codes: kept
    # 10's ID (1,2,0) is retired, so new/changed items in (1,2) get 2 and 3 (ascending item id)
    assert full[40] == [1, 2, 2] and full[50] == [1, 2, 3]
    assert a.counts == {"kept": 2, "changed": 1, "added": 1, "removed": 1, "retired": 2, "reencoded_same_codes": 1}
    assert a.changed_ids == [40] and a.added_ids == [50] and a.removed_ids == [10]
    assert len({tuple(r) for r in a.full.tolist()}) == 4

    # release_removed frees retired IDs: the next new item in (1,2) takes index 0 again
    b = stable_assign([20, 60], np.array([[1, 2], [1, 2]]), ["v1", "x"], "q1", first.registry, release_removed=True)
    assert b.full.tolist() == [[1, 2, 1], [1, 2, 0]]

    # a different quantizer: everything assigned afresh, counts compare with the previous IDs
    c = stable_assign(ids2, codes2, hashes2, "q2", a.registry)
    assert c.mode == "reassigned" and c.counts["retired"] == 0
    assert c.full.tolist() == [[1, 2, 0], [3, 4, 0], [1, 2, 1], [1, 2, 2]]
    assert c.counts["kept"] == 1 and c.counts["changed"] == 3  # only 30 keeps (3,4,0)


def test_unchanged_vectors_keep_ids_even_if_codes_would_differ():
    # the vector hash decides first: an unchanged item is never re-keyed by a numerically different encode
    first = stable_assign([1, 2], np.array([[0, 0], [0, 1]]), ["a", "b"], "q", None)
    again = stable_assign([1, 2], np.array([[0, 0], [0, 0]]), ["a", "b"], "q", first.registry)
    assert again.full.tolist() == first.full.tolist() and not again.ids_changed


def test_id_space_version_tracks_ids_and_vocab():
    v = id_space_version([1, 2], ["<L1_0>", "<L1_1>"], [4, 1])
    assert v == id_space_version([2, 1], ["<L1_1>", "<L1_0>"], [4, 1])
    assert v != id_space_version([1, 2], ["<L1_0>", "<L1_2>"], [4, 1])
    assert v != id_space_version([1, 2], ["<L1_0>", "<L1_1>"], [4, 2])


def test_decide_refit_reasons_and_drift():
    cfg = preset_config("rqkmeans", codebook_size=8, levels=2).to_dict()
    codes = np.array([[0, 1], [1, 2], [2, 3], [3, 0]] * 5)
    ref = fit_reference(codes, 0.10, 8, cfg)
    payload = {"finished": True, "input_dim": 4, "fit_reference": ref, "config": cfg}
    keep = decide_refit(payload, cfg, input_dim=4, drift=drift_from_codes(ref, codes, 0.10, 8))
    assert not keep.refit and "kept" in keep.summary
    assert decide_refit(payload, cfg, input_dim=4, refit_requested=True).reasons == ["refit requested (config refit: true)"]
    assert decide_refit(None, cfg, input_dim=4).refit
    assert "unfinished" in decide_refit({**payload, "finished": False}, cfg, input_dim=4).summary
    changed = dict(cfg, codebook_size=16)
    d = decide_refit(payload, changed, input_dim=4)
    assert d.refit and "codebook_size 8 -> 16" in d.summary
    # threads/device do not change the fitted model
    assert not config_changes(cfg, dict(cfg, num_threads=7, device="cpu"))
    assert decide_refit(payload, cfg, input_dim=8).refit
    old_code = {**payload, "fit_reference": {**ref, "code_fingerprint": "0" * 16}}
    assert "quantizer code changed" in decide_refit(old_code, cfg, input_dim=4).summary
    assert len(quantizer_code_fingerprint()) == 16
    # drift: error +50 % and a moved code distribution
    moved = np.array([[0, 1]] * 20)
    dr = drift_from_codes(ref, moved, 0.15, 8)
    assert dr.recon_increase == pytest.approx(0.5)
    assert dr.usage_shift == pytest.approx(0.75)
    d = decide_refit(payload, cfg, input_dim=4, drift=dr, thresholds=DriftThresholds(0.25, 0.9))
    assert d.refit and "reconstruction error" in d.summary and "+50.0%" in d.summary
    d = decide_refit(payload, cfg, input_dim=4, drift=dr, thresholds=DriftThresholds(0.0, 0.5))
    assert d.refit and "usage shift 0.750" in d.summary
    assert not decide_refit(payload, cfg, input_dim=4, drift=dr, thresholds=DriftThresholds(0.0, 0.0)).refit


def test_model_fingerprint_and_vector_hashes():
    import torch

    a = {"w": torch.ones(2, 2)}
    assert model_fingerprint(a) == model_fingerprint({"w": torch.ones(2, 2)})
    assert model_fingerprint(a) != model_fingerprint({"w": torch.ones(2, 2) * 2})
    x = np.eye(3, dtype=np.float32)
    h = vector_hashes(x)
    assert len(set(h)) == 3 and h == vector_hashes(x.copy())


def test_small_catalog_adapts_or_refuses():
    assert small_catalog_codebook(1000, 256) == (256, "")
    k, note = small_catalog_codebook(100, 256)
    assert k == 25 and "100 items < codebook_size 256" in note
    with pytest.raises(ValueError, match="100 items < codebook_size 256"):
        small_catalog_codebook(100, 256, "refuse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 16)).astype(np.float32)
    res = train_quantizer(x, preset_config("default", kmeans_iters=5))
    assert res.config.codebook_size == 25 and res.metrics["requested_codebook_size"] == 256
    for lv in range(3):  # every level uses (nearly) all of min(N, K_fit) codes
        assert len(np.unique(res.codes[:, lv])) >= 0.8 * 25
    with pytest.raises(ValueError, match="100 items < codebook_size 256"):
        train_quantizer(x, preset_config("default", small_catalog="refuse"))
    with pytest.raises(ValueError, match="small_catalog"):
        QuantizerConfig(small_catalog="shrink").validate()


# ---------------------------------------------------------------------------------------------
# Dagster: rebuilds
N, DIM = 400, 16


def _catalog(seed: int = 0, n: int = N):
    rng = np.random.default_rng(seed)
    ids = np.arange(1, n + 1) * 7
    centers = rng.normal(size=(12, DIM))
    x = centers[np.arange(n) % 12] + 0.35 * rng.normal(size=(n, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return ids, x


def _frames(ids, x):
    prep = pl.DataFrame({"anime_id": ids, "name": [f"A{i}" for i in ids], "title": [f"A{i}" for i in ids]})
    emb = pl.DataFrame(
        {
            "anime_id": ids,
            "embedding": pl.Series(x.tolist(), dtype=pl.Array(pl.Float32, x.shape[1])),
            "dim": [x.shape[1]] * len(ids),
            "model": ["synthetic"] * len(ids),
        }
    )
    return prep, emb


def _run(tmp_path, ids, x, rq_cfg=None, sid_cfg=None, raise_on_error=True):
    from animind_assets.defs.semantic_ids.rqvae_model import rqvae_model
    from animind_assets.defs.semantic_ids.semantic_ids import semantic_ids
    from animind_assets.resources import AniMindDuckDBIOManager, ArtifactStoreResource, MlflowResource, ParquetExports

    prep, emb = _frames(ids, x)

    @dg.asset(name="anime_prep")
    def prep_stub() -> pl.DataFrame:
        return prep

    @dg.asset(name="anime_embeddings")
    def emb_stub() -> pl.DataFrame:
        return emb

    resources = {
        "io_manager": AniMindDuckDBIOManager(database=str(tmp_path / "w.duckdb"), schema="animind"),
        "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
        "exports": ParquetExports(root=str(tmp_path / "exports")),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", enabled=False),
    }
    res = dg.materialize(
        [prep_stub, emb_stub, rqvae_model, semantic_ids],
        resources=resources,
        run_config={"ops": {"rqvae_model": {"config": {"preset": "default", "codebook_size": 16, "kmeans_iters": 5, **(rq_cfg or {})}},
                            "semantic_ids": {"config": {"min_level_usage": 0.3, **(sid_cfg or {})}}}},
        raise_on_error=raise_on_error,
    )
    return res


def _ids(res) -> dict[int, str]:
    df = res.output_for_node("semantic_ids")
    return dict(zip(df["anime_id"].to_list(), df["semantic_id"].to_list()))


def _md(res, node):
    return {k: v.value for k, v in res.asset_materializations_for_node(node)[0].metadata.items()}


def _version(res, node):
    return res.asset_materializations_for_node(node)[0].tags.get("dagster/data_version")


def test_rebuild_keeps_ids_of_unchanged_items(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    ids, x = _catalog()
    r1 = _run(tmp_path, ids, x)
    m1 = _md(r1, "rqvae_model")
    assert m1["fit_action"] == "refit" and "no fitted quantizer" in m1["fit_reason"]
    s1 = _md(r1, "semantic_ids")
    assert s1["assignment_mode"] == "initial" and s1["ids_added"] == N and s1["dagster/row_count"] == N
    ids1 = _ids(r1)
    schema = r1.asset_materializations_for_node("semantic_ids")[0].metadata["dagster/column_schema"].value
    assert all(c.description for c in schema.columns), [c.name for c in schema.columns if not c.description]
    assert "usage_plot_inline" in s1 and len(s1["usage_plot_inline"]) < 1000

    # same inputs again: quantizer kept, every ID kept, data versions unchanged -> downstream fresh
    r2 = _run(tmp_path, ids, x)
    m2 = _md(r2, "rqvae_model")
    assert m2["fit_action"] == "kept" and m2["drift_recon_increase"] == pytest.approx(0.0, abs=1e-6)
    s2 = _md(r2, "semantic_ids")
    assert (s2["ids_kept"], s2["ids_changed"], s2["ids_added"], s2["ids_removed"]) == (N, 0, 0, 0)
    assert _version(r2, "semantic_ids") == _version(r1, "semantic_ids")
    assert _version(r2, "rqvae_model") == _version(r1, "rqvae_model")
    assert "unchanged" in s2["downstream_effect"]

    # 3 changed texts (vectors moved to other clusters), 2 new anime, 1 removed
    rng = np.random.default_rng(5)
    x3 = x.copy()
    changed_rows = [3, 50, 201]
    for r in changed_rows:
        x3[r] = x[(r + 5) % N]
    new_ids = np.array([9001, 9002])
    ids3 = np.concatenate([ids[1:], new_ids])
    x3 = np.concatenate([x3[1:], x[[10, 11]] + 0.001 * rng.normal(size=(2, DIM)).astype(np.float32)])
    r3 = _run(tmp_path, ids3, x3)
    m3 = _md(r3, "rqvae_model")
    assert m3["fit_action"] == "kept", m3["fit_reason"]
    s3 = _md(r3, "semantic_ids")
    ids3_map = _ids(r3)
    changed = {int(ids[r]) for r in changed_rows}
    for aid, sid in ids3_map.items():
        if aid not in changed and aid in ids1:
            assert sid == ids1[aid], aid  # every untouched anime keeps its full ID
    assert s3["ids_added"] == 2 and s3["ids_removed"] == 1
    assert s3["ids_changed"] + s3["ids_kept"] == N - 1 and s3["ids_changed"] <= 3
    assert s3["ids_kept"] >= N - 1 - 3
    assert s3["assignment_mode"] == "incremental"
    assert len(set(ids3_map.values())) == len(ids3_map)
    # new anime never take a retired ID (the removed anime's ID stays reserved)
    assert ids1[int(ids[0])] not in ids3_map.values()
    assert _version(r3, "semantic_ids") != _version(r2, "semantic_ids")
    assert "stale" in s3["downstream_effect"]
    checks = {c.check_name: c for c in r3.get_asset_check_evaluations()}
    assert checks["ids_unique"].passed and checks["every_anime_has_id"].passed

    # refit on request: a new quantizer, IDs assigned afresh, reason stated
    r4 = _run(tmp_path, ids3, x3, rq_cfg={"refit": True, "seed": 7})
    assert _md(r4, "rqvae_model")["fit_action"] == "refit"
    assert "refit requested" in _md(r4, "rqvae_model")["fit_reason"]
    s4 = _md(r4, "semantic_ids")
    assert s4["assignment_mode"] == "reassigned" and "quantizer refit" in s4["id_change_reason"]

    # a config change refits too
    r5 = _run(tmp_path, ids3, x3, rq_cfg={"seed": 8})
    assert _md(r5, "rqvae_model")["fit_action"] == "refit" and "seed 7 -> 8" in _md(r5, "rqvae_model")["fit_reason"]


def test_drift_threshold_triggers_refit(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    ids, x = _catalog(1)
    _run(tmp_path, ids[:200], x[:200])
    # the catalog doubles: the code distribution moves; a tight usage threshold asks for a refit
    loose = _run(tmp_path, ids, x, rq_cfg={"max_usage_shift": 0.0, "max_recon_increase": 0.0})
    m = _md(loose, "rqvae_model")
    assert m["fit_action"] == "kept" and m["drift_items_now"] == N and m["drift_items_fit"] == 200
    tight = _run(tmp_path, ids, x, rq_cfg={"max_usage_shift": 1e-4})
    m = _md(tight, "rqvae_model")
    assert m["fit_action"] == "refit" and "drift: code usage shift" in m["fit_reason"], m["fit_reason"]


def test_dry_run_keeps_the_published_quantizer_version(tmp_path, monkeypatch):
    """A dry run writes to rqvae_model/dry_run and leaves model.pt alone, so rqvae_model keeps the
    published quantizer's fingerprint as its data version (the automation sees no new quantizer)."""
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    ids, x = _catalog(1)
    first = _run(tmp_path, ids[:200], x[:200])
    dry = _run(tmp_path, ids[:200], x[:200], rq_cfg={"dry_run": True})
    assert _version(dry, "rqvae_model") == _version(first, "rqvae_model")
    assert _version(dry, "semantic_ids") == _version(first, "semantic_ids")


def test_small_catalog_materializes_and_usage_is_judged_against_min_n_k(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    ids, x = _catalog(2, n=100)
    res = _run(tmp_path, ids, x, rq_cfg={"codebook_size": 256}, sid_cfg={"min_level_usage": 0.5})
    m = _md(res, "rqvae_model")
    assert m["codebook_size"] == 25 and m["requested_codebook_size"] == 256
    s = _md(res, "semantic_ids")
    assert s["usable_codes_per_level"] == 25
    checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
    assert checks["level_usage_floor"].passed, checks["level_usage_floor"].metadata
    bad = _run(tmp_path, ids, x, rq_cfg={"codebook_size": 256, "small_catalog": "refuse", "refit": True}, raise_on_error=False)
    assert not bad.success
    msgs = " ".join(str(e.event_specific_data.error) for e in bad.all_events if e.is_step_failure)
    assert "100 items < codebook_size 256" in msgs


def test_drift_against_a_degenerate_fit_says_so_instead_of_an_absurd_percentage():
    """A quantizer fitted on collapsed vectors has a ~0 reconstruction error; drift against it is reported as
    degenerate (refit), not as "+1466236855545886464.0 %"."""
    from animind_assets.lib.semantic_ids.stable import DriftReport

    report = DriftReport(items_fit=150, items_now=150, recon_fit=2.42e-19, recon_now=0.003548, usage_shift_per_level=[0.0])
    reasons = report.exceeded(DriftThresholds())
    assert len(reasons) == 1 and "degenerate" in reasons[0] and "%" not in reasons[0], reasons
    healthy = DriftReport(items_fit=150, items_now=150, recon_fit=0.0030, recon_now=0.0031, usage_shift_per_level=[0.01])
    assert healthy.exceeded(DriftThresholds()) == []
