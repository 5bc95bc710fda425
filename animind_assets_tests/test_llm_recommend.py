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
