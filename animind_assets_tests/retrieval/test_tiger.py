"""TIGER: semantic-ID codec, leave-one-out split, constrained decoding never emits an invalid ID (tiny
random T5, many prompts), ranking metrics on hand-made rankings, train -> checkpoint -> resume, and a
tiny in-process train -> eval run of the Dagster assets (beauty_items -> ... -> tiger_eval)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from animind_assets.lib.common.metrics import ranking_metrics
from animind_assets.lib.retrieval.tiger import (
    EOS_ID,
    PAD_ID,
    Examples,
    SidCodec,
    TigerConfig,
    build_model,
    evaluate,
    generate_rankings,
    leave_one_out,
    load_model,
    popularity_metrics,
    popularity_rankings,
    save_model,
    train_tiger,
)

TINY = dict(d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=1, num_decoder_layers=1, dropout=0.0, num_threads=1, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def random_codec(n_items: int = 60, levels: int = 3, size: int = 6, seed: int = 0) -> SidCodec:
    rng = np.random.default_rng(seed)
    tuples: set[tuple[int, ...]] = set()
    while len(tuples) < n_items:
        tuples.add(tuple(int(x) for x in rng.integers(0, size, levels)))
    ids = rng.permutation(1000)[:n_items] + 5  # non-contiguous item ids
    return SidCodec.from_mapping({int(i): list(t) for i, t in zip(ids, sorted(tuples))})


# ------------------------------------------------------------------------------------------ codec
def test_codec_round_trip_and_validation():
    codec = SidCodec.from_mapping({10: [0, 1, 0], 11: [0, 1, 1], 12: [2, 0, 0]})
    assert codec.level_sizes == [3, 2, 2] and codec.offsets == [2, 5, 7] and codec.vocab_size == 9
    assert codec.target_tokens(11) == [2, 6, 8, EOS_ID]
    assert codec.decode([PAD_ID, 2, 6, 8, EOS_ID]) == 11
    assert codec.decode([2, 6, 8]) == 11
    assert codec.decode([2, 6, 7, EOS_ID]) == 10
    assert codec.decode([4, 6, 8, EOS_ID]) is None  # (2, 1, 1) is no item
    assert codec.decode([2, 6]) is None  # too short
    assert codec.decode([2, 6, 8, 3]) is None  # junk after the ID
    assert codec.encoder_tokens([12, 10]) == [4, 5, 7, 2, 6, 7]
    assert SidCodec.from_dict(json.loads(json.dumps(codec.to_dict()))).to_dict() == codec.to_dict()
    with pytest.raises(ValueError, match="not unique"):
        SidCodec.from_mapping({1: [0, 0], 2: [0, 0]})
    with pytest.raises(ValueError, match="same length"):
        SidCodec.from_mapping({1: [0, 0], 2: [0, 0, 1]})
    users = SidCodec.from_mapping({1: [0], 2: [1]}, user_buckets=4)
    assert users.vocab_size == 2 + 2 + 4 and 4 <= users.user_token(123) < 8


def test_leave_one_out_split():
    split = leave_one_out({7: [1, 2, 3, 4, 5], 8: [9, 8, 7], 9: [1, 2]}, max_history=2)
    assert split.skipped_users == 1
    train = [(int(u), h.tolist(), int(t)) for u, h, t in zip(split.train.users, split.train.histories, split.train.targets)]
    assert train == [(7, [1], 2), (7, [1, 2], 3)]  # prefixes of seq[:-2]; user 8 has a 1-item head
    assert [(h.tolist(), int(t)) for h, t in zip(split.valid.histories, split.valid.targets)] == [([2, 3], 4), ([9], 8)]
    assert [(h.tolist(), int(t)) for h, t in zip(split.test.histories, split.test.targets)] == [([3, 4], 5), ([9, 8], 7)]
    assert split.train_sequences == {7: [1, 2, 3], 8: [9]}


# ------------------------------------------------------------------------------ constrained decoding
def test_constrained_beam_search_never_emits_an_invalid_id():
    codec = random_codec()
    model = build_model(codec, TigerConfig(**TINY, seed=3))
    with torch.no_grad():  # a random model with a strong bias towards tokens that make invalid IDs
        model.lm_head.weight.mul_(20.0)
    rng = np.random.default_rng(1)
    items = codec.item_ids.tolist()
    ex = Examples(
        np.arange(120),
        [np.asarray(rng.choice(items, size=int(rng.integers(1, 8)))) for _ in range(120)],
        np.asarray(rng.choice(items, size=120)),
    )
    rankings, counts = generate_rankings(model, codec, ex, k=10, beams=12, batch_size=32, constrained=True)
    assert counts["sequences"] == 120 * 10
    assert counts["invalid"] == 0
    valid = set(items)
    assert all(len(r) == 10 and set(r) <= valid for r in rankings)
    # the same model decoding without the trie does invent IDs: the constraint is what keeps them valid
    _, free = generate_rankings(model, codec, ex.subset(range(40)), k=10, beams=12, batch_size=40, constrained=False)
    assert free["invalid"] > 0
    with pytest.raises(ValueError, match="beams"):
        generate_rankings(model, codec, ex, k=10, beams=5)


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_on_hand_made_rankings():
    rankings = [[3, 1, 2, 9, 8], [5, 6, 7, 1, 2], [4, 4, 0, 2, 1], [1, 2, 3, 4, 5]]
    targets = [1, 2, 0, 6]
    m = ranking_metrics(rankings, targets, ks=(1, 2, 5))
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx(2 / 4)  # user 0 (rank 2) and user 2 (rank 2 after dedup)
    assert m["recall@5"] == pytest.approx(3 / 4)  # user 1 at rank 5; user 3 never
    expected_ndcg5 = (1 / np.log2(3) + 1 / np.log2(6) + 1 / np.log2(3) + 0) / 4
    assert m["ndcg@5"] == pytest.approx(expected_ndcg5)
    assert m["ndcg@2"] == pytest.approx((2 / np.log2(3)) / 4)
    assert popularity_rankings({1: [5, 6, 6], 2: [7, 7, 6]}, k=3) == [6, 7, 5]


# ---------------------------------------------------------------------------------- train / resume
def cyclic_sequences(n_users: int = 200, n_items: int = 60, seed: int = 0) -> dict[int, list[int]]:
    """Every user walks the item cycle i -> i+1 from a random start: next item = last item + 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for u in range(n_users):
        start, length = int(rng.integers(0, n_items)), int(rng.integers(5, 9))
        out[u] = [(start + t) % n_items for t in range(length)]
    return out


def cyclic_codec(n_items: int = 60) -> SidCodec:
    return SidCodec.from_mapping({i: [i // 12, (i // 3) % 4, i % 3] for i in range(n_items)})


def test_bf16_training_on_a_cpu_without_amx_logs_a_warning(monkeypatch):
    """TigerConfig.bf16 on a CPU without AMX-BF16 trains (autocast) and says it is slower there; float32 says nothing."""
    import animind_assets.lib.common.device as device_mod

    monkeypatch.setattr(device_mod, "cpu_info", lambda *a, **k: {
        "model": "Test Xeon", "cpus": 2, "extensions": ["AVX2", "AVX512-BF16"], "missing": ["AMX-BF16"]})
    split = leave_one_out(cyclic_sequences(n_users=20), max_history=5)
    for bf16 in (True, False):
        lines: list[str] = []
        cfg = TigerConfig(**TINY, batch_size=16, epochs=1, max_steps=2, val_users=5, val_beams=10, patience=0, bf16=bf16)
        result = train_tiger(split, cyclic_codec(), cfg, log=lines.append)
        assert result.steps == 2
        warnings = [line for line in lines if line.startswith("warning: tiger: bf16 autocast on a CPU without AMX-BF16")]
        assert len(warnings) == (1 if bf16 else 0), lines
        assert not bf16 or "Test Xeon" in warnings[0]


@pytest.mark.slow
def test_train_learns_checkpoints_and_resumes(tmp_path):
    split = leave_one_out(cyclic_sequences(), max_history=5)
    codec = cyclic_codec()
    cfg = TigerConfig(**{**TINY, "d_model": 48, "d_ff": 96}, batch_size=32, lr=1e-2, warmup_steps=10, epochs=100,
                      max_steps=60, eval_every_steps=30, val_users=0, val_beams=10, patience=0)
    ckpt = tmp_path / "ckpt"
    first = train_tiger(split, codec, cfg, checkpoint_dir=str(ckpt), fingerprint="fp")
    assert first.steps == 60 and (ckpt / "last.pt").exists() and (ckpt / "best.pt").exists()
    assert [h["step"] for h in first.history] == [30.0, 60.0]
    assert not list(ckpt.glob(".*tmp*"))  # atomic writes leave no temp files
    # a finished run is reused; with a larger budget it resumes where it stopped
    cfg2 = TigerConfig(**{**cfg.to_dict(), "max_steps": 150})
    torch.save({**torch.load(ckpt / "last.pt", weights_only=True), "finished": False}, ckpt / "last.pt")
    second = train_tiger(split, codec, cfg2, checkpoint_dir=str(ckpt), fingerprint="fp")
    assert second.resumed_from and second.steps == 150
    assert [h["step"] for h in second.history][:2] == [30.0, 60.0] and second.history[-1]["step"] == 150.0
    # other data/config: the checkpoint is ignored, training starts over
    third = train_tiger(split, codec, TigerConfig(**{**cfg.to_dict(), "max_steps": 30}), checkpoint_dir=str(ckpt / "other"), fingerprint="other")
    assert third.resumed_from is None and third.steps == 30

    test = evaluate(second.model, codec, split.test, ks=(1, 10), beams=10)
    pop = popularity_metrics(split, ks=(1, 10))
    assert test["invalid_id_rate"] == 0.0
    assert test["recall@10"] > 0.6 and pop["recall@10"] < 0.25, (test, pop)  # the cycle is learned (60 items)
    save_model(second.model, codec, cfg2, str(tmp_path / "model"), extra={"best": second.best})
    model, codec2, cfg3, extra = load_model(str(tmp_path / "model"))
    assert codec2.to_dict() == codec.to_dict() and cfg3.max_steps == 150 and "best" in extra
    again = evaluate(model, codec2, split.test, ks=(1, 10), beams=10)
    assert again["recall@10"] == pytest.approx(test["recall@10"])


# ---------------------------------------------------------------------------------- assets, in-process
def write_cyclic_prepared(folder: Path, n_items: int = 60) -> Path:
    folder.mkdir(parents=True)
    words = ["rose", "lip", "balm", "nail", "polish", "shave", "gel", "hair", "spray", "eye", "liner", "mask"]
    rows = ["item_id,asin,text"] + [f"{i},A{i:04d},{words[i % 12]} {words[(i // 2) % 12]} no {i}" for i in range(n_items)]
    (folder / "items.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "inter.json").write_text(json.dumps({str(u): s for u, s in cyclic_sequences(n_items=n_items).items()}), encoding="utf-8")
    index = {str(i): list(c) for i, c in zip(cyclic_codec(n_items).item_ids.tolist(), cyclic_codec(n_items).codes.tolist())}
    (folder / "index_rqvae.json").write_text(json.dumps(index), encoding="utf-8")
    return folder


@pytest.mark.slow
def test_tiger_assets_train_and_eval_in_process(tmp_path, animind_env):
    from animind_assets.defs.beauty.beauty_embeddings import beauty_embeddings
    from animind_assets.defs.beauty.beauty_interactions import beauty_interactions
    from animind_assets.defs.beauty.beauty_items import beauty_items
    from animind_assets.defs.beauty.beauty_semantic_ids import beauty_semantic_ids
    from animind_assets.defs.beauty.tiger_eval import tiger_eval
    from animind_assets.defs.beauty.tiger_model import tiger_model
    from animind_assets.resources import (
        AniMindDuckDBIOManager,
        ArtifactStoreResource,
        DuckDBWarehouse,
        MlflowResource,
        ParquetExports,
    )

    folder = write_cyclic_prepared(tmp_path / "beauty")
    db = str(animind_env / "animind.duckdb")
    resources = {
        "io_manager": AniMindDuckDBIOManager(database=db, schema="main"),
        "warehouse": DuckDBWarehouse(database=db, schema="main"),
        "artifacts": ArtifactStoreResource(root=str(animind_env / "artifacts")),
        "exports": ParquetExports(root=str(animind_env / "exports")),
        "mlflow": MlflowResource(enabled=False),
    }
    src = {"source": "prepared", "prepared_dir": str(folder)}
    model_cfg = {**{k: v for k, v in TINY.items()}, "d_model": 48, "d_ff": 96, "batch_size": 32, "lr": 1e-2, "warmup_steps": 10,
                 "max_steps": 150, "eval_every_steps": 50, "val_users": 0, "val_beams": 10, "patience": 0,
                 "reference_index_path": str(folder / "index_rqvae.json")}
    instance = dg.DagsterInstance.ephemeral()
    everything = [beauty_items, beauty_interactions, beauty_embeddings, beauty_semantic_ids, tiger_model, tiger_eval]
    upstream = dg.materialize(
        everything, selection=[beauty_items, beauty_interactions, beauty_embeddings, beauty_semantic_ids],
        resources=resources,
        instance=instance,
        run_config={"ops": {
            "beauty_items": {"config": src},
            "beauty_interactions": {"config": src},
            "beauty_embeddings": {"config": {"batch_size": 32}},
            "beauty_semantic_ids": {"config": {"preset": "rqkmeans", "levels": 2, "codebook_size": 4, "num_threads": 1}},
        }},
    )
    assert upstream.success
    sids = resources["warehouse"].read_table("beauty_semantic_ids")
    assert sids.height == 60 and sids["semantic_id"].n_unique() == 60
    for part in ("reference", "own"):
        res = dg.materialize(
            everything, selection=[tiger_model], partition_key=part,
            resources=resources, instance=instance, run_config={"ops": {"tiger_model": {"config": model_cfg}}},
        )
        assert res.success
        md = res.asset_materializations_for_node("tiger_model")[0].metadata
        assert md["id_source"].value == part and md["steps"].value == 150
        assert (animind_env / "artifacts" / "tiger_model" / part / "model" / "codec.json").exists()
        assert (animind_env / "artifacts" / "tiger_model" / part / "checkpoints" / "last.pt").exists()
    ev = dg.materialize(
        everything, selection=[tiger_eval], resources=resources, instance=instance,
        run_config={"ops": {"tiger_eval": {"config": {"beams": 10, "unconstrained_users": 20, "num_threads": 1}}}},
    )
    assert ev.success
    table = resources["warehouse"].read_table("tiger_eval")
    rows = {r["model"]: r for r in table.iter_rows(named=True)}
    ref = rows["TIGER, reference IDs (index_rqvae.json)"]
    pop = rows["popularity (train + valid counts)"]
    assert ref["invalid_id_rate"] == 0.0 and rows["TIGER, own IDs (beauty_semantic_ids)"]["invalid_id_rate"] == 0.0
    assert ref["recall@10"] > pop["recall@10"] + 0.3, rows
    assert rows["TIGER paper (Rajput et al. 2023)"]["recall@10"] == 0.0648
    md = ev.asset_materializations_for_node("tiger_eval")[0].metadata
    assert "comparison_plot" in md and md["dagster/row_count"].value == 5


def test_cosine_time_schedule_follows_the_budget_share():
    from animind_assets.lib.retrieval.tiger import lr_factor

    cfg = TigerConfig(warmup_steps=10, lr_schedule="cosine_time", max_train_seconds=60)
    assert lr_factor(0, cfg, 100, 0.0) == pytest.approx(0.1)  # warm-up first
    assert lr_factor(50, cfg, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 100, 0.5) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(50, cfg, 100, 1.0) == lr_factor(50, cfg, 100, 3.0) == pytest.approx(0.05)
    # the step count does not matter, only the elapsed share of the budget
    assert lr_factor(20, cfg, 100, 0.25) == lr_factor(5000, cfg, 100, 0.25)
    with pytest.raises(ValueError, match="max_train_seconds"):
        TigerConfig(lr_schedule="cosine_time").validate()


def test_tiger_speed_benchmark_prints_float32_and_bf16_rows_of_each_preset(capsys):
    """``benchmarks.tiger_speed`` trains the same synthetic batches in both dtypes and prints one row each."""
    from animind_assets.benchmarks import tiger_speed

    assert tiger_speed.main(["--presets", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                             "--history", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| cpu |")]
    assert [r.split("|")[2].strip() for r in rows] == ["float32", "bf16 autocast"], out
    assert rows[0].split("|")[5].strip() == "1.00x" and "load before:" in out and "extensions:" in out
    with pytest.raises(ValueError, match="at least one step"):
        tiger_speed.time_steps(tiger_speed_preset(), False, steps=0, warmup=0, batch_size=2, history=2)
    with pytest.raises(SystemExit):
        tiger_speed.main(["--presets", "nope"])


def tiger_speed_preset() -> dict:
    from animind_assets.benchmarks.tiger_beauty import PRESETS

    return PRESETS["cpu"]
