"""llm_prep_dataset library: task construction, sentiment, split by user, duplicates, determinism."""

from __future__ import annotations

import polars as pl
import pytest

from animind_assets.lib.llm.model_folder import MASK
from animind_assets.lib.llm.data import (
    DISLIKED,
    DROPPED,
    LIKED,
    WATCH,
    LlmDataConfig,
    approx_token_count,
    build_llm_dataset,
    leakage_report,
    overlap_summary,
    sentiment_token,
    split_users,
    to_chat_records,
    token_length_stats,
)
from animind_assets_tests.llm_fixtures import make_catalog, make_interactions, make_semantic_ids


@pytest.fixture(scope="module")
def inputs():
    cat = make_catalog()
    return cat, make_interactions(), make_semantic_ids(cat)


@pytest.fixture(scope="module")
def built(inputs):
    cat, inter, sids = inputs
    return build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=400, seed=7, validation_user_frac=0.2, test_user_frac=0.2))


@pytest.mark.parametrize(
    "score,status,expected",
    [(7, 2, LIKED), (10, 2, LIKED), (6, 2, WATCH), (0, 2, WATCH), (4, 2, WATCH), (3, 2, DISLIKED), (1, 2, DISLIKED),
     (9, 4, DROPPED), (0, 4, DROPPED), (2, 4, DROPPED), (8, 1, LIKED), (None, 6, WATCH)],
)
def test_sentiment_mapping(score, status, expected):
    assert sentiment_token(score, status) == expected


def test_task_a_both_directions_and_real_titles(built, inputs):
    cat, _, sids = inputs
    df = built.frame
    a = df.filter(pl.col("task") == "A")
    templates = set(a["template"].to_list())
    assert {"sid_to_title", "title_to_sid", "sid_to_genres", "sid_to_year", "title_year_to_sid"} <= templates
    sid_of = dict(sids.select("anime_id", "semantic_id").iter_rows())
    # SID -> title answers the display title; when english_name is unknown that is the original name
    for aid, comp in a.filter(pl.col("template") == "sid_to_title").select("target_anime_id", "completion").iter_rows():
        row = cat.filter(pl.col("anime_id") == aid).row(0, named=True)
        assert comp == (row["english_name"] or row["name"])
        assert comp not in ("Unknown", "None", "")
    for aid, prompt, comp in a.filter(pl.col("template") == "title_to_sid").select("target_anime_id", "prompt", "completion").iter_rows():
        assert comp == sid_of[aid]
    # no row for a missing field: year-less anime get no SID->year rows
    no_year = set(cat.filter(pl.col("year").is_null())["anime_id"].to_list())
    assert not set(a.filter(pl.col("template") == "sid_to_year")["target_anime_id"].to_list()) & no_year
    assert built.summary["task_a_skipped_missing_field"].get("sid_to_year:year", 0) > 0
    assert all(a["user_id"].is_null())


def test_task_b_format_and_sentiment_tokens(built):
    b = built.frame.filter(pl.col("task") == "B")
    assert b.height > 0
    for prompt, comp in b.select("prompt", "completion").iter_rows():
        assert prompt.count(MASK) >= 2  # the masked slot and the question
        assert f"<anime_start>{MASK}<anime_end>" in prompt
        assert comp.startswith("<L1_") and comp.endswith(">") and "<anime" not in comp
    joined = " ".join(b["prompt"].to_list())
    assert "<anime_end><liked>" in joined and "<anime_end><watch>" in joined


@pytest.mark.parametrize("holdout", ["random", "last"])
def test_split_by_user_no_leakage(inputs, holdout):
    cat, inter, sids = inputs
    built = build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=400, seed=7, validation_user_frac=0.2,
                                                              test_user_frac=0.2, holdout=holdout))
    df = built.frame
    bc = df.filter(pl.col("task").is_in(["B", "C"]))
    per_user = bc.group_by("user_id").agg(pl.col("split").n_unique().alias("n"))
    assert per_user["n"].max() == 1
    held = df.filter(pl.col("is_heldout"))
    assert set(held["split"].unique().to_list()) <= {"validation", "test"}
    assert held.height == held["user_id"].n_unique()  # one held-out row per evaluation user
    sid_of = {}
    for r in df.filter(pl.col("task") == "A").select("target_anime_id", "completion", "template").iter_rows():
        if r[2] == "title_to_sid":
            sid_of[r[0]] = r[1]
    ordered = inter.unique(["user_id", "anime_id"], keep="first", maintain_order=True).sort("user_id", "seq")
    for u, target, hist in held.select("user_id", "target_anime_id", "history_anime_ids").iter_rows():
        items = ordered.filter(pl.col("user_id") == u)["anime_id"].to_list()
        if holdout == "last":
            assert target == items[-1]  # the last row of the list is held out (order artefact on MAL)
        else:
            assert target in items
        assert target not in hist and set(hist) <= set(items)
        # nothing built for this user (C rows) mentions the held-out item
        for p, c in df.filter((pl.col("user_id") == u) & ~pl.col("is_heldout")).select("prompt", "completion").iter_rows():
            if target in sid_of:
                assert sid_of[target] not in p and sid_of[target] not in c
    train_users = set(df.filter(pl.col("split") == "train")["user_id"].drop_nulls().to_list())
    assert not train_users & set(held["user_id"].to_list())
    assert leakage_report(df) == {"users_in_several_splits": 0, "heldout_items_in_train": 0, "heldout_examples": held.height}


def test_leakage_report_detects_injected_leak(built):
    df = built.frame
    held = df.filter(pl.col("is_heldout")).row(0, named=True)
    leak = df.filter(pl.col("task") == "B").head(1).with_columns(
        pl.lit("train").alias("split"), pl.lit(held["user_id"]).cast(pl.Int64).alias("user_id"),
        pl.lit(held["target_anime_id"]).cast(pl.Int64).alias("target_anime_id"), pl.lit(False).alias("is_heldout"),
    )
    rep = leakage_report(pl.concat([df, leak]))
    assert rep["users_in_several_splits"] >= 1 and rep["heldout_items_in_train"] >= 1


def test_split_users_deterministic_and_fractions():
    cfg = LlmDataConfig(seed=3, validation_user_frac=0.1, test_user_frac=0.2)
    a = split_users(range(100), cfg)
    assert a == split_users(reversed(range(100)), cfg)
    counts = {s: sum(1 for v in a.values() if v == s) for s in ("train", "validation", "test")}
    assert counts == {"train": 70, "validation": 10, "test": 20}
    assert split_users(range(100), LlmDataConfig(seed=4, validation_user_frac=0.1, test_user_frac=0.2)) != a


def test_duplicates_counted_not_repeated(inputs):
    cat, inter, sids = inputs
    # far more rows requested than distinct examples exist: nothing may appear twice
    res = build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=4000, seed=1, min_user_items=3))
    df = res.frame
    assert df.select("task", "prompt", "completion").is_duplicated().sum() == 0
    dropped = res.summary["duplicates_dropped"]
    assert sum(dropped.values()) > 0
    for t in ("B", "C"):
        sub = df.filter(pl.col("task") == t)
        assert int(sub["dup_count"].sum()) - sub.height == dropped[t]
    # task A: the budget exceeds the distinct candidates, so each candidate is used once
    assert df.filter(pl.col("task") == "A").height == res.summary["task_a_distinct_candidates"]
    assert res.summary["duplicate_user_anime_pairs_dropped"] == 1


def test_deterministic_for_seed(inputs):
    cat, inter, sids = inputs
    cfg = LlmDataConfig(n_examples=300, seed=11)
    a = build_llm_dataset(cat, inter, sids, cfg).frame
    b = build_llm_dataset(cat, inter.sample(fraction=1.0, shuffle=True, seed=5).sort("user_id", "seq"), sids, cfg).frame
    assert a.equals(b)
    c = build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=300, seed=12)).frame
    assert not a.equals(c)


def test_mix_ratios_and_counts(inputs):
    cat, inter, sids = inputs
    res = build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=200, mix_a=1.0, mix_b=0.0, mix_c=0.0))
    train = res.frame.filter(pl.col("split") == "train")
    assert set(train["task"].unique().to_list()) == {"A"}
    counts = res.summary["counts"]
    assert sum(sum(v.values()) for v in counts.values()) == res.frame.height


def test_order_note_without_and_with_timestamps(built, inputs):
    assert built.summary["order_is_temporal"] is False
    assert "NOT watch time" in built.summary["order_note"]
    # without timestamps the default protocol is set completion, stated in every B prompt
    assert built.summary["protocol"] == "set_completion" and "set completion, no time order" in built.summary["protocol_note"]
    assert all("in no particular order" in p for p in built.frame.filter(pl.col("task") == "B")["prompt"].to_list())
    cat, inter, sids = inputs
    last = build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=200, holdout="last"))
    assert last.summary["protocol"] == "next_item_order_artefact" and "ORDER ARTEFACT" in last.summary["protocol_note"]
    assert all("in list order" in p for p in last.frame.filter(pl.col("task") == "B")["prompt"].to_list())
    # a timestamp column that reverses seq: the held-out item becomes the first row by seq
    ts = inter.with_columns((1000 - pl.col("seq")).alias("timestamp"))
    res = build_llm_dataset(cat, ts, sids, LlmDataConfig(n_examples=200, validation_user_frac=0.2, test_user_frac=0.2))
    assert res.summary["order_is_temporal"] is True and res.summary["protocol"] == "next_item"
    held = res.frame.filter(pl.col("is_heldout"))
    first = ts.unique(["user_id", "anime_id"], keep="first", maintain_order=True).sort("user_id", "seq").group_by("user_id").agg(pl.col("anime_id").first())
    first_of = dict(first.iter_rows())
    assert all(first_of[u] == t for u, t in held.select("user_id", "target_anime_id").iter_rows())
    assert "in watch order" in held["prompt"][0]


def test_task_c_reasoning_from_overlaps():
    rows = [
        {"semantic_id": "<L1_1>", "title": "A", "genres": ["Action", "Comedy"], "studios": ["Bones"], "year": 2004, "type": "TV"},
        {"semantic_id": "<L1_2>", "title": "B", "genres": ["Action"], "studios": ["Bones"], "year": 2007, "type": "TV"},
        {"semantic_id": "<L1_3>", "title": "C", "genres": ["Drama"], "studios": [], "year": None, "type": "Movie"},
    ]
    text = overlap_summary(rows)
    assert "Action (2/3)" in text and "Bones (2/3)" in text and "2000s (2/3)" in text and "TV (2/3)" in text
    assert "Drama" not in text  # shared by only one


def test_exports_and_token_stats(built):
    recs = to_chat_records(built.frame)
    assert recs[0]["messages"][0]["role"] == "system" and recs[0]["messages"][2]["content"] == recs[0]["completion"]
    # the history travels with each row (a "sequence"-form held-out row is not reproducible without it)
    assert [r["history_anime_ids"] for r in recs] == [list(h or []) for h in built.frame["history_anime_ids"].to_list()]
    stats = token_length_stats(built.frame, approx_token_count)
    assert set(stats) >= {"A", "B", "all"} and stats["all"]["max"] >= stats["all"]["p50"] > 0
    assert approx_token_count(["<L1_2><L2_3>"]) == [2]


def test_bad_inputs_named(inputs):
    cat, inter, sids = inputs
    dup = pl.concat([sids, sids.head(1).with_columns(pl.lit(999).cast(pl.Int64).alias("anime_id"))])
    with pytest.raises(ValueError, match="semantic_ids.*semantic_id"):
        build_llm_dataset(cat, inter, dup)
    with pytest.raises(ValueError, match="user_interactions.*status"):
        build_llm_dataset(cat, inter.drop("status"), sids)
    with pytest.raises(ValueError, match="mix"):
        LlmDataConfig(mix_a=0, mix_b=0, mix_c=0).validate()


def test_list_end_prob_trains_the_evaluated_position(inputs):
    """list_end_prob=1: every training B row masks the user's real last item (the position held out for
    test users); 0: windows at random positions, so most training targets are not list ends."""
    cat, inter, sids = inputs
    ordered = inter.unique(["user_id", "anime_id"], keep="first", maintain_order=True).sort("user_id", "seq")
    last_of = {u: items[-1] for u, items in ordered.group_by("user_id", maintain_order=True).agg("anime_id").iter_rows()}

    def train_b(p: float) -> pl.DataFrame:
        cfg = LlmDataConfig(n_examples=400, seed=7, validation_user_frac=0.2, test_user_frac=0.2, list_end_prob=p, holdout="last")
        df = build_llm_dataset(cat, inter, sids, cfg).frame
        return df.filter((pl.col("task") == "B") & (pl.col("split") == "train"))

    always = train_b(1.0)
    assert always.height > 0 and set(always["template"].to_list()) == {"b_next"}
    assert all(t == last_of[u] for u, t in always.select("user_id", "target_anime_id").iter_rows())
    never = train_b(0.0)
    at_end = sum(t == last_of[u] for u, t in never.select("user_id", "target_anime_id").iter_rows())
    assert at_end < 0.5 * never.height, (at_end, never.height)
    with pytest.raises(ValueError, match="list_end_prob must be in"):
        LlmDataConfig(list_end_prob=1.5).validate()


def _lists(inter: pl.DataFrame) -> dict[int, list[int]]:
    ordered = inter.unique(["user_id", "anime_id"], keep="first", maintain_order=True).sort("user_id", "seq")
    return {u: items for u, items in ordered.group_by("user_id", maintain_order=True).agg("anime_id").iter_rows()}


def test_random_holdout_seeded_reproducible_and_not_the_last(inputs):
    cat, inter, sids = inputs
    lists = _lists(inter)

    def held(seed: int, shuffled: bool = False) -> dict[int, int]:
        src = inter.sample(fraction=1.0, shuffle=True, seed=3).sort("user_id", "seq") if shuffled else inter
        cfg = LlmDataConfig(n_examples=200, seed=seed, validation_user_frac=0.3, test_user_frac=0.3, holdout="random")
        df = build_llm_dataset(cat, src, sids, cfg).frame.filter(pl.col("is_heldout"))
        return dict(df.select("user_id", "target_anime_id").iter_rows())

    a = held(5)
    assert a == held(5) == held(5, shuffled=True)  # same seed, same held-out items
    assert len(a) >= 10 and all(t in lists[u] for u, t in a.items())
    # the held-out item is not the last row: its list position is spread over the list
    rel = [lists[u].index(t) / (len(lists[u]) - 1) for u, t in a.items()]
    assert sum(r == 1.0 for r in rel) < 0.5 * len(rel) and min(rel) < 0.5
    # the selection is per (seed, user): another seed moves it for some users (same users where split agrees)
    b = held(6)
    common = set(a) & set(b)
    assert any(a[u] != b[u] for u in common) or not common


def test_random_protocol_no_heldout_item_in_training_rows(inputs):
    cat, inter, sids = inputs
    cfg = LlmDataConfig(n_examples=600, seed=2, validation_user_frac=0.25, test_user_frac=0.25, holdout="random")
    res = build_llm_dataset(cat, inter, sids, cfg)
    df = res.frame
    held = df.filter(pl.col("is_heldout"))
    sid_of = dict(sids.select("anime_id", "semantic_id").iter_rows())
    train = df.filter(pl.col("split") == "train")
    train_pairs = set()
    for u, t, hist in train.select("user_id", "target_anime_id", "history_anime_ids").iter_rows():
        if u is not None:
            train_pairs.update((u, a) for a in [t, *(hist or [])] if a is not None)
    for u, t in held.select("user_id", "target_anime_id").iter_rows():
        assert (u, t) not in train_pairs
        assert not train.filter(pl.col("user_id") == u).height  # eval users have no training rows at all
        for p, c in df.filter((pl.col("user_id") == u) & ~pl.col("is_heldout")).select("prompt", "completion").iter_rows():
            assert sid_of[t] not in p and sid_of[t] not in c
    assert res.summary["leakage"]["heldout_items_in_train"] == 0
    # training B rows mask random items (not mostly the list end) of lists shown in random order
    lists = _lists(inter)
    b = train.filter(pl.col("task") == "B")
    at_end = sum(t == lists[u][-1] for u, t in b.select("user_id", "target_anime_id").iter_rows())
    assert b.height > 20 and at_end < 0.4 * b.height
    assert {"b_next", "b_masked"} <= set(b["template"].to_list())
    with pytest.raises(ValueError, match="holdout must be"):
        LlmDataConfig(holdout="first").validate()


def test_sequence_form_set_completion_rows_cover_random_subsets_and_leak_nothing(inputs):
    """``next_id_format="sequence"``: training B rows write a random subset of a training user's list as IDs in
    random order (every item after the first a target given the ones before: window - 1 targets per row);
    held-out rows keep the fixed prompt, the shown items as history and the held-out ID as the completion;
    no held-out item appears in any training row; refused for the last-item protocol."""
    from animind_assets.lib.llm.model_folder import SEQUENCE_TEMPLATE, list_order_of, sequence_prefix

    cat, inter, sids = inputs
    cfg = LlmDataConfig(n_examples=600, seed=2, validation_user_frac=0.25, test_user_frac=0.25, holdout="random",
                        next_id_format="sequence", max_history=5)
    res = build_llm_dataset(cat, inter, sids, cfg)
    df = res.frame
    sid_of = dict(sids.select("anime_id", "semantic_id").iter_rows())
    lists = _lists(inter)
    b = df.filter(pl.col("task") == "B")
    assert set(b["template"].to_list()) == {SEQUENCE_TEMPLATE}
    assert len(set(b["prompt"].to_list())) == 1 and list_order_of(b["prompt"].to_list()) == "set"
    train = b.filter(pl.col("split") == "train")
    orders_seen = set()
    for u, t, hist, comp in train.select("user_id", "target_anime_id", "history_anime_ids", "completion").iter_rows():
        window = [*hist, t]
        assert comp == sequence_prefix(window, sid_of)  # the whole window is the answer, target last
        assert len(set(window)) == len(window) and set(window) <= set(lists[u])
        assert len(window) == min(cfg.max_history + 1, len(lists[u]))
        orders_seen.add(tuple(lists[u].index(a) for a in window) == tuple(sorted(lists[u].index(a) for a in window)))
    assert False in orders_seen  # windows are not in list order
    assert res.summary["next_id_format"] == "sequence"
    assert res.summary["b_targets_per_row"] == pytest.approx(train["history_anime_ids"].list.len().mean(), abs=1e-3)
    assert res.summary["b_targets_per_row"] > 2
    held = b.filter(pl.col("is_heldout"))
    assert held.height > 5 and (held["completion"] == held["target_anime_id"].replace_strict(sid_of)).all()
    train_pairs = {(u, a) for u, t, h in df.filter(pl.col("split") == "train").select(
        "user_id", "target_anime_id", "history_anime_ids").iter_rows() if u is not None for a in [t, *(h or [])]}
    for u, t, hist in held.select("user_id", "target_anime_id", "history_anime_ids").iter_rows():
        assert (u, t) not in train_pairs and t not in hist and set(hist) <= set(lists[u])
    assert res.summary["leakage"]["heldout_items_in_train"] == 0
    # held-out rows share one prompt: two users with the same held-out item are still two examples
    n_eval = res.user_splits.filter(pl.col("split") != "train").height
    assert held.height == n_eval and df["example_id"].n_unique() == df.height
    shared = held.group_by("completion").len().filter(pl.col("len") > 1).height
    assert shared > 0  # the fixture has such users, so the case is exercised
    question = build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=600, seed=2, validation_user_frac=0.25,
                                                                 test_user_frac=0.25, holdout="random"))
    assert question.summary["b_targets_per_row"] == 1.0
    with pytest.raises(ValueError, match="set completion"):
        build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=100, holdout="last", next_id_format="sequence"))
    with pytest.raises(ValueError, match="next_id_format"):
        LlmDataConfig(next_id_format="list").validate()


def test_sequence_window_sets_items_per_training_row_and_leaves_heldout_rows_alone(inputs):
    """``sequence_window``: sequence-form training rows carry that many list items (fewer on a shorter list),
    the held-out rows still show at most ``max_history`` items; the knob is refused outside the sequence form."""
    cat, inter, sids = inputs
    base = dict(n_examples=600, seed=2, validation_user_frac=0.25, test_user_frac=0.25, holdout="random",
                next_id_format="sequence", max_history=3)
    short = build_llm_dataset(cat, inter, sids, LlmDataConfig(**base))
    res = build_llm_dataset(cat, inter, sids, LlmDataConfig(**base, sequence_window=9))
    lists = _lists(inter)
    b = res.frame.filter(pl.col("task") == "B")
    train = b.filter(pl.col("split") == "train")
    lens = [len(h) + 1 for h in train["history_anime_ids"].to_list()]
    assert all(n == min(9, len(lists[u])) for n, u in zip(lens, train["user_id"].to_list()))
    assert max(lens) == 9
    assert res.summary["b_targets_per_row"] > short.summary["b_targets_per_row"] + 1
    held = b.filter(pl.col("is_heldout"))
    assert held["history_anime_ids"].list.len().max() <= 3
    assert held.sort("example_id")["history_anime_ids"].to_list() == (
        short.frame.filter((pl.col("task") == "B") & pl.col("is_heldout")).sort("example_id")["history_anime_ids"].to_list())
    with pytest.raises(ValueError, match="sequence_window"):
        LlmDataConfig(sequence_window=5).validate()
    with pytest.raises(ValueError, match="sequence_window"):
        LlmDataConfig(next_id_format="sequence", sequence_window=1).validate()


def test_model_lookup_held_out_labels_name_nothing():
    """``model_lookup(scope='dataset')``: the model (and so the evaluation's trie) can name the anime of training
    targets/completions and of every row's history; an anime that appears only as a held-out label stays out (else
    it would be a candidate only because it is the answer, a candidate set no baseline gets)."""
    from animind_assets.lib.llm.data import model_lookup

    prep = pl.DataFrame({"anime_id": [1, 2, 3, 4, 5], "name": ["a", "b", "c", "d", "e"]})
    sids = pl.DataFrame({"anime_id": [1, 2, 3, 4, 5], "semantic_id": [f"<L1_{i}><L2_0>" for i in range(1, 6)]})
    ds = pl.DataFrame({
        "target_anime_id": [1, 4, 5],
        "history_anime_ids": [[2], [3], [2]],
        "prompt": ["<L1_2><L2_0>", "<L1_3><L2_0>", "<L1_2><L2_0>"],
        "completion": ["<L1_1><L2_0>", "<L1_4><L2_0>", "<L1_5><L2_0>"],
        "is_heldout": [False, True, True],
    })
    # 1: training target; 2, 3: histories (3 only in a held-out user's history: input, so nameable);
    # 4, 5: held-out labels only
    assert model_lookup(prep, sids, ds, "dataset")["anime_id"].to_list() == [1, 2, 3]
    assert model_lookup(prep, sids, ds.with_columns(pl.lit(False).alias("is_heldout")), "dataset")["anime_id"].to_list() == [1, 2, 3, 4, 5]
    assert model_lookup(prep, sids, ds, "all").height == 5
    with pytest.raises(ValueError, match="lookup_scope"):
        model_lookup(prep, sids, ds, "train")
