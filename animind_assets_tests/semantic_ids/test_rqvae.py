"""Quantizer library: k-means init, EMA update, restart rule, rotation trick, resume equivalence,
checkpoint round trip, presets, early stopping, dry run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from animind_assets.lib.semantic_ids.quantizers import (
    QuantizerConfig,
    load_checkpoint,
    load_quantizer,
    preset_config,
    save_checkpoint,
    train_quantizer,
)
from animind_assets.lib.semantic_ids.quantizers.codebook import Codebook, DeadCodeRestarter, EMAUpdate
from animind_assets.lib.semantic_ids.quantizers.kmeans import kmeans
from animind_assets.lib.semantic_ids.quantizers.modules import RotationTrick, StraightThrough
from animind_assets.lib.semantic_ids.quantizers.quantizer import ResidualQuantizer
from animind_assets.lib.semantic_ids.quantizers.trainer import encode_codes, lr_factor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clustered(n_clusters=16, per=40, dim=16, spread=0.05, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    x = np.concatenate([c + spread * rng.normal(size=(per, dim)) for c in centers]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def tiny_cfg(**kw) -> QuantizerConfig:
    base = dict(
        hidden_dims=[32], latent_dim=8, levels=3, codebook_size=16, batch_size=64, epochs=4,
        warmup_steps=2, restart_window=3, kmeans_iters=5, lr=3e-3, val_fraction=0.1, seed=7,
    )
    base.update(kw)
    return preset_config("rqvae", **base)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init,iters", [("kmeans++", 20), ("ward", 0)])
def test_kmeans_recovers_separated_clusters_and_inits_levels(init, iters):
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float32)
    labels = np.repeat(np.arange(4), 50)
    x = torch.tensor(centers[labels] + 0.1 * rng.normal(size=(200, 2)), dtype=torch.float32)
    res = kmeans(x, 4, iters=iters, seed=3, init=init, ward_neighbors=5)
    found = res.centroids.numpy()
    # every true centre has a centroid within 0.2, and clusters map one-to-one
    d = np.linalg.norm(found[:, None, :] - centers[None], axis=2)
    assert d.min(axis=0).max() < 0.2
    mapping = d.argmin(axis=1)
    assert sorted(mapping.tolist()) == [0, 1, 2, 3]
    assert np.array_equal(mapping[res.assignments.numpy()], labels)

    rq = ResidualQuantizer(levels=2, codebook_size=4, dim=2, seed=0)
    first = {"init": init, "iters": iters, "ward_neighbors": 5}
    inertias = rq.init_kmeans(x, iters=20, seed=3, first_level=first)
    assert torch.allclose(rq.codebook(0).embed, res.centroids)
    # level 2 is fitted on the level-1 residuals (small, centred at 0), not on the raw points
    assert rq.codebook(1).embed.abs().max() < 0.5
    assert inertias[1] < inertias[0]
    # EMA statistics restart from the k-means centroids
    assert torch.allclose(rq.codebook(0).ema_sum, res.centroids)
    assert torch.all(rq.codebook(0).ema_count == 1.0)


def test_kmeans_fewer_points_than_codes_keeps_k_rows():
    x = torch.randn(3, 4)
    res = kmeans(x, 8, seed=0)
    assert res.centroids.shape == (8, 4)
    assert res.inertia == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "eps,expected",
    [
        (0.0, [[1 / 3, 1 / 3], [1.5, 1.5]]),
        # smoothed N = (N + eps) / (sum N + K eps) * sum N = [1.6, 1.1] / 2.7 * 2.5
        (0.1, [[0.5 / (1.6 / 2.7 * 2.5)] * 2, [1.5 / (1.1 / 2.7 * 2.5)] * 2]),
    ],
)
def test_ema_update_hand_computed(eps, expected):
    cb = Codebook(2, 2, trainable=False)
    cb.set_vectors(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # N = [1, 1], S = e
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    codes = torch.tensor([0, 0, 1])  # n = [2, 1], sums = [[1, 1], [2, 2]]
    EMAUpdate(decay=0.5, eps=eps).update(cb, inputs, codes)
    assert torch.allclose(cb.ema_count, torch.tensor([1.5, 1.0]))  # 0.5*1 + 0.5*[2, 1]
    assert torch.allclose(cb.ema_sum, torch.tensor([[0.5, 0.5], [1.5, 1.5]]))
    assert torch.allclose(cb.embed, torch.tensor(expected), atol=1e-6)


def test_restart_rule_counts_usage_over_the_window():
    cb = Codebook(4, 2, trainable=False)
    init = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    cb.set_vectors(init)
    r = DeadCodeRestarter(window=3, min_usage=1)
    cand = torch.tensor([[9.0, 9.0], [8.0, 8.0], [7.0, 7.0], [6.0, 6.0]])
    g = torch.Generator().manual_seed(0)
    for codes in ([0, 1], [0, 2]):
        r.observe(cb, torch.tensor(codes))
        assert r.end_step(cb, cand, g) == 0  # window not complete: nothing restarted
    r.observe(cb, torch.tensor([0, 0]))  # codes 1 and 2 unused in this batch but used in the window
    assert r.end_step(cb, cand, g) == 1
    assert torch.equal(cb.embed[:3], init[:3])
    assert any(torch.equal(cb.embed[3], c) for c in cand)  # re-seeded from the candidates
    assert cb.ema_count[3] == 1.0 and torch.equal(cb.ema_sum[3], cb.embed[3])
    assert int(cb.window_steps) == 0 and float(cb.window_usage.sum()) == 0.0
    assert int(cb.restarts_total) == 1

    # a one-step window reproduces the original "unused in this batch" rule: 3 codes restarted
    cb2 = Codebook(4, 2, trainable=False)
    cb2.set_vectors(init)
    r1 = DeadCodeRestarter(window=1, min_usage=1)
    r1.observe(cb2, torch.tensor([0, 0]))
    assert r1.end_step(cb2, cand, g) == 3
    # distinct candidates are used while there are enough of them
    assert len({tuple(v.tolist()) for v in cb2.embed[1:]}) == 3


def test_straight_through_and_rotation_trick_gradients():
    z = torch.tensor([[1.0, 0.0]], requires_grad=True)
    zq = torch.tensor([[0.0, 2.0]])
    g = torch.tensor([[1.0, 0.0]])
    out = RotationTrick()(z, zq)
    assert torch.allclose(out, zq)
    out.backward(g)
    # lambda * R^T g with R the 90-degree rotation [[0,-1],[1,0]] and lambda = |zq| / |z| = 2
    assert torch.allclose(z.grad, torch.tensor([[0.0, -2.0]]), atol=1e-6)

    z2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    out2 = StraightThrough()(z2, zq)
    assert torch.allclose(out2, zq)
    out2.backward(g)
    assert torch.allclose(z2.grad, g)


def test_lr_schedule_warmup_then_cosine():
    cfg = tiny_cfg(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("update,estimator,optimizer", [("ema", "ste", "adamw"), ("gradient", "rotation", "adam")])
def test_resume_equivalence(tmp_path, update, estimator, optimizer):
    x = clustered()
    cfg = tiny_cfg(codebook_update=update, estimator=estimator, optimizer=optimizer, restart_min_usage=3.0)
    straight = train_quantizer(x, cfg, checkpoint_dir=tmp_path / "a")
    train_quantizer(x, cfg.replace(stop_after_epochs=2), checkpoint_dir=tmp_path / "b")
    first = load_checkpoint(tmp_path / "b" / "last.pt")
    assert first["epoch"] == 2 and not first["finished"]
    resumed = train_quantizer(x, cfg, checkpoint_dir=tmp_path / "b", resume="last")
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4 and a["global_step"] == b["global_step"]
    assert a["model_state"].keys() == b["model_state"].keys()
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    # restarts really happened (so their RNG/window state was part of what had to resume)
    assert sum(int(v) for k, v in a["model_state"].items() if k.endswith("restarts_total")) > 0
    assert np.array_equal(straight.codes, resumed.codes)
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3, 4]


def test_resume_refuses_other_inputs(tmp_path):
    x = clustered()
    train_quantizer(x, tiny_cfg(stop_after_epochs=1), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different input vectors"):
        train_quantizer(x[::-1].copy(), tiny_cfg(), checkpoint_dir=tmp_path, resume="last")
    with pytest.raises(FileNotFoundError):
        train_quantizer(x, tiny_cfg(), checkpoint_dir=tmp_path / "none", resume="best")


@pytest.mark.parametrize("preset", ["rqvae", "default", "rqkmeans"])
def test_checkpoint_round_trip(tmp_path, preset):
    x = clustered()
    cfg = tiny_cfg() if preset == "rqvae" else preset_config(preset, codebook_size=16, kmeans_iters=5)
    res = train_quantizer(x, cfg, checkpoint_dir=tmp_path, extra_payload={"item_ids": torch.arange(len(x))})
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert raw["kind"] == cfg.quantizer and raw["config"] == cfg.to_dict()
    assert torch.equal(raw["item_ids"], torch.arange(len(x)))
    assert raw["input_fingerprint"] == res.input_fingerprint
    assert raw["metrics"]["unique_fraction"] == pytest.approx(res.metrics["unique_fraction"])
    model, payload = load_quantizer(tmp_path / "model.pt")
    assert np.array_equal(encode_codes(model, x), res.codes)
    assert (tmp_path / "last.pt").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files behind


def test_load_rejects_foreign_files(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an AniMind quantizer checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    save_checkpoint({"kind": "rqvae", "x": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt")["x"], torch.ones(2))


@pytest.mark.parametrize("preset", ["rqvae", "default"])
def test_training_uses_codebooks_and_separates_items(preset):
    n_clusters, per = 32, 20
    x = clustered(n_clusters=n_clusters, per=per, dim=24, spread=0.15)
    if preset == "rqvae":
        cfg = tiny_cfg(epochs=20, lr=1e-2, input_norm="center", codebook_size=32, latent_dim=12, hidden_dims=[48])
    else:
        cfg = preset_config("default", codebook_size=32, kmeans_iters=10, ward_neighbors=5)
    res = train_quantizer(x, cfg)
    m = res.metrics
    for lv in (1, 2, 3):
        assert m[f"usage_l{lv}"] >= 0.9, m
        assert m[f"perplexity_l{lv}"] >= 20, m
    # the first level recovers the clusters: each cluster's members share one level-1 code
    first = res.codes[:, 0].reshape(n_clusters, per)
    purity = np.mean([np.bincount(row).max() / per for row in first])
    assert purity >= 0.95, purity
    assert len(np.unique(first[:, 0])) >= 0.9 * n_clusters
    assert m["unique_fraction"] > 0.7, m
    if preset == "rqvae":
        assert m["residual_norm_l1"] > m["residual_norm_l2"] > m["residual_norm_l3"]
        assert res.history and all(math.isfinite(h["train_loss"]) for h in res.history)
    assert res.samples_per_s > 0


def test_shared_codebook_and_adagrad_run():
    x = clustered()
    res = train_quantizer(x, tiny_cfg(shared_codebook=True, optimizer="adagrad", epochs=2, grad_accum_steps=2))
    assert len(res.model.quantizer.codebooks) == 1
    assert res.codes.shape == (len(x), 3) and res.codes.max() < 16


def test_early_stopping_and_dry_run():
    x = clustered()
    cfg = tiny_cfg(codebook_update="gradient", lr=0.0, warmup_steps=0, restart_dead_codes=False,
                   early_stopping_patience=1, epochs=10)
    res = train_quantizer(x, cfg)
    assert res.stopped_early and res.metrics["epochs_completed"] == 2

    dry = train_quantizer(x, tiny_cfg(dry_run=True, dry_run_rows=50, epochs=9, dry_run_epochs=1))
    assert dry.codes.shape[0] == 50 and dry.metrics["epochs_completed"] == 1


def test_presets_match_original_configs():
    cons, aggr = preset_config("conservative"), preset_config("aggressive")
    for c in (cons, aggr):
        assert (c.levels, c.codebook_size, c.latent_dim, c.hidden_dims, c.shared_codebook) == (8, 2048, 256, [1024], True)
        assert c.optimizer == "adam" and c.adam_betas == [0.5, 0.9] and c.codebook_update == "ema"
    assert (cons.lr, cons.beta, cons.ema_decay, cons.batch_size, cons.epochs, cons.warmup_steps) == (2.5e-5, 0.20, 0.995, 192, 60, 3000)
    assert (aggr.lr, aggr.beta, aggr.ema_decay, aggr.batch_size, aggr.epochs, aggr.warmup_steps) == (6e-5, 0.35, 0.98, 320, 30, 800)
    d = preset_config("default")
    assert (d.quantizer, d.levels, d.codebook_size, d.first_level_init, d.normalize_residuals) == ("rqkmeans", 3, 256, "ward", True)
    r = preset_config("rqvae")  # TIGER-like RQ-VAE
    assert (r.quantizer, r.levels, r.codebook_size, r.latent_dim, r.hidden_dims, r.codebook_update) == ("rqvae", 3, 256, 32, [256, 128], "ema")
    assert preset_config("rqkmeans").first_level_init == "kmeans++"
    with pytest.raises(ValueError, match="unknown quantizer preset"):
        preset_config("nope")
    with pytest.raises(ValueError, match="codebook_update"):
        preset_config("default", codebook_update="magic")
