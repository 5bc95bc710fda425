"""The recommend CLI / function: ranked real anime, history excluded, clear unknown-title message."""

from __future__ import annotations

import json

import pytest

from animind_assets import recommend as rec
from animind_assets_tests.llm_fixtures import build_tiny_model_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("llm_rec"))[0]


def test_recommend_function_ranks_real_unseen_anime(folder):
    rows = rec.recommend(["Cowboy Bebop", "trigun"], k=5, model_dir=folder, num_threads=1)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    ids = {r["anime_id"] for r in rows}
    assert not ids & {1, 2}  # the history itself is never recommended
    sm, _ = rec.load(folder)
    for r in rows:
        assert sm.sids[r["anime_id"]] == r["semantic_id"] and r["title"] == sm.titles[r["anime_id"]]


def test_cli_prints_table_and_json(folder, capsys):
    assert rec.main(["--model-dir", str(folder), "--history", "Cowboy Bebop", "Shingeki no Kyojin", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Recommendations for: Cowboy Bebop, Shingeki no Kyojin") and out.count("<L1_") == 3
    assert rec.main(["--model-dir", str(folder), "--history", "Trigun", "-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 2 and data[0]["semantic_id"].startswith("<L1_")


def test_cli_unknown_title_gives_close_matches(folder, capsys):
    code = rec.main(["--model-dir", str(folder), "--history", "Cowboy Bebopp", "Trigun", "Zzzqx Unrelated"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Unknown title 'Cowboy Bebopp'. Did you mean: 'Cowboy Bebop'" in err
    assert "Unknown title 'Zzzqx Unrelated'" in err
    assert "'Trigun'" not in err  # known titles are not reported


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert rec.main(["--model-dir", str(tmp_path / "nope"), "--history", "Trigun"]) == 1
    assert "no finetuned model" in capsys.readouterr().err


def test_default_model_dir_follows_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ANIMIND_DATA_DIR", str(tmp_path))
    assert rec.default_model_dir() == tmp_path.resolve() / "artifacts" / "finetuned_model"
    assert rec.default_model_dir(tmp_path / "a") == tmp_path / "a" / "finetuned_model"


def test_k_and_beams_are_capped_at_the_catalog_and_memory(folder, capsys):
    """Rule 10 of issue 12: ``-k 100000`` used to ask for 200,000 beams (9.5 GB peak on MAL 2020)."""
    from animind_assets.lib.llm.infer import kv_bytes_per_token, plan_recommendation

    sm, index = rec.load(folder)
    history = [index.find("Cowboy Bebop")]
    plan = plan_recommendation(sm, history, k=100_000)
    available = len(sm.sid_ids) - 1
    assert plan.k == plan.num_beams == available
    assert any("k=100000 capped at" in n for n in plan.notes)
    # a KV-cache budget of ~3 beams lowers both beams and k, and says so
    per_beam = (plan.prompt_tokens + max(len(v) for v in sm.sid_ids.values()) + 1) * kv_bytes_per_token(sm)
    small = plan_recommendation(sm, history, k=10, max_cache_bytes=3 * per_beam)
    assert small.num_beams == 3 and small.k == 3 and any("KV-cache budget" in n for n in small.notes)
    assert rec.main(["--model-dir", str(folder), "--history", "Cowboy Bebop", "-k", "100000", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) <= available and "note: k=100000 capped at" in captured.err


def test_history_longer_than_the_context_keeps_the_most_recent_items(folder):
    from animind_assets.lib.llm.infer import plan_recommendation

    sm, _ = rec.load(folder)
    ids = sorted(sm.sid_ids)[:30]
    full = plan_recommendation(sm, ids, k=3)
    assert full.dropped_history == 0 and full.anime_ids == ids
    old = sm.model.config.max_position_embeddings
    try:
        sm.model.config.max_position_embeddings = full.prompt_tokens // 2
        cut = plan_recommendation(sm, ids, k=3)
        assert 0 < cut.dropped_history < len(ids)
        assert cut.anime_ids == ids[cut.dropped_history:]  # a suffix: the most recent items
        assert cut.prompt_tokens + 5 <= sm.model.config.max_position_embeddings
        assert any(f"dropped the {cut.dropped_history} oldest" in n for n in cut.notes)
        notes: list[str] = []
        titles = [sm.titles[a] for a in ids]
        rows = rec.recommend(titles, k=3, model_dir=folder, notes=notes)
        assert rows and not {r["anime_id"] for r in rows} & set(ids)  # the whole history stays excluded
        assert any("longer than the model context" in n for n in notes)
        sm.model.config.max_position_embeddings = 3
        with pytest.raises(ValueError, match="does not fit the model context"):
            plan_recommendation(sm, ids, k=3)
    finally:
        sm.model.config.max_position_embeddings = old
