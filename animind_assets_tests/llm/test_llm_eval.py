"""Trie-constrained generation, baselines and the recommendation evaluation."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from animind_assets.lib.retrieval.item_baselines import EASE, CoWatch, ItemKNN, ease_weights, popularity_ranking
from animind_assets.lib.llm.evaluation import EvalConfig, evaluate_recommender, last_item_counts, linking_accuracy, metrics_frame, title_trie
from animind_assets.lib.llm.infer import generate_text, history_prompt, load_sid_model, parse_sid, rank_items
from animind_assets_tests.llm_fixtures import build_tiny_model_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("llm_eval"))


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    folder, frame, inter, cat, sids = tiny_folder
    return load_sid_model(folder, num_threads=1), frame, inter


def test_constrained_generation_only_real_anime(tiny):
    sm, frame, _ = tiny
    # an untrained tiny model: free decoding rarely forms an ID, the trie makes every output a real anime
    prompts = frame.filter(pl.col("is_heldout"))["prompt"].to_list()[:3]
    exclude = [{1, 2, 3}, set(), {5}]
    out = rank_items(sm, prompts, k=5, num_beams=8, exclude=exclude)
    assert out.sequences > 0 and out.valid_sequences == out.sequences
    for items, ex in zip(out.items, exclude):
        ids = [a for a, _ in items]
        assert len(ids) == 5 and len(set(ids)) == 5
        assert set(ids) <= set(sm.sid_ids) and not set(ids) & ex
        scores = [s for _, s in items]
        assert scores == sorted(scores, reverse=True)


def test_cached_beam_search_matches_hf_generate(tiny):
    sm, frame, _ = tiny
    prompts = frame.filter(pl.col("is_heldout"))["prompt"].to_list()[:2]
    a = rank_items(sm, prompts, k=4, num_beams=4, engine="cached")
    b = rank_items(sm, prompts, k=4, num_beams=4, engine="hf")
    for x, y in zip(a.items, b.items):
        assert [i for i, _ in x] == [i for i, _ in y]
        assert all(abs(s - t) < 1e-3 for (_, s), (_, t) in zip(x, y))


def test_beam_search_passes_the_kv_cache_by_the_models_own_keyword(tiny):
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name is removed in 5.40): the search reads the
    keyword off the model's forward (a PEFT wrapper unwrapped), so no deprecation warning and no silently dropped cache."""
    import inspect
    import warnings

    from animind_assets.lib.llm.infer import cache_keyword

    class Old:
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New:
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Peft:
        def __init__(self, base):
            self.base = base

        def get_base_model(self):
            return self.base

    assert [cache_keyword(m) for m in (Old(), New(), Peft(Old()), Peft(New()))] == ["past_key_values", "cache"] * 2
    sm, frame, _ = tiny
    installed = inspect.signature(type(sm.model).forward).parameters
    assert cache_keyword(sm.model) == ("cache" if "cache" in installed else "past_key_values")
    prompts = frame.filter(pl.col("is_heldout"))["prompt"].to_list()[:2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = rank_items(sm, prompts, k=4, num_beams=4, engine="cached")
    assert out.valid_sequences == out.sequences > 0
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_trie_rejects_invalid_prefixes(tiny):
    sm, _, _ = tiny
    trie = sm.trie()
    some = next(iter(sm.sid_ids.values()))
    assert trie.allowed(list(some)) == [sm.eos_id]
    assert trie.item(list(some) + [sm.eos_id]) is not None
    assert trie.allowed([sm.eos_id]) == []
    l1 = set(trie.allowed([]))
    assert l1 and all(sm.tokenizer.convert_ids_to_tokens(t).startswith("<L1_") for t in l1)


def test_unconstrained_text_and_parse(tiny):
    sm, frame, _ = tiny
    out = generate_text(sm, [history_prompt(sm, [1, 2])], max_new_tokens=6)
    assert isinstance(out[0], str)
    assert parse_sid(" <L1_2><L2_3><L3_1><L4_0> tail") == "<L1_2><L2_3><L3_1><L4_0>" and parse_sid("Naruto") == ""


def test_baselines():
    inter = pl.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 3], "anime_id": [10, 11, 10, 12, 10, 11, 13], "seq": [0, 1, 0, 1, 0, 1, 2]})
    counts = {10: 3, 11: 2, 12: 1, 13: 1}
    assert popularity_ranking(counts, {10}, 2) == [11, 12]
    cw = CoWatch(inter, {1, 2, 3})
    # items co-watched with 11: 10 (users 1, 3) twice, 13 once
    assert cw.ranking([11], {11}, 2, fallback=[12]) == [10, 13]
    assert cw.ranking([99], set(), 1, fallback=[12]) == [12]
    assert last_item_counts(inter, {1, 2, 3}) == {11: 1, 12: 1, 13: 1}


def test_evaluate_recommender_end_to_end(tiny):
    sm, frame, inter = tiny
    res = evaluate_recommender(sm, frame, inter, EvalConfig(max_users=4, num_beams=10, unconstrained_users=2, title_items=3))
    lm = res.metrics["semantic_id_lm"]
    assert lm["valid_id_rate"] == 1.0 and lm["n_queries"] == 4
    # the tiny dataset has no timestamps: set completion, no last-item (order artefact) row
    assert res.summary["protocol"] == "set_completion" and "no time order" in res.summary["protocol_note"]
    assert set(res.metrics) == {"semantic_id_lm", "popularity", "cowatch", "item_knn", "ease", "ease_full_history"}
    for row in res.predictions.iter_rows(named=True):
        assert len(row["model_top"]) == 10 and row["target_anime_id"] in sm.sid_ids
    assert 0.0 <= res.summary["sid_to_title_exact"] <= 1.0 and "unconstrained_valid_id_rate" in res.summary
    table = metrics_frame(res.metrics)
    assert table.height == 6 and table.filter(pl.col("method") == "semantic_id_lm")["valid_id_rate"][0] == 1.0
    with pytest.raises(ValueError, match="no held-out"):
        evaluate_recommender(sm, frame.filter(~pl.col("is_heldout")), inter)


def test_ease_equals_closed_form_on_a_toy_matrix():
    """B = I - P / diag(P), P = (X^T X + lambda I)^-1 (Steck 2019), computed independently."""
    X = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0], [0, 0, 1, 1]], dtype=np.float64)
    lam = 2.0
    P = np.linalg.inv(X.T @ X + lam * np.eye(4))
    B = np.eye(4) - P @ np.diag(1.0 / np.diag(P))
    got = ease_weights(X, lam)
    assert np.allclose(got, B, atol=1e-10) and np.allclose(np.diag(got), 0.0)
    # B minimises ||X - XB||^2 + lam ||B||^2 under diag(B) = 0: the KKT residual is diagonal
    grad = X.T @ (X @ B - X) + lam * B
    assert np.allclose(grad - np.diag(np.diag(grad)), 0.0, atol=1e-9)
    # the model class on the same data (users 1..5, items 10..13) scores q B
    rows = [(u + 1, 10 + j) for u in range(5) for j in range(4) if X[u, j]]
    inter = pl.DataFrame({"user_id": [r[0] for r in rows], "anime_id": [r[1] for r in rows]})
    m = EASE(inter, {1, 2, 3, 4, 5}, lam=lam)
    assert m.items.tolist() == [10, 11, 12, 13]
    assert np.allclose(m.scores([10, 11]), np.array([1, 1, 0, 0]) @ B)
    q = np.array([1, 1, 0, 0]) @ B
    assert m.ranking([10, 11], {10, 11}, 2) == sorted([12, 13], key=lambda a: (-q[a - 10], a))
    with pytest.raises(ValueError, match="lambda"):
        ease_weights(X, 0.0)


def test_item_knn_cosine():
    inter = pl.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 3], "anime_id": [10, 11, 10, 12, 10, 11, 13]})
    knn = ItemKNN(inter, {1, 2, 3}, neighbours=0)
    # cos(11, 10) = 2 / sqrt(2 * 3), cos(11, 13) = 1 / sqrt(2 * 1), cos(11, 12) = 0
    sc = dict(zip(knn.items.tolist(), knn.scores([11]).tolist()))
    assert sc[10] == pytest.approx(2 / np.sqrt(6)) and sc[13] == pytest.approx(1 / np.sqrt(2)) and sc[12] == 0.0
    assert knn.ranking([11], {11}, 3, fallback=[12]) == [10, 13, 12]  # 0.816 > 0.707, then popularity pad
    top1 = ItemKNN(inter, {1, 2, 3}, neighbours=1)
    assert top1.S.getnnz(axis=0).max() == 1


def test_linking_accuracy_fields(tiny):
    sm, frame, _ = tiny
    res = linking_accuracy(sm, frame, n_items=4, seed=0)
    for k in ("sid_to_title_exact", "sid_to_title_retrieval@1", "title_to_sid_exact", "title_to_sid_retrieval@1"):
        assert 0.0 <= res[k] <= 1.0
    assert res["sid_to_title_items"] == 4 and res["title_to_sid_items"] == 4
    trie = title_trie(sm)
    assert len(trie) == len(set(sm.titles.values()))
    some = next(iter(sm.titles.values()))
    path = sm.tokenizer(some, add_special_tokens=False)["input_ids"] + [sm.eos_id]
    assert trie.item(path) == " ".join(some.casefold().split())


def test_linking_retrieval_counts_the_right_item(tiny, monkeypatch):
    """A model whose constrained answer is always the gold item scores 1.0 retrieval; a wrong one 0."""
    import animind_assets.lib.llm.evaluation as ev

    sm, frame, _ = tiny
    rows = frame.filter((pl.col("task") == "A") & (pl.col("template") == "title_to_sid") & (pl.col("split") == "train")).head(3)
    gold = rows["target_anime_id"].to_list()

    class Fake:
        def __init__(self, items):
            self.items = items

    monkeypatch.setattr(ev, "rank_items", lambda sm_, prompts, **kw: Fake([[(g, 0.0)] for g in gold]))
    monkeypatch.setattr(ev, "generate_text", lambda sm_, prompts, max_new_tokens=0: [sm.sids[g] for g in gold][: len(prompts)])
    res = ev.linking_accuracy(sm, rows.with_columns(pl.lit("title_to_sid").alias("template")), n_items=3)
    assert res["title_to_sid_retrieval@1"] == 1.0 and res["title_to_sid_exact"] == 1.0
    monkeypatch.setattr(ev, "rank_items", lambda sm_, prompts, **kw: Fake([[(-1, 0.0)] for _ in gold]))
    assert ev.linking_accuracy(sm, rows, n_items=3)["title_to_sid_retrieval@1"] == 0.0


def test_trie_beam_search_with_paths_of_different_lengths(tiny):
    """Title tries end at different depths: short paths finish while long ones are still live (the
    early-stop test compares the best live score with the num_beams-th best finished score)."""
    from animind_assets.lib.llm.infer import trie_beam_search
    from animind_assets.lib.semantic_ids.trie import SidTrie

    sm, frame, _ = tiny
    trie = SidTrie(end_token_id=sm.eos_id)
    paths = [tuple([300 + 10 * n + i] + [500 + 10 * n + j for j in range(n - 1)]) for n in range(1, 7) for i in range(3)]
    for p in paths:
        trie.add(p, item=p)
    res = trie_beam_search(sm, sm.render(frame["prompt"][0]), trie, 3)
    assert len(res) == 3 and all(trie.is_complete(t) for t, _ in res)
    scores = [sc for _, sc in res]
    assert scores == sorted(scores, reverse=True)
    # each returned score is the full-sequence log-probability of its path (prompt encoded once, cache shared)
    import torch

    from animind_assets.lib.llm.model_folder import prompt_ids

    ids = torch.tensor([prompt_ids(sm.tokenizer, sm.render(frame["prompt"][0]), sm.use_chat_template)])

    def logp(path):
        x = torch.cat([ids, torch.tensor([path])], 1)
        with torch.no_grad():
            lp = torch.log_softmax(sm.model(input_ids=x).logits[0].float(), -1)
        return sum(float(lp[ids.shape[1] - 1 + j, t]) for j, t in enumerate(path))

    for toks, sc in res:
        assert abs(logp(list(toks)) - sc) < 1e-3


def test_pure_svd_item_vectors_follow_co_occurrence_and_only_training_users():
    """PureSVD item vectors: items always listed together get near-identical directions, items of disjoint
    user groups are orthogonal; a test user's list (not in ``users``) does not shape them; items no
    training user listed get zero rows; dim < 1 is refused."""
    from animind_assets.lib.retrieval.item_baselines import pure_svd_item_vectors

    rows = [(u, a) for u in range(10) for a in (1, 2)] + [(u, a) for u in range(10, 20) for a in (3, 4)]
    rows += [(99, 1), (99, 3), (99, 5)]  # a test user linking the groups and the only one listing item 5
    inter = pl.DataFrame(rows, schema={"user_id": pl.Int64, "anime_id": pl.Int64}, orient="row")
    v = pure_svd_item_vectors(inter, range(20), [1, 2, 3, 4, 5, 6], dim=2)
    assert v.shape == (6, 2) and v.dtype == np.float32
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    assert cos(v[0], v[1]) > 0.99 and cos(v[2], v[3]) > 0.99 and abs(cos(v[0], v[2])) < 1e-3
    assert not v[4].any() and not v[5].any()
    with pytest.raises(ValueError, match="dim"):
        pure_svd_item_vectors(inter, range(20), [1], dim=0)


def test_sequence_form_set_completion_is_scored_as_trained_in_eval_and_recommend(tmp_path):
    """A model trained on ``next_id_format="sequence"`` rows: the folder says so; ``evaluate_recommender`` decodes
    each held-out ID after the shown items' IDs in the answer turn (EOS-free trie), so a returned item's score is
    the log-probability of its ID tokens there; ``recommend``'s plan renders the same prompt + prefix."""
    import torch

    from animind_assets.lib.llm.infer import plan_recommendation
    from animind_assets.lib.llm.model_folder import SEQUENCE_TEMPLATE, prompt_ids, sequence_prefix, sid_token_ids

    folder, frame, inter, _, _ = build_tiny_model_folder(tmp_path, next_id_format="sequence", holdout="random")
    sm = load_sid_model(folder, num_threads=1)
    assert sm.info["next_id_format"] == "sequence" and sm.info["sequence_prompt"].endswith("(in no particular order).")
    res = evaluate_recommender(sm, frame, inter, EvalConfig(max_users=3, num_beams=10, unconstrained_users=2, title_items=0))
    assert res.summary["next_id_format"] == "sequence" and res.metrics["semantic_id_lm"]["valid_id_rate"] == 1.0
    assert res.summary["protocol"] == "set_completion"
    test = frame.filter(pl.col("is_heldout") & (pl.col("split") == "test") & (pl.col("task") == "B")).sort("user_id")
    assert set(test["template"].to_list()) == {SEQUENCE_TEMPLATE}
    row = res.predictions.row(0, named=True)
    hist = test.filter(pl.col("user_id") == row["user_id"])["history_anime_ids"][0].to_list()
    e = prompt_ids(sm.tokenizer, sm.render(sm.info["sequence_prompt"]) + sequence_prefix(hist, sm.sids), sm.use_chat_template)
    ids = torch.tensor([e + list(sid_token_ids(sm.tokenizer, sm.sids[row["model_top"][0]]))])
    with torch.no_grad():
        logp = torch.log_softmax(sm.model(input_ids=ids).logits[0].float(), -1)
    want = sum(float(logp[len(e) - 1 + k, ids[0, len(e) + k]]) for k in range(ids.shape[1] - len(e)))
    assert row["model_scores"][0] == pytest.approx(want, abs=1e-4)
    plan = plan_recommendation(sm, hist, k=5)
    assert plan.prompt == sm.info["sequence_prompt"] and plan.prefix == sequence_prefix(hist, sm.sids)
    assert not plan.notes
    from animind_assets.lib.semantic_ids.tokens import DISLIKED

    disliked = plan_recommendation(sm, hist, [DISLIKED] * len(hist), k=5)  # no sentiment tokens in this form
    assert disliked.prefix == plan.prefix and any("sentiments ignored" in n for n in disliked.notes)
    out = rank_items(sm, [plan.prompt], k=5, num_beams=10, exclude=[set(hist)], prefixes=[plan.prefix])
    assert len(out.items[0]) == 5 and not {a for a, _ in out.items[0]} & set(hist)
    question_rows = frame.filter(pl.col("is_heldout")).with_columns(pl.lit("b_next").alias("template"))
    with pytest.raises(ValueError, match="re-materialize finetuned_model"):  # a model of the other form
        evaluate_recommender(sm, question_rows, inter, EvalConfig(max_users=2, num_beams=10, unconstrained_users=0, title_items=0))
    with pytest.raises(ValueError, match="engine 'cached'"):
        evaluate_recommender(sm, frame, inter, EvalConfig(max_users=2, num_beams=10, unconstrained_users=0, title_items=0), engine="hf")
    mixed = pl.concat([frame, question_rows])
    with pytest.raises(ValueError, match="mix task-B forms"):
        evaluate_recommender(sm, mixed, inter, EvalConfig(max_users=2, num_beams=10, unconstrained_users=0, title_items=0))


def test_batched_trie_beam_search_matches_one_prompt_at_a_time(tiny):
    """Prompts of different lengths (left padding, own position ids), tries and beam counts of their own in one
    batch give the same paths and scores as each prompt alone; mismatched lengths are refused."""
    from animind_assets.lib.llm.infer import trie_beam_search, trie_beam_search_batch
    from animind_assets.lib.llm.model_folder import prompt_ids

    sm, frame, _ = tiny
    texts = [sm.render(p) for p in frame.filter(pl.col("is_heldout"))["prompt"].to_list()[:3]]
    texts.append(sm.render("a much longer prompt " * 6 + frame["prompt"][0]))
    lens = {len(prompt_ids(sm.tokenizer, t, sm.use_chat_template)) for t in texts}
    assert len(lens) > 1  # padding is exercised
    tries = [sm.trie(), sm.trie(exclude=list(sm.sid_ids)[:3]), sm.trie(), sm.trie(end=False)]
    beams = [6, 4, 1, 5]
    batched = trie_beam_search_batch(sm, texts, tries, beams)
    for text, trie, k, got in zip(texts, tries, beams, batched):
        alone = trie_beam_search(sm, text, trie, k)
        assert len(got) == len(alone) == k
        assert [t for t, _ in got] == [t for t, _ in alone]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, alone)) < 1e-4
        assert all(trie.is_complete(t) for t, _ in got)
    assert trie_beam_search_batch(sm, [], [], 3) == []
    with pytest.raises(ValueError, match="as many tries"):
        trie_beam_search_batch(sm, texts, tries[:2], 4)
    with pytest.raises(ValueError, match=">= 1"):
        trie_beam_search_batch(sm, texts[:2], tries[:2], [3, 0])
    # an empty trie in the middle of a batch gives no paths and leaves its neighbours as they are alone
    from animind_assets.lib.semantic_ids.trie import SidTrie

    mixed = trie_beam_search_batch(sm, texts[:3], [tries[0], SidTrie(end_token_id=sm.eos_id), tries[2]], np.int64(4))
    assert mixed[1] == []
    for got, text, trie in ((mixed[0], texts[0], tries[0]), (mixed[2], texts[2], tries[2])):
        assert [t for t, _ in got] == [t for t, _ in trie_beam_search(sm, text, trie, 4)]


def test_bfloat16_inference_loads_bf16_weights_and_ranks_valid_items(tiny, tiny_folder):
    """``load_sid_model(dtype="bfloat16")`` holds every weight in bf16; its next-token log-probabilities stay within
    bf16 rounding of float32's (far closer than the spread of the scores themselves), the beam search returns valid,
    distinct, score-ordered items, the KV-cache size counts 2-byte values; an unknown dtype is refused by name."""
    import torch

    from animind_assets.lib.llm.infer import _batch_inputs, kv_bytes_per_token, step_log_probs

    f32 = tiny[0]
    bf = load_sid_model(tiny_folder[0], num_threads=1, dtype="bfloat16")
    assert {p.dtype for p in bf.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in f32.model.parameters()} == {torch.float32}
    assert kv_bytes_per_token(bf) * 2 == kv_bytes_per_token(f32)
    prompts = ["user history: nothing yet", "another prompt about anime"]
    with torch.no_grad():
        lp = [step_log_probs(m, m.model(**_batch_inputs(m, [m.render(p) for p in prompts])).logits[:, -1]) for m in (f32, bf)]
    assert lp[1].dtype == torch.float32
    diff = (lp[0] - lp[1]).abs().max().item()
    assert 0 < diff < 0.1 * (lp[0].max() - lp[0].min()).item()  # rounded, not another model, and not silently float32
    out = rank_items(bf, prompts, k=5, num_beams=8)
    assert out.valid_sequences == out.sequences > 0
    for items in out.items:
        ids = [i for i, _ in items]
        assert len(ids) == len(set(ids)) == 5 and set(ids) <= set(bf.sid_ids)
        assert [s for _, s in items] == sorted((s for _, s in items), reverse=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_sid_model(tiny_folder[0], dtype="float16")
