"""The Beauty benchmark command end to end on a tiny split built here (real data is not needed):
every model trains and is evaluated on the same users, the published rows are printed apart from
ours, the RPG diagnostic is labelled as not a model, and ``--reuse`` re-prints without training."""

from __future__ import annotations

import json

import numpy as np

from animind_assets.benchmarks import beauty


def _tiny_beauty(folder, n_items: int = 300, n_users: int = 120) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    inter = {str(u): [int(x) for x in rng.choice(n_items, size=int(rng.integers(4, 9)), replace=False)] for u in range(n_users)}
    (folder / "inter.json").write_text(json.dumps(inter))
    (folder / "items.csv").write_text("item_id,asin,text\n" + "".join(f"{i},B{i:09d},item {i} words\n" for i in range(n_items)))
    codes, seen = {}, set()
    for i in range(n_items):
        c = [int(x) for x in rng.integers(0, 8, size=3)]
        k = 0
        while tuple(c + [k]) in seen:
            k += 1
        seen.add(tuple(c + [k]))
        codes[str(i)] = c + [k]
    (folder / "index_rqkmeans.json").write_text(json.dumps(codes))


def test_one_command_trains_and_ranks_every_model_on_the_same_users(tmp_path, monkeypatch, capsys):
    _tiny_beauty(tmp_path / "shared" / "beauty")
    monkeypatch.setenv("ANIMIND_SHARED_DATA", str(tmp_path / "shared"))
    out = tmp_path / "out"
    argv = ["--threads", "1", "--out", str(out), "--rpg-embeddings", "sasrec", "--rpg-codebooks", "4",
            "--sasrec-seconds", "3", "--rpg-seconds", "3", "--rpg-epochs", "2", "--tiger-seconds", "3",
            "--n-boot", "20", "--val-users", "50", "--tiger-beams", "10"]
    assert beauty.main(argv) == 0
    text = capsys.readouterr().out
    ours, published = text.split("== published")
    table = ours.split("== ours")[1].split("speed and budget")[0]
    for label in ("popularity (train+valid counts)", "SASRec-CE (ours)", "RPG, PQ 4x256 on sasrec vectors, item-level softmax only (exact; not RPG's code loss), "
                  "distilled from the SASRec (weight 0.5, T 1), sqrt pooling, dot logits (ours)",
                  "TIGER, RQ-KMeans IDs of the SASRec item embeddings (ours)"):
        assert table.count(label) == 2, label  # masked and unmasked rows
    assert "TIGER paper (Rajput et al. 2023)" in published and "TIGER paper" not in ours
    assert "diagnostic (not a model; same users)" in ours
    results = {m: json.loads((out / f"{m}.json").read_text()) for m in ("popularity", "sasrec", "rpg", "tiger")}
    users = {m: {r["users"] for r in res["rows"]} for m, res in results.items()}
    assert all(u == {120} for u in users.values()), users
    assert results["tiger"]["invalid_id_rate"] == 0.0
    assert results["rpg"]["diagnostic"]["rows"][0]["model"].startswith("diagnostic:")
    # --reuse: the table again from the saved results, nothing trained
    assert beauty.main(argv + ["--reuse"]) == 0
    again = capsys.readouterr().out
    assert again.count("reused") == 4 and "train:" not in again
    assert again.split("== ours")[1].split("speed and budget")[0] == table


def test_tiger_on_collaborative_rqkmeans_ids_of_the_sasrec_embeddings(tmp_path, monkeypatch, capsys):
    """``--tiger-ids sasrec``: TIGER on RQ-KMeans IDs of the SASRec item embeddings of the same --out,
    labelled as such; every item gets a unique valid ID; without a sasrec_model it says what to run."""
    _tiny_beauty(tmp_path / "shared" / "beauty")
    monkeypatch.setenv("ANIMIND_SHARED_DATA", str(tmp_path / "shared"))
    out = tmp_path / "out"
    common = ["--threads", "1", "--out", str(out), "--n-boot", "20", "--val-users", "50", "--tiger-beams", "10"]
    tiger = ["--models", "tiger", "--tiger-ids", "sasrec", "--tiger-seconds", "3"]
    assert beauty.main(common + tiger) == 2  # refused before any training, saying what to run
    err = capsys.readouterr().err
    assert "--tiger-ids sasrec" in err and "run --models sasrec first" in err and "--tiger-ids rqkmeans" in err
    assert beauty.main(common + ["--models", "rpg"]) == 2  # PQ of the SASRec vectors and the teacher
    err = capsys.readouterr().err
    assert "--rpg-embeddings sasrec" in err and "--rpg-distill-weight 0.5" in err
    assert beauty.main(common + ["--models", "rpg", "--rpg-item-negatives", "64"]) == 2  # distillation needs the exact loss
    assert "RPG flags" in capsys.readouterr().err
    assert beauty.main(common + ["--models", "sasrec", "--sasrec-seconds", "3"]) == 0
    assert beauty.main(common + tiger) == 0
    text = capsys.readouterr().out
    assert text.split("== ours")[-1].count("TIGER, RQ-KMeans IDs of the SASRec item embeddings (ours)") == 2
    res = json.loads((out / "tiger.json").read_text())
    assert res["ids"] == "sasrec" and res["id_stats"]["levels"] == 4 and res["invalid_id_rate"] == 0.0
