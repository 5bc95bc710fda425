"""The semantic-ID LM on next-item data (Amazon Beauty): leave-one-out rows, the Beauty evaluation
protocol, and the Beauty chain beauty_llm_prep_dataset -> beauty_finetuned_model -> beauty_llm_eval
-> beauty_eval on a tiny split built here (real data only in a test that skips without it)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from animind_assets.lib.llm.sequence_data import (
    SeqLlmDataConfig,
    build_next_item_dataset,
    item_lookup,
    SEQUENCE_TEMPLATE,
    loo_leakage_report,
    next_id_prompt,
    sequence_prefix,
    sequence_prompt,
)
from animind_assets.lib.retrieval.evaluation import SequenceSplit, evaluate_rankings, evaluate_scorer, popularity_scorer
from animind_assets.lib.semantic_ids.assign import assign_semantic_ids, semantic_id_strings
from animind_assets_tests.llm_fixtures import smollm2_tokenizer, tiny_llama

WORDS = ["nail", "lacquer", "shimmer", "matte", "lip", "gloss", "eye", "shadow", "serum", "cream", "brush", "mask"]


def tiny_beauty(n_items: int = 30, n_users: int = 24, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(items: item_id, asin, text; interactions: user_id, item_id, seq; semantic_ids: item_id, codes,
    semantic_id). Item 4 has no text (as item 4173 of the real data); users have 4-9 distinct items."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=3, replace=False)) + f" {i}" for i in range(n_items)]
    texts[4] = ""
    items = pl.DataFrame({"item_id": list(range(n_items)), "asin": [f"B{i:09d}" for i in range(n_items)], "text": texts})
    rows = []
    for u in range(n_users):
        k = int(rng.integers(4, 10)) if u else 2  # user 0 is too short (< 3 items): skipped and counted
        for s, a in enumerate(rng.choice(n_items, size=k, replace=False).tolist()):
            rows.append({"user_id": u, "item_id": int(a), "seq": s})
    inter = pl.DataFrame(rows)
    codes = rng.integers(0, 6, size=(n_items, 3))
    codes[1] = codes[2]  # a collision the disambiguation level separates
    full = assign_semantic_ids(codes, order_key=np.arange(n_items))
    sids = pl.DataFrame({"item_id": list(range(n_items)), "codes": full.tolist(), "semantic_id": semantic_id_strings(full)},
                        schema={"item_id": pl.Int64, "codes": pl.List(pl.Int64), "semantic_id": pl.Utf8})
    return items, inter, sids


def _seqs(inter: pl.DataFrame) -> dict[int, list[int]]:
    g = inter.sort(["user_id", "seq"]).group_by("user_id", maintain_order=True).agg("item_id")
    return {int(u): list(map(int, s)) for u, s in g.iter_rows()}


CFG = SeqLlmDataConfig(n_examples=400, max_history=5, title_history=3, validation_users=0)


def test_rows_follow_leave_one_out_and_no_heldout_item_in_training_rows():
    items, inter, sids = tiny_beauty()
    res = build_next_item_dataset(items, inter, sids, CFG)
    df, seqs = res.frame, _seqs(inter)
    users = sorted(u for u, s in seqs.items() if len(s) >= 3)
    assert res.summary["users_skipped_lt3"] == 1 and res.summary["users_evaluated"] == len(users)
    sid = dict(zip(sids["item_id"].to_list(), sids["semantic_id"].to_list()))
    for stage, cut in (("test", 1), ("validation", 2)):
        held = df.filter((pl.col("split") == stage) & pl.col("is_heldout")).sort("user_id")
        assert held["user_id"].to_list() == users  # one row per user and stage
        for u, t, h, p, c in held.select("user_id", "target_anime_id", "history_anime_ids", "prompt", "completion").iter_rows():
            s = seqs[u]
            assert t == s[-cut] and h == s[:-cut][-CFG.max_history:] and c == sid[t]
            assert p == next_id_prompt([sid[a] for a in h], CFG)
    # no validation/test item of a user appears in that user's training rows, as target or history
    train = df.filter((pl.col("split") == "train") & pl.col("user_id").is_not_null())
    assert train.height > 0
    for u, t, h in train.select("user_id", "target_anime_id", "history_anime_ids").iter_rows():
        s = seqs[u]
        assert t not in s[-2:] and not set(h) & set(s[-2:])
        j = s.index(t)  # a (prefix -> next item) position of seq[:-2]
        assert 1 <= j <= len(s) - 3 and h == s[:j][-len(h):]
    assert loo_leakage_report(df, seqs) == {"heldout_items_in_train": 0, "heldout_repeats": 0, "heldout_examples": 2 * len(users)}
    # the three LC-Rec-style tasks
    templates = set(df["template"].to_list())
    assert templates == {"seq_next_id", "title_seq_next_id", "sid_to_title", "title_to_sid"}
    a = df.filter(pl.col("task") == "A")
    assert 4 not in a["target_anime_id"].to_list() and res.summary["task_a_skipped"] == {"no_text": 1}
    assert all(r.startswith("<L1_") for r in df.filter(pl.col("task") == "C")["completion"].to_list())
    c = df.filter(pl.col("task") == "C")
    assert all(p.count('"') == 2 * len(h) for p, h in c.select("prompt", "history_anime_ids").iter_rows())
    with_4 = c.filter(pl.col("history_anime_ids").list.contains(4))["prompt"].to_list()
    assert all(f'"{sid[4]}"' in p for p in with_4)  # an item without text is shown by its ID


def test_leakage_report_detects_an_injected_leak_and_bad_inputs_are_named():
    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, CFG).frame
    test_row = df.filter(pl.col("split") == "test").row(0, named=True)
    leak = df.head(1).with_columns(pl.lit("train").alias("split"), pl.lit(test_row["user_id"]).cast(pl.Int64).alias("user_id"),
                                   pl.lit(test_row["target_anime_id"]).cast(pl.Int64).alias("target_anime_id"),
                                   pl.lit(False).alias("is_heldout"), pl.lit([], dtype=pl.List(pl.Int64)).alias("history_anime_ids"))
    assert loo_leakage_report(pl.concat([df, leak]))["heldout_items_in_train"] == 1
    with pytest.raises(ValueError, match="have no semantic ID"):
        build_next_item_dataset(items, inter, sids.filter(pl.col("item_id") != int(inter["item_id"][0])), CFG)
    with pytest.raises(ValueError, match="lacks column"):
        build_next_item_dataset(items.drop("text"), inter, sids, CFG)
    with pytest.raises(ValueError, match="not unique"):
        build_next_item_dataset(items, inter, sids.with_columns(pl.lit("<L1_0>").alias("semantic_id")), CFG)


def test_deterministic_and_budget():
    items, inter, sids = tiny_beauty()
    a = build_next_item_dataset(items, inter, sids, CFG).frame
    b = build_next_item_dataset(items, inter, sids, CFG).frame
    assert a.equals(b)
    c = build_next_item_dataset(items, inter, sids, SeqLlmDataConfig(**{**CFG.__dict__, "seed": 7})).frame
    assert not a.equals(c)


@pytest.fixture(scope="module")
def tiny_lm():
    """An untrained tiny LM whose tokenizer knows the tiny split's semantic IDs."""
    from animind_assets.lib.llm.base_model import extend_tokenizer
    from animind_assets.lib.llm.infer import make_sid_model
    from animind_assets.lib.semantic_ids.tokens import sid_tokens_used

    items, inter, sids = tiny_beauty()
    lookup = item_lookup(items, sids)
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    extend_tokenizer(tok, model, sid_tokens_used(lookup["semantic_id"].to_list()), lambda _m: None)
    model.eval()
    info = {"use_chat_template": True, "system_prompt": CFG.system_prompt, "sid_levels": 4}
    return make_sid_model(model, tok, lookup, info), items, inter, sids


def test_evaluation_rows_follow_the_beauty_protocol(tiny_lm):
    from animind_assets.lib.llm.sequence_eval import SeqEvalConfig, evaluate_next_item_lm

    sm, items, inter, sids = tiny_lm
    df = build_next_item_dataset(items, inter, sids, CFG).frame
    split = SequenceSplit.from_sequences(_seqs(inter), n_items=items.height)
    cfg = SeqEvalConfig(test_users=10, seed=3, num_beams=12, n_boot=50, unconstrained_users=2, linking_items=2)
    out = evaluate_next_item_lm(sm, df, split, cfg)
    rows = split.subset(10, seed=3)  # the subset beauty_eval --test-users draws
    assert out.lm.users.tolist() == split.users[rows].tolist() == out.popularity.users.tolist()
    assert out.summary["valid_id_rate"] == 1.0 and out.lm.extra["invalid_id_rate"] == 0.0
    # popularity is the benchmark's own scorer on the same rows
    pop = evaluate_scorer(popularity_scorer(split), split, "test", "p", rows=rows, n_boot=50, seed=3)
    assert out.popularity.metrics == pop.metrics
    # the LM ranks come from its ranked lists under evaluate_rankings' rules (masked = history removed)
    ranked = out.predictions["ranked_items"].to_list()
    assert all(len(r) == 12 and set(r) <= set(range(items.height)) for r in ranked)
    again = evaluate_rankings({"masked": ranked, "unmasked": [r[:10] for r in ranked]}, split, "test", "lm", rows=rows, n_boot=50, seed=3)
    assert again.metrics == out.lm.metrics
    hist = split.histories("test")
    for j, i in enumerate(rows.tolist()):
        masked = [x for x in ranked[j] if x not in set(hist[i].tolist())]
        t = int(split.test_targets[i])
        assert out.lm.ranks["masked"][j] == (masked.index(t) if t in masked[:10] else 10)
    assert set(out.lm.metrics["masked"]) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}
    assert out.lm.ci["masked"]["recall@10"][0] <= out.lm.metrics["masked"]["recall@10"] <= out.lm.ci["masked"]["recall@10"][1]


def test_evaluation_refuses_a_dataset_of_other_interactions(tiny_lm):
    from animind_assets.lib.llm.sequence_eval import SeqEvalConfig, evaluate_next_item_lm

    sm, items, inter, sids = tiny_lm
    df = build_next_item_dataset(items, inter, sids, CFG).frame
    other = inter.with_columns(pl.when(pl.col("user_id") == 5).then(-pl.col("seq")).otherwise(pl.col("seq")).alias("seq"))
    split = SequenceSplit.from_sequences(_seqs(other), n_items=items.height)
    with pytest.raises(ValueError, match="user 5"):
        evaluate_next_item_lm(sm, df, split, SeqEvalConfig(test_users=0, n_boot=0, unconstrained_users=0, linking_items=0))


SEQ_CFG = SeqLlmDataConfig(**{**CFG.__dict__, "next_id_format": "sequence", "sequence_window": 3})


def test_sequence_form_rows_cover_the_training_sequences_without_leakage():
    """The "sequence" form of task B: one row per window of seq[:-2] whose answer is the window's IDs (every item
    after the first a target given its prefix); held-out rows keep the history out of the prompt."""
    items, inter, sids = tiny_beauty()
    res = build_next_item_dataset(items, inter, sids, SEQ_CFG)
    df, seqs = res.frame, _seqs(inter)
    sid = dict(zip(sids["item_id"].to_list(), sids["semantic_id"].to_list()))
    for stage, cut in (("test", 1), ("validation", 2)):
        held = df.filter((pl.col("split") == stage) & pl.col("is_heldout"))
        assert set(held["template"]) == {SEQUENCE_TEMPLATE}
        for u, t, h, p, c in held.select("user_id", "target_anime_id", "history_anime_ids", "prompt", "completion").iter_rows():
            assert t == seqs[u][-cut] and h == seqs[u][:-cut][-SEQ_CFG.max_history:] and c == sid[t]
            assert p == sequence_prompt(SEQ_CFG) and sid[h[-1]] not in p
    train_b = df.filter((pl.col("split") == "train") & (pl.col("task") == "B"))
    assert set(train_b["template"]) == {SEQUENCE_TEMPLATE} and res.summary["sequence_windows"] == train_b.height + res.summary["duplicates_dropped"]["B"]
    windows: dict[int, list[list[int]]] = {}
    for u, t, h, c in train_b.select("user_id", "target_anime_id", "history_anime_ids", "completion").iter_rows():
        w = list(h) + [t]
        assert 2 <= len(w) <= 3 and c == sequence_prefix(w, sid) == "".join(sid[a] for a in w)
        windows.setdefault(u, []).append(w)
    assert res.summary["duplicates_dropped"]["B"] == 0  # this data has no window shared by two users (kept once if so)
    for u, s in seqs.items():
        if len(s) < 3:
            continue
        t = s[:-2]
        targets = sorted(a for w in windows.get(u, []) for a in w[1:])  # consecutive windows share one item
        assert targets == sorted(t[1:]), (u, t, windows.get(u))  # every item after the first is a target exactly once
    assert loo_leakage_report(df, seqs)["heldout_items_in_train"] == 0
    assert df["example_id"].n_unique() == df.height  # held-out rows share a prompt; the history tells them apart
    with pytest.raises(ValueError, match="next_id_format"):
        SeqLlmDataConfig(next_id_format="tree").validate()
    with pytest.raises(ValueError, match="sequence_window"):
        SeqLlmDataConfig(sequence_window=1).validate()
    with pytest.raises(ValueError, match="only applies"):
        SeqLlmDataConfig(sequence_window=4).validate()  # ignored by the question form: refused, not silently dropped


def test_sequence_form_is_scored_as_trained(tiny_lm):
    """Evaluation writes the history's IDs in the answer turn exactly as training encodes them, the trie has no EOS
    (the answer goes on after the ID), and an item's beam score is the log-probability of its ID tokens there."""
    import torch

    from animind_assets.lib.llm.finetune import validation_rows
    from animind_assets.lib.llm.infer import rank_items
    from animind_assets.lib.llm.model_folder import prompt_ids, sid_token_ids
    from animind_assets.lib.llm.sequence_eval import SeqEvalConfig, evaluate_next_item_lm, heldout_prompts
    from animind_assets.lib.llm.training_data import encode_example

    sm, items, inter, sids = tiny_lm
    df = build_next_item_dataset(items, inter, sids, SEQ_CFG).frame
    split = SequenceSplit.from_sequences(_seqs(inter), n_items=items.height)
    rows = split.subset(4, seed=1)
    prompts, prefixes = heldout_prompts(df, split, rows, sids=sm.sids)
    hist = split.histories("test")
    assert prefixes == [sequence_prefix(hist[i].tolist()[-SEQ_CFG.max_history:], sm.sids) for i in rows.tolist()]
    tok = sm.tokenizer
    x, mask = encode_example(tok, SEQ_CFG.system_prompt, prompts[0], prefixes[0] + sm.sids[0], True)
    e = prompt_ids(tok, sm.render(prompts[0]) + prefixes[0], True)
    assert x[: len(e)] == e and x[len(e):-1] == list(sid_token_ids(tok, sm.sids[0])) and x[-1] == tok.eos_token_id
    assert sum(mask) == len(x) - len(prompt_ids(tok, sm.render(prompts[0]), True))  # the whole ID sequence is trained
    out = rank_items(sm, prompts[:1], k=10, num_beams=12, prefixes=prefixes[:1])
    aid, score = out.items[0][0]
    ids = torch.tensor([e + list(sid_token_ids(tok, sm.sids[aid]))])
    with torch.no_grad():
        logp = torch.log_softmax(sm.model(input_ids=ids).logits[0].float(), -1)
    want = sum(float(logp[len(e) - 1 + k, ids[0, len(e) + k]]) for k in range(ids.shape[1] - len(e)))
    assert score == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="prefixes"):
        rank_items(sm, prompts[:2], prefixes=prefixes[:1])
    ev = evaluate_next_item_lm(sm, df, split, SeqEvalConfig(test_users=6, seed=2, num_beams=12, n_boot=20, unconstrained_users=1,
                                                            linking_items=0))
    assert ev.summary["valid_id_rate"] == 1.0 and ev.lm.users.tolist() == split.users[split.subset(6, seed=2)].tolist()
    # the validation loss of a held-out row of this form sees the history, as training rows do
    val = df.filter((pl.col("split") == "validation") & pl.col("is_heldout")).head(2)
    vr = validation_rows(val, item_lookup(items, sids))
    assert [(r["prefix"], r["completion"]) for r in vr] == [(sequence_prefix(h, sm.sids), c)
                                                             for h, c in val.select("history_anime_ids", "completion").iter_rows()]
    x, mask = encode_example(tok, vr[0]["system"], vr[0]["prompt"], vr[0]["completion"], True, vr[0]["prefix"])
    assert sum(mask) == len(sid_token_ids(tok, vr[0]["completion"])) + 1  # only the held-out ID (+ EOS) is scored
    mixed = pl.concat([df, build_next_item_dataset(items, inter, sids, CFG).frame.filter(pl.col("is_heldout"))])
    with pytest.raises(ValueError, match="mix task-B forms"):
        heldout_prompts(mixed, split, rows, sids=sm.sids)


@pytest.mark.skipif(not (Path(os.environ.get("ANIMIND_SHARED_DATA", Path(__file__).resolve().parents[2] / "../shared/data")) / "beauty" / "inter.json").exists(),
                    reason="../shared/data/beauty not present")
def test_real_beauty_rows_match_the_benchmark_split():
    from animind_assets.lib.data.amazon import sequences_from_interactions
    from animind_assets.lib.data.amazon_split import load_prepared_split

    data = load_prepared_split()
    inter = data.interactions.filter(pl.col("user_id") < 300)  # a slice of users, every item kept
    items = data.items
    n = items.height
    sids = pl.DataFrame({"item_id": list(range(n)), "semantic_id": [f"<L1_{i // 256}><L2_{i % 256}>" for i in range(n)]})
    df = build_next_item_dataset(items, inter, sids, SeqLlmDataConfig(n_examples=2000, validation_users=50)).frame
    split = SequenceSplit.from_sequences(sequences_from_interactions(inter), n_items=n)
    test = df.filter(pl.col("split") == "test").sort("user_id")
    assert test["user_id"].to_list() == split.users.tolist()
    assert test["target_anime_id"].to_list() == split.test_targets.tolist()
    assert loo_leakage_report(df, sequences_from_interactions(inter))["heldout_items_in_train"] == 0
    text = dict(zip(items["item_id"].to_list(), items["text"].to_list()))
    a = df.filter(pl.col("template") == "sid_to_title")
    assert a.height and all(text[i].startswith(c.removesuffix(" ...")) for i, c in a.select("target_anime_id", "completion").iter_rows())


@pytest.mark.slow
@pytest.mark.parametrize("next_id_format", ["question", "sequence"])
def test_beauty_llm_chain(animind_env, tmp_path, next_id_format):
    import dagster as dg

    from animind_assets.defs.beauty.beauty_eval import beauty_eval
    from animind_assets.defs.beauty.beauty_finetuned_model import beauty_finetuned_model
    from animind_assets.defs.beauty.beauty_llm_eval import beauty_llm_eval, beauty_llm_eval_valid_ids
    from animind_assets.defs.beauty.beauty_llm_prep_dataset import beauty_llm_prep_dataset, beauty_llm_prep_dataset_no_heldout_in_train
    from animind_assets.resources import AniMindDuckDBIOManager, ArtifactStoreResource, MlflowResource, ParquetExports

    items, inter, sids = tiny_beauty()
    tok = smollm2_tokenizer()
    base = tmp_path / "tiny_base"
    tiny_llama(tok).save_pretrained(base)
    tok.save_pretrained(base)

    @dg.asset(name="beauty_items")
    def items_stub() -> pl.DataFrame:
        return items

    @dg.asset(name="beauty_interactions")
    def inter_stub() -> pl.DataFrame:
        return inter

    @dg.asset(name="beauty_semantic_ids")
    def sids_stub() -> pl.DataFrame:
        return sids

    artifacts = animind_env / "artifacts"
    resources = {
        "io_manager": AniMindDuckDBIOManager(database=str(animind_env / "animind.duckdb"), schema="main"),
        "artifacts": ArtifactStoreResource(root=str(artifacts)),
        "exports": ParquetExports(root=str(animind_env / "exports")),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{animind_env / 'mlflow.db'}", artifact_location=str(animind_env / "mlartifacts")),
    }
    run_config = {"ops": {
        "beauty_llm_prep_dataset": {"config": {"n_examples": 300, "max_history": 5, "validation_users": 0,
                                               "next_id_format": next_id_format}},
        "beauty_finetuned_model": {"config": {"base_model": str(base), "phase1_max_steps": 1, "phase2_max_steps": 1, "batch_size": 4,
                                              "max_seq_length": 256, "eval_examples": 2, "train_layers": 0, "num_threads": 1,
                                              "english_ppl": False, "linking_eval_items": 2,
                                              # the sequence form distils from the materialized sasrec_model and,
                                              # as --cpu-recipe, trains the top block with input-side ID rows
                                              **({"distill_weight": 0.5, "phase2_weights": {"A": 0.0, "B": 1.0, "C": 0.0},
                                                  "train_layers": 1, "id_input_rows": True}
                                                 if next_id_format == "sequence" else {})}},
        "sasrec_model": {"config": {"hidden": 16, "epochs": 1, "max_len": 10}},
        "beauty_llm_eval": {"config": {"test_users": 8, "seed": 0, "num_beams": 10, "n_boot": 20, "unconstrained_users": 1,
                                       "linking_items": 2, "num_threads": 1}},
        "beauty_eval": {"config": {"models": ["popularity", "llm"], "test_users": 8, "seed": 0, "n_boot": 20, "num_threads": 1}},
    }}
    from animind_assets.defs.beauty.sasrec_model import sasrec_model

    result = dg.materialize(
        [items_stub, inter_stub, sids_stub, sasrec_model, beauty_llm_prep_dataset, beauty_finetuned_model, beauty_llm_eval, beauty_eval,
         beauty_llm_prep_dataset_no_heldout_in_train, beauty_llm_eval_valid_ids],
        resources=resources, run_config=run_config,
    )
    assert result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"beauty_llm_prep_dataset_no_heldout_in_train": True, "beauty_llm_eval_valid_ids": True}
    assert (artifacts / "beauty_finetuned_model" / "sid_lookup.parquet").exists()
    ft_md = result.asset_materializations_for_node("beauty_finetuned_model")[0].metadata
    if next_id_format == "sequence":  # every B row is a sequence of >= 2 items: teacher targets were used
        assert ft_md["distill_weight"].value == 0.5 and ft_md["distill_positions"].value > 0
        # the rows are saved beside the model and beauty_llm_eval (load_sid_model) attached them again
        assert (artifacts / "beauty_finetuned_model" / "id_input_rows.safetensors").is_file()
        assert ft_md["id_input_rows_norm_mean"].value > 0
    else:
        assert ft_md["distill_weight"].value == 0.0 and "distill_positions" not in ft_md
    ev = result.output_for_node("beauty_llm_eval")
    assert ev["users"].to_list() == [8] * 4 and set(ev["kind"]) == {"measured", "baseline"}
    table = result.output_for_node("beauty_eval")
    measured = table.filter(pl.col("kind") != "published")
    lm = measured.filter(pl.col("model").str.contains("LM"))
    assert lm.height == 2 and lm["users"].to_list() == [8, 8]
    # the LM rows stand beside beauty_eval's own popularity rows on the same users
    pop_eval = measured.filter(pl.col("model").str.starts_with("popularity")).sort("masking")
    pop_llm = ev.filter(pl.col("kind") == "baseline").sort("masking")
    assert pop_eval["recall@10"].to_list() == pop_llm["recall@10"].to_list()


def test_finetune_wall_clock_budget_stops_training_and_says_so(tmp_path):
    from animind_assets.lib.llm.finetune import run_finetune
    from animind_assets_tests.llm_fixtures import tiny_finetune_config

    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, CFG).frame
    lookup = item_lookup(items, sids)
    tok = smollm2_tokenizer()
    cfg = tiny_finetune_config(phase1_max_steps=3, phase2_max_steps=3, english_ppl=False, linking_eval_items=0,
                               max_train_seconds=1e-3)
    res = run_finetune(df, lookup, cfg, tmp_path / "work", special_tokens=(), base=(tiny_llama(tok), tok))
    assert res.info["stop_reason"].startswith("time budget") and "phase1 at step 1 of 3" in res.info["stop_reason"]
    assert res.metrics["phase1_steps_done"] == 1 and res.metrics["total_steps"] < 6
    full = run_finetune(df, lookup, tiny_finetune_config(phase1_max_steps=2, phase2_max_steps=2, english_ppl=False,
                                                         linking_eval_items=0), tmp_path / "work2", special_tokens=(),
                        base=(tiny_llama(smollm2_tokenizer()), smollm2_tokenizer()))
    assert full.info["stop_reason"] == "step budget" and full.metrics["total_steps"] == 4


def test_benchmark_gpu_flag_sets_gpu_scale_but_keeps_explicit_values():
    from animind_assets.benchmarks.beauty_llm import parse_args

    cpu = parse_args([])
    assert cpu.train_seconds == 1800 and cpu.test_users == 500 and cpu.train_layers == 2 and not cpu.gpu
    gpu = parse_args(["--gpu", "--test-users", "300"])
    assert gpu.train_seconds == 240 and gpu.batch_size == 32 and gpu.train_layers == 0 and gpu.max_history == 20
    assert gpu.test_users == 300  # an explicit value wins over the GPU-scale default
    assert parse_args(["--gpu", "--test-users", "500"]).test_users == 500  # also one equal to the CPU default
    # the best CPU recipe: collaborative IDs of a SASRec trained first, which is also the distillation teacher
    assert (gpu.sids, gpu.next_id_format, gpu.distill_weight, gpu.train_sasrec) == ("sasrec", "sequence", 0.5, True)
    assert gpu.sasrec_seconds == 90
    given = parse_args(["--gpu", "--sasrec-dir", "/some/sasrec_model"])
    assert not given.train_sasrec and given.sasrec_dir == "/some/sasrec_model"
    plain = parse_args(["--gpu", "--sids", "reference", "--distill-weight", "0"])
    assert not plain.train_sasrec and plain.sids == "reference"
    assert not cpu.train_sasrec and cpu.sids == "reference" and cpu.distill_weight == 0
    # --model-dir evaluates only: no teacher, no SASRec training; the question form gets no distillation default
    only = parse_args(["--gpu", "--model-dir", "/some/folder", "--sasrec-dir", "/s"])
    assert only.distill_weight == 0 and not only.train_sasrec
    question = parse_args(["--gpu", "--next-id-format", "question"])
    assert question.distill_weight == 0 and question.train_sasrec and question.sids == "sasrec"
    for bad in (["--train-sasrec", "--sasrec-dir", "/x"], ["--train-sasrec", "--data", "/my/split"],
                ["--gpu", "--data", "/my/split"], ["--distill-weight", "0.5"], ["--keep-layers", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_benchmark_cpu_recipe_sets_z1s_flags_but_keeps_explicit_values(monkeypatch):
    """``--cpu-recipe``: Z1's recipe (base rows frozen, distillation 0.8 from a SASRec trained first, 9-token
    prompts, ...); bf16 follows the CPU's AMX-BF16; explicit flags win; with ``--model-dir`` nothing is trained or
    distilled; ``--gpu`` with it is refused."""
    from animind_assets.benchmarks import beauty_llm
    from animind_assets.lib.common import device

    build_cfg = beauty_llm.build_finetune_config
    monkeypatch.setattr(device, "cpu_info", lambda *a, **k: {"model": "x", "cpus": 2, "extensions": ["AMX-BF16"], "missing": []})
    r = beauty_llm.parse_args(["--cpu-recipe", "--test-users", "0"])
    assert r.freeze_base_token_rows and r.train_sasrec and r.bf16 and r.no_chat_template and r.test_users == 0
    assert (r.sids, r.next_id_format, r.distill_weight, r.lr, r.lr_decay_frac, r.threads) == ("sasrec", "sequence", 0.8, 2e-3, 0.25, 2)
    assert (r.system_prompt, r.sequence_instruction, r.max_history, r.eval_dtype) == ("", "IDs:", 20, "bfloat16")
    assert r.train_layers == 4 and r.id_input_rows and build_cfg(r).id_input_rows and build_cfg(r).train_layers == 4
    off = beauty_llm.parse_args(["--cpu-recipe", "--no-id-input-rows", "--train-layers", "2"])
    assert not off.id_input_rows and off.train_layers == 2 and not beauty_llm.parse_args([]).id_input_rows
    assert not beauty_llm.parse_args([]).freeze_base_token_rows  # the plain default is unchanged
    mine = beauty_llm.parse_args(["--cpu-recipe", "--lr", "1e-3", "--sasrec-dir", "/s", "--threads", "1"])
    assert mine.lr == 1e-3 and mine.threads == 1 and not mine.train_sasrec and mine.lr_decay_frac == 0.25
    monkeypatch.setattr(device, "cpu_info", lambda *a, **k: {"model": "x", "cpus": 2, "extensions": [], "missing": ["AMX-BF16"]})
    assert not beauty_llm.parse_args(["--cpu-recipe"]).bf16
    only = beauty_llm.parse_args(["--cpu-recipe", "--model-dir", "/some/folder", "--sasrec-dir", "/s"])
    assert only.distill_weight == 0 and not only.train_sasrec
    with pytest.raises(SystemExit):
        beauty_llm.parse_args(["--cpu-recipe", "--gpu"])
    ens = beauty_llm.parse_args(["--cpu-recipe", "--sasrec-dir", "/s", "--teacher-sasrec-dir", "/t", "--teacher-sasrec-dir", "/u"])
    assert ens.teacher_sasrec_dir == ["/t", "/u"] and ens.distill_weight == 0.8


def test_benchmark_trains_each_teacher_member_with_its_own_seed(tmp_path, monkeypatch):
    """``--teacher-ensemble``'s members: benchmarks.beauty runs with seeds --seed + k into their own folders, with the
    run's users, threads and budget; a member that fails or saves no model stops the run, naming its seed."""
    from animind_assets.benchmarks import beauty as beauty_bench
    from animind_assets.benchmarks import beauty_llm

    calls = []

    def fake_main(argv):
        calls.append(argv)
        (tmp_path / argv[argv.index("--out") + 1].split("/")[-1] / "sasrec_model").mkdir(parents=True)
        return 0

    monkeypatch.setattr(beauty_bench, "main", fake_main)
    args = beauty_llm.parse_args(["--cpu-recipe", "--teacher-ensemble", "3", "--seed", "5", "--sasrec-seconds", "60",
                                  "--sasrec-early-stop", "nll"])
    assert beauty_llm._train_teacher_members(beauty_llm.parse_args(["--cpu-recipe"]), tmp_path) == []
    dirs = beauty_llm._train_teacher_members(args, tmp_path)
    assert dirs == [str(tmp_path / "sasrec_seed6" / "sasrec_model"), str(tmp_path / "sasrec_seed7" / "sasrec_model")]
    assert [c[c.index("--seed") + 1] for c in calls] == ["6", "7"]
    assert all(c[c.index("--models") + 1] == "sasrec" for c in calls)  # the members' popularity rows: not needed
    assert all(c[c.index("--sasrec-seconds") + 1] == "60.0" and c[c.index("--threads") + 1] == "2" for c in calls)
    assert all(c[c.index("--sasrec-early-stop") + 1] == "nll" for c in calls)
    assert beauty_bench.parse_args(calls[0]).sasrec_early_stop == "nll"  # a flag benchmarks.beauty takes
    monkeypatch.setattr(beauty_bench, "main", lambda argv: 1)
    with pytest.raises(SystemExit, match="seed 8"):
        beauty_llm._train_sasrec(args, tmp_path / "sasrec_seed8", 8, "sasrec")


def test_benchmark_teacher_of_saved_sasrecs_and_its_fingerprint(tmp_path):
    """``beauty_llm.sasrec_teacher``: one folder gives that SASRec's logits and the one-SASRec fingerprint of earlier
    runs (their checkpoints still resume); two give the mean of their probabilities and a fingerprint of both that
    does not depend on their order; a SASRec of another catalog size stops the run, naming its folder."""
    import torch

    from animind_assets.benchmarks.beauty_llm import sasrec_teacher
    from animind_assets.lib.llm.distill import position_logits_teacher, teacher_fingerprint
    from animind_assets.lib.retrieval.sasrec import SASRec, SASRecConfig, load_sasrec, save_sasrec

    cfg = SASRecConfig(hidden=16, blocks=1, heads=1, dropout=0.0)
    cfg.train.max_len = 4
    dirs = []
    for seed, n in ((0, 12), (1, 12), (2, 9)):
        torch.manual_seed(seed)
        dirs.append(save_sasrec(SASRec(n, cfg), str(tmp_path / f"s{seed}")))
    seqs = [[3, 5, 7], [1, 2, 3, 4, 5, 6]]
    one, fp_one = sasrec_teacher(dirs[:1], 12)
    m0, m1 = load_sasrec(dirs[0])[0], load_sasrec(dirs[1])[0]
    assert fp_one == teacher_fingerprint(*m0.state_dict().values())
    assert torch.allclose(one(seqs), position_logits_teacher(m0)(seqs))
    two, fp_two = sasrec_teacher(dirs[:2], 12)
    want = (torch.softmax(position_logits_teacher(m0)(seqs), 1) + torch.softmax(position_logits_teacher(m1)(seqs), 1)) / 2
    assert torch.allclose(two(seqs).exp(), want, atol=1e-6)
    assert fp_two != fp_one and fp_two == sasrec_teacher(dirs[1::-1], 12)[1]
    assert fp_two != sasrec_teacher([dirs[0], dirs[0]], 12)[1]  # not a set: the same SASRec twice is another teacher
    with pytest.raises(SystemExit, match="s2.* scores 9 items, the split has 12"):
        sasrec_teacher([dirs[0], dirs[2]], 12)


def test_benchmark_ranks_frame_maps_users_to_their_split_rows():
    """``sequence_eval.ranks_frame`` (``beauty_llm``'s ``<out>/ranks.parquet``): one row per evaluated user, with the row in the split that ``subset`` selects by."""
    from types import SimpleNamespace

    from animind_assets.lib.llm.sequence_eval import ranks_frame
    from animind_assets.lib.retrieval.evaluation import SequenceSplit

    split = SequenceSplit.from_sequences({7: [0, 1, 2, 3], 3: [1, 2, 3], 9: [3, 2, 1, 0]}, n_items=5)
    rows = np.array([0, 2])  # users 3 and 9

    def res(a, b):
        return SimpleNamespace(users=split.users[rows], ranks={"masked": np.array(a), "unmasked": np.array(b)})

    f = ranks_frame(SimpleNamespace(lm=res([0, 12], [1, 13]), popularity=res([4, 5], [6, 7])), split)
    assert f["user_row"].to_list() == [0, 2] and f["user_id"].to_list() == [3, 9]
    assert f["lm_masked"].to_list() == [0, 12] and f["popularity_unmasked"].to_list() == [6, 7]


def test_benchmark_fine_tune_flags_reach_the_finetune_config(monkeypatch):
    """``beauty_llm``'s flags become ``FinetuneConfig`` fields: the recipe's frozen base rows, task shares and decay,
    and the English replay mix (``--replay-ratio``, off unless given)."""
    from animind_assets.benchmarks import beauty_llm
    from animind_assets.lib.common import device

    monkeypatch.setattr(device, "cpu_info", lambda *a, **k: {"model": "x", "cpus": 2, "extensions": ["AMX-BF16"], "missing": []})
    cfg = beauty_llm.build_finetune_config(beauty_llm.parse_args(
        ["--cpu-recipe", "--sasrec-dir", "/s", "--phase2-weights", "0.05,0.9,0.05", "--replay-ratio", "0.2", "--replay-prompts", "40"]))
    assert cfg.train_base_token_rows is False and cfg.lr_decay_frac == 0.25 and cfg.distill_weight == 0.8
    assert dict(cfg.phase2_weights) == {"A": 0.05, "B": 0.9, "C": 0.05} and cfg.max_train_seconds == 1800.0
    assert (cfg.replay_ratio, cfg.replay_prompts) == (0.2, 40)
    assert cfg.row_sampling == "replacement"  # --cpu-recipe is Z1 as measured (its rows were drawn with replacement)
    assert beauty_llm.build_finetune_config(beauty_llm.parse_args([])).row_sampling == "passes"
    plain = beauty_llm.build_finetune_config(beauty_llm.parse_args(["--row-sampling", "replacement"]))
    assert plain.replay_ratio == 0.0 and plain.train_base_token_rows is True and plain.row_sampling == "replacement"
    # --seed (users, RQ-KMeans, SASRec) leaves the fine-tune's seed alone; --finetune-seed sets it
    assert cfg.seed == 42 and beauty_llm.build_finetune_config(beauty_llm.parse_args(["--seed", "1"])).seed == 42
    assert beauty_llm.build_finetune_config(beauty_llm.parse_args(["--seed", "1", "--finetune-seed", "43"])).seed == 43


@pytest.mark.parametrize("argv,says", [
    (["--beams", "5"], "at least 10"),
    (["--test-users", "-1"], "--test-users must be >= 0"),
    (["--cpu-recipe", "--model-dir", "/f"], "set by --cpu-recipe"),  # the recipe's IDs need the SASRec that made them
    (["--gpu", "--model-dir", "/f"], "set by --gpu"),
    (["--sids", "sasrec"], "pass --sasrec-dir"),
    (["--cpu-recipe", "--next-id-format", "question", "--sasrec-dir", "/s"], "sequence-form recipe"),
    (["--cpu-recipe", "--data", "/my/split"], "--cpu-recipe with --data"),
    (["--phase2-weights", "0.2,0.8"], "three comma-separated shares"),  # used to drop task C silently
    (["--phase1-weights", "1,-1,1"], "--phase1-weights"),
    (["--replay-ratio", "1.5"], "replay_ratio must be in"),  # FinetuneConfig's check, before the data is read
    (["--teacher-ensemble", "0"], "--teacher-ensemble must be >= 1"),
    (["--cpu-recipe", "--sasrec-dir", "/s", "--teacher-ensemble", "2"], "pass each extra saved one as --teacher-sasrec-dir"),
    (["--cpu-recipe", "--teacher-sasrec-dir", "/t"], "trains its own (--train-sasrec (set by --cpu-recipe"),
    (["--next-id-format", "sequence", "--distill-weight", "0.5", "--teacher-sasrec-dir", "/t"], "pass --sasrec-dir too"),
    (["--cpu-recipe", "--sasrec-dir", "/s", "--teacher-sasrec-dir", "/s/"], "the same SASRec twice"),
    (["--cpu-recipe", "--sasrec-dir", "/s", "--teacher-sasrec-dir", "/t", "--teacher-sasrec-dir", "/t"], "twice (/t)"),
    (["--cpu-recipe", "--model-dir", "/f", "--sasrec-dir", "/s", "--teacher-ensemble", "2"], "--model-dir evaluates"),
    (["--gpu", "--next-id-format", "question", "--teacher-ensemble", "2"], "add --next-id-format sequence"),
    (["--cpu-recipe", "--sasrec-dir", "/s", "--teacher-sasrec-dir", "/t", "--distill-weight", "0"], "set --distill-weight > 0"),
    # input-side ID rows need frozen blocks below the trained ones; the message names the preset that set each value
    (["--cpu-recipe", "--sasrec-dir", "/s", "--train-layers", "0"], "--id-input-rows (set by --cpu-recipe)"),
    (["--cpu-recipe", "--sasrec-dir", "/s", "--keep-layers", "4"], "below --keep-layers 4: pass --no-id-input-rows"),
    (["--gpu", "--sasrec-dir", "/s", "--id-input-rows"], "--train-layers 0 (set by --gpu)"),
    # every block of the embedded base (30, read from its GGUF header) trained: no block below for the rows
    (["--cpu-recipe", "--sasrec-dir", "/s", "--train-layers", "30"], "(set by --cpu-recipe) adds rows below the trained "
     "blocks, so --train-layers 30 must be > 0 and below the base model's 30 blocks"),
    (["--cpu-recipe", "--sasrec-dir", "/s", "--train-layers", "30", "--keep-layers", "31"], "base model's 30 blocks"),
])
def test_benchmark_refuses_flag_combinations_before_any_work(argv, says, capsys):
    """Combinations that could only fail after the dataset build or the whole fine-tune (the top-10 metrics with
    fewer beams, recipe IDs without their SASRec, ...) stop at parsing with one line naming the flag to pass."""
    from animind_assets.benchmarks import beauty_llm

    with pytest.raises(SystemExit) as exc:
        beauty_llm.parse_args(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_benchmarks_without_their_data_measure_nothing_and_exit_non_zero(tmp_path, monkeypatch, capsys):
    from animind_assets.benchmarks import beauty_llm, finetune_mal


    assert beauty_llm.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "prepared Beauty split not found" in capsys.readouterr().err
    from animind_assets.lib.data.amazon import beauty_dir

    if (beauty_dir() / "inter.json").exists():  # a wrong --model-dir fails before the dataset is built
        assert beauty_llm.main(["--model-dir", str(tmp_path / "nofolder"), "--out", str(tmp_path / "o")]) == 2
        assert "--model-dir" in capsys.readouterr().err
    monkeypatch.setenv("ANIMIND_SHARED_DATA", str(tmp_path / "none"))
    assert finetune_mal.main(["--out", str(tmp_path / "m")]) == 2
    assert "anilist.sqlite not found" in capsys.readouterr().err
    for bad in (["--num-beams", "5"], ["--eval-users", "-1"], ["--threads", "0"], ["--phase2-weights", "0,0,0"],
                ["--phase1-weights", "a,b,c"]):
        with pytest.raises(SystemExit):
            finetune_mal.main(bad)
    from animind_assets.lib.llm.finetune_config import task_weights_from_text

    assert task_weights_from_text("0.1, 0.8,0.1") == {"A": 0.1, "B": 0.8, "C": 0.1}


def test_a_trie_without_end_token_refuses_prefix_ids():
    """Without EOS a decoded path ends at the first complete ID, so an ID that is a prefix of another would hide
    the longer one: refused in either order of insertion; with an end token both stay reachable."""
    from animind_assets.lib.semantic_ids.trie import SidTrie

    for first, second in (((1, 2), (1, 2, 3)), ((1, 2, 3), (1, 2))):
        t = SidTrie()
        t.add(first, item="a")
        with pytest.raises(ValueError, match="prefix-free"):
            t.add(second, item="b")
        e = SidTrie(end_token_id=0)
        e.add(first, item="a")
        e.add(second, item="b")
        assert e.item(first + (0,)) == "a" and e.item(second + (0,)) == "b"
    ok = SidTrie()
    ok.add((1, 2), item="a")
    ok.add((1, 3), item="b")
    assert ok.allowed((1,)) == [2, 3] and ok.is_complete((1, 3))


def test_layer_pruning_keeps_the_first_and_the_last_blocks_and_the_model_folder_round_trips(tmp_path):
    """keep_layers=N keeps blocks 0..N-2 and the last one (weights unchanged, KV-cache slots renumbered), the
    fine-tune trains the pruned stack, and the saved folder loads as the same pruned model."""
    import torch

    from animind_assets.lib.llm.base_model import prune_layers
    from animind_assets.lib.llm.finetune import run_finetune, save_model_folder
    from animind_assets.lib.llm.infer import load_sid_model
    from animind_assets_tests.llm_fixtures import tiny_finetune_config

    tok = smollm2_tokenizer()
    model = tiny_llama(tok, layers=4)
    last = model.model.layers[3].mlp.down_proj.weight.detach().clone()
    first = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert prune_layers(model, 2) == [0, 3]
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, last)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, first)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    ids = tok("lip gloss", return_tensors="pt").input_ids
    with torch.no_grad():  # cached generation indexes the cache by layer_idx: must run on the pruned stack
        out = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3
    assert prune_layers(model, 5) == [0, 1]  # nothing to drop
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_layers(model, 0)

    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, CFG).frame
    lookup = item_lookup(items, sids)
    cfg = tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=1, english_ppl=False, linking_eval_items=0,
                               keep_layers=3, train_layers=1)
    res = run_finetune(df, lookup, cfg, tmp_path / "work", special_tokens=(), base=(tiny_llama(tok, layers=5), tok))
    assert res.metrics["kept_layers"] == 3 and len(res.model.model.layers) == 3
    # the resume kind of fault (../shared/cases: resumed silently with changed settings): the kept depth is part of
    # the work folder's fingerprint, so checkpoints of another depth are never resumed
    assert cfg.fingerprint_dict() != tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=1, english_ppl=False,
                                                          linking_eval_items=0, train_layers=1).fingerprint_dict()
    save_model_folder(res, lookup, tmp_path / "model")
    sm = load_sid_model(tmp_path / "model")
    assert sm.model.config.num_hidden_layers == 3 and len(sm.model.model.layers) == 3
    probe = sm.tokenizer("nail serum", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(sm.model(probe).logits, res.model.eval()(probe).logits, atol=1e-5)


def _saved_tiny_model(tmp_path):
    """The tiny split fine-tuned for one step per phase and saved to ``tmp_path / "model"``: (items, inter, sids,
    dataset frame, lookup)."""
    from animind_assets.lib.llm.finetune import run_finetune, save_model_folder
    from animind_assets_tests.llm_fixtures import tiny_finetune_config

    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, CFG).frame
    lookup = item_lookup(items, sids)
    tok = smollm2_tokenizer()
    res = run_finetune(df, lookup, tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=1, english_ppl=False,
                                                        linking_eval_items=0), tmp_path / "work", special_tokens=(),
                       base=(tiny_llama(tok), tok))
    save_model_folder(res, lookup, tmp_path / "model")
    return items, inter, sids, df, lookup


def test_benchmark_model_dir_evaluates_a_saved_folder_only_with_the_same_ids(tmp_path):
    """beauty_llm --model-dir: the saved folder is evaluated when its IDs equal those the flags build, and refused
    (naming the folder) when they differ; it cannot be combined with training flags."""
    import argparse

    from animind_assets.benchmarks.beauty_llm import _saved_folder, parse_args

    items, inter, sids, df, lookup = _saved_tiny_model(tmp_path)
    args = argparse.Namespace(model_dir=str(tmp_path / "model"), next_id_format=CFG.next_id_format)
    folder, metrics, stop, _ = _saved_folder(args, lookup, log=lambda _m: None)
    assert folder == tmp_path / "model" and metrics["total_steps"] == 2 and stop.startswith("--model-dir")
    # what is reported about input-side ID rows comes from the folder, not from a recipe's flag
    recipe = argparse.Namespace(**{**vars(args), "id_input_rows": True})
    _saved_folder(recipe, lookup, log=lambda _m: None)
    assert recipe.id_input_rows is False
    info_path = tmp_path / "model" / "animind_llm.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "id_input_rows": {"file": "id_input_rows.safetensors", "layer": 1,
                                                                "n_base": 10, "rows": 3, "dim": 4}}))
    with pytest.raises(SystemExit, match="model: .*id_input_rows.safetensors: animind_llm.json lists"):
        _saved_folder(recipe, lookup, log=lambda _m: None)  # before any search process starts
    import torch
    from safetensors.torch import save_file

    save_file({"rows": torch.zeros(3, 4)}, str(tmp_path / "model" / "id_input_rows.safetensors"))
    with pytest.raises(SystemExit, match=r"n_base 10 \+ rows 3 != vocab_size"):  # an entry that fits no model
        _saved_folder(recipe, lookup, log=lambda _m: None)
    (tmp_path / "model" / "id_input_rows.safetensors").unlink()
    info_path.write_text(json.dumps(info))
    swapped = lookup.with_columns(pl.col("semantic_id").shift(1).fill_null(lookup["semantic_id"][-1]))
    with pytest.raises(SystemExit, match="differs from the IDs"):
        _saved_folder(args, swapped, log=lambda _m: None)
    other_form = argparse.Namespace(model_dir=str(tmp_path / "model"),
                                    next_id_format="sequence" if args.next_id_format == "question" else "question")
    with pytest.raises(SystemExit, match="form"):
        _saved_folder(other_form, lookup, log=lambda _m: None)
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", str(tmp_path / "model"), "--distill-weight", "0.5"])
    # prompts: another system message or no chat template would render other prompts than the folder was trained on
    with pytest.raises(SystemExit, match="prompts"):
        _saved_folder(args, lookup, log=lambda _m: None, dcfg=SeqLlmDataConfig(system_prompt="Recommender."))
    plain = argparse.Namespace(**{**vars(args), "no_chat_template": True})
    with pytest.raises(SystemExit, match="'use_chat_template': True"):
        _saved_folder(plain, lookup, log=lambda _m: None)
    with pytest.raises(SystemExit):  # a sequence-form instruction the flags would not build
        parse_args(["--sequence-instruction", "IDs:", "--next-id-format", "question"])


def test_a_short_sequence_instruction_reaches_every_row_and_only_the_sequence_form():
    """sequence_instruction replaces the fixed task-B prompt of the "sequence" form (train and held-out rows) and is
    refused for the question form, where it would be ignored."""
    items, inter, sids = tiny_beauty()
    cfg = SeqLlmDataConfig(**{**SEQ_CFG.__dict__, "sequence_instruction": "IDs:", "system_prompt": ""})
    df = build_next_item_dataset(items, inter, sids, cfg).frame
    b = df.filter(pl.col("task") == "B")
    assert set(b["prompt"].to_list()) == {"IDs:"} and set(df["system"].to_list()) == {""}
    assert sequence_prompt(cfg) == "IDs:" and sequence_prompt(SEQ_CFG).startswith("Write a user's")
    with pytest.raises(ValueError, match="sequence_instruction"):
        SeqLlmDataConfig(sequence_instruction="IDs:").validate()


def test_time_decay_callback_scales_the_scheduler_lr_linearly_to_zero_without_compounding():
    import time
    from types import SimpleNamespace

    import torch

    from animind_assets.lib.llm.losses import time_decay_lr_callback

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = SimpleNamespace(global_step=0)
    now = time.perf_counter()
    far = time_decay_lr_callback(now + 1000.0, 100.0)
    far.on_step_begin(None, state, None, optimizer=opt, lr_scheduler=sched)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5] and far.factor == 1.0
    mid = time_decay_lr_callback(now + 50.0, 100.0)  # half of the decay window left
    for _ in range(3):  # called again without a scheduler step: the factor applies to the scheduler's value, once
        mid.on_step_begin(None, state, None, optimizer=opt, lr_scheduler=sched)
    assert 0.45 < mid.factor <= 0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(mid.factor) and opt.param_groups[1]["lr"] == pytest.approx(0.5 * mid.factor)
    past = time_decay_lr_callback(now - 1.0, 100.0)
    past.on_step_begin(None, state, None, optimizer=opt, lr_scheduler=sched)
    assert past.factor == 0.0 and opt.param_groups[0]["lr"] == 0.0
    with pytest.raises(ValueError, match="decay_seconds"):
        time_decay_lr_callback(now, 0.0)


def test_progress_eta_is_the_time_left_in_the_budget_when_the_budget_ends_training_first():
    import time
    from types import SimpleNamespace

    from transformers import TrainerCallback  # noqa: F401  (imported before the clock starts)

    from animind_assets.lib.llm.losses import make_progress_callback

    lines, history = [], []
    t0 = time.perf_counter() - 1000.0  # 10 steps in 1,000 s: the 4,990 steps left take ~138.6 hours at that rate
    state = SimpleNamespace(global_step=10)

    def log_once(max_steps, deadline=None):
        cb = make_progress_callback("phase2", 0, lines.append, None, history, t0, max_steps, deadline)
        cb.on_log(None, state, None, logs={"loss": 1.0})

    log_once(5000)
    log_once(5000, deadline=time.perf_counter() + 1200.0)
    log_once(20, deadline=time.perf_counter() + 3600.0)  # 10 steps left (~17 minutes) end before the hour of budget
    assert "step 10/5000" in lines[0] and "ETA 138h3" in lines[0] and "budget" not in lines[0]
    assert re.search(r"ETA (19m5\ds|20m00s) \(time budget\)\)$", lines[1]), lines[1]
    assert "ETA 16m4" in lines[2] and "budget" not in lines[2], lines[2]
    assert len(history) == 3


def test_lr_decay_frac_needs_a_wall_clock_budget_and_decays_in_a_real_run(tmp_path):
    from animind_assets.lib.llm.finetune import run_finetune
    from animind_assets.lib.llm.finetune_config import FinetuneConfig
    from animind_assets_tests.llm_fixtures import tiny_finetune_config

    with pytest.raises(ValueError, match="max_train_seconds"):
        FinetuneConfig(lr_decay_frac=0.2).validate()
    with pytest.raises(ValueError, match="lr_decay_frac"):
        FinetuneConfig(lr_decay_frac=1.5, max_train_seconds=60).validate()
    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, CFG).frame
    tok = smollm2_tokenizer()
    logs: list[str] = []
    # a budget far longer than the run with a decay window of all of it: every step already runs at a factor < 1
    cfg = tiny_finetune_config(phase1_max_steps=2, phase2_max_steps=2, english_ppl=False, linking_eval_items=0,
                               max_train_seconds=600, lr_decay_frac=1.0, lr_scheduler="constant", warmup_frac=0.0)
    res = run_finetune(df, item_lookup(items, sids), cfg, tmp_path / "work", special_tokens=(), base=(tiny_llama(tok), tok),
                       log=logs.append)
    assert res.info["stop_reason"] == "step budget" and res.metrics["total_steps"] == 4
    assert sum("falling linearly to 0 at the end of the budget" in m for m in logs) == 2  # once per phase
    assert 0.9 < res.metrics["phase2_lr_decay_factor_end"] < 1.0
    # the step budget ended training long before the decay window's end: said so
    assert any("still at x" in m and "was not reached" in m for m in logs)
    # the logged learning rate is the one applied (scheduler x factor), with the factor beside it
    logged = [h for h in res.history if "lr_decay_factor" in h]
    assert logged and all(0.9 < h["lr_decay_factor"] < 1.0 for h in logged)
    assert all(h["learning_rate"] < cfg.phase1_lr for h in logged)
    # a constant schedule: the logged rate is exactly the phase's rate x the factor applied at that step
    for h in logged:
        lr = cfg.phase1_lr if h["phase"] == "phase1" else cfg.phase2_lr
        assert h["learning_rate"] == pytest.approx(lr * h["lr_decay_factor"], rel=1e-9)
    assert "lr_decay_frac" in cfg.fingerprint_dict()
    with pytest.raises(ValueError, match="LambdaLR"):
        FinetuneConfig(lr_decay_frac=0.2, max_train_seconds=60, lr_scheduler="reduce_lr_on_plateau").validate()


def test_lr_decay_flags_need_a_wall_clock_budget():
    from animind_assets.benchmarks import finetune_mal
    from animind_assets.benchmarks.beauty_llm import parse_args

    assert parse_args(["--lr-decay-frac", "0.25"]).lr_decay_frac == 0.25  # the default 30-minute budget
    with pytest.raises(SystemExit):
        parse_args(["--lr-decay-frac", "0.25", "--train-seconds", "0"])
    with pytest.raises(SystemExit):
        finetune_mal.main(["--lr-decay-frac", "0.25"])  # no --train-seconds: refused before any data is read


def test_finetune_mal_eval_only_needs_a_finished_run_and_the_same_semantic_ids(tmp_path, monkeypatch):
    """``finetune_mal --eval-only`` refuses a folder without a finished run, and a model is never evaluated against
    semantic IDs other than the ones stored by the run that trained it (the first differing anime is named)."""
    import duckdb

    from animind_assets.benchmarks import finetune_mal

    db = tmp_path / "animind.duckdb"
    assert finetune_mal.stored_tables(db, ["semantic_ids"]) == {}  # no file: nothing stored
    sids = pl.DataFrame({"anime_id": [1, 2, 3], "semantic_id": ["<L1_0><L2_0>", "<L1_0><L2_1>", "<L1_1><L2_0>"]})
    con = duckdb.connect(str(db))
    con.register("s", sids.to_arrow())
    con.execute("create table main.semantic_ids as select * from s")
    con.close()
    stored = finetune_mal.stored_tables(db, ["semantic_ids", "llm_prep_dataset"])
    assert list(stored) == ["semantic_ids"] and stored["semantic_ids"].equals(sids)

    finetune_mal.require_same_semantic_ids(stored["semantic_ids"], sids.reverse(), db)  # row order does not matter
    changed = sids.with_columns(pl.when(pl.col("anime_id") == 2).then(pl.lit("<L1_9><L2_9>"))
                                .otherwise(pl.col("semantic_id")).alias("semantic_id"))
    with pytest.raises(ValueError, match=r"1 anime \(first: anime_id 2: stored '<L1_0><L2_1>', built '<L1_9><L2_9>'\)"):
        finetune_mal.require_same_semantic_ids(stored["semantic_ids"], changed, db)
    with pytest.raises(ValueError, match="anime_id 3"):
        finetune_mal.require_same_semantic_ids(stored["semantic_ids"], sids.head(2), db)

    # a folder with only some of the run's tables and no model is refused before anything is built
    monkeypatch.setattr(finetune_mal, "shared_data", lambda: tmp_path / "shared")
    mal = tmp_path / "shared" / "mal2020"
    mal.mkdir(parents=True)
    (mal / "anilist.sqlite").touch()
    monkeypatch.setattr(finetune_mal, "load_mal", lambda path: (pl.DataFrame(), pl.DataFrame({"user_id": [1]}), False))
    built = []
    monkeypatch.setattr(finetune_mal, "build_semantic_ids", lambda *a, **k: built.append(1))
    assert finetune_mal.main(["--out", str(tmp_path), "--eval-only"]) == 2 and not built
    assert finetune_mal.main(["--out", str(tmp_path / "typo"), "--eval-only"]) == 2 and not (tmp_path / "typo").exists()

    # a finished run is there, but the IDs built now differ: refused, and the stored run's quantizer checkpoint is
    # never overwritten (the IDs are built in a scratch folder, removed afterwards)
    con = duckdb.connect(str(db))
    con.execute("create table main.llm_prep_dataset as select 1 as x")
    con.close()
    card = tmp_path / "artifacts" / "finetuned_model" / "animind_llm.json"
    card.parent.mkdir(parents=True)
    card.write_text("{}")
    ckpt = tmp_path / "artifacts" / "rqvae_model" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"the stored run's quantizer")
    roots = []

    def build(cat, root, *a, **k):
        roots.append(Path(root))
        (Path(root) / "rqvae_model").mkdir(parents=True, exist_ok=True)
        (Path(root) / "rqvae_model" / "model.pt").write_bytes(b"another quantizer")
        return changed, "note"

    monkeypatch.setattr(finetune_mal, "build_semantic_ids", build)
    with pytest.raises(ValueError, match="anime_id 2"):
        finetune_mal.main(["--out", str(tmp_path), "--eval-only"])
    assert ckpt.read_bytes() == b"the stored run's quantizer"
    assert roots and roots[0] != tmp_path / "artifacts" and not roots[0].exists()


def test_finetune_mal_eval_only_reports_the_stored_runs_steps_not_the_flags(tmp_path):
    """The closing line of ``--eval-only`` gives the steps, batch and stop reason of the stored run's model card;
    without ``--eval-only`` it gives the flags' step caps."""
    from animind_assets.benchmarks import finetune_mal

    card = tmp_path / "animind_llm.json"
    card.write_text(json.dumps({"metrics": {"phase1_steps_done": 30.0, "phase2_steps_done": 1873.0},
                                "config": {"batch_size": 8}, "stop_reason": "time budget spent"}))
    ev = finetune_mal.build_parser().parse_args(["--out", str(tmp_path), "--eval-only", "--phase2-steps", "5"])
    line = finetune_mal.finetune_line(ev, 0.0, card)
    assert "30+1873 steps at batch 8 (time budget spent)" in line and "5" not in line.split("trained")[0]
    fresh = finetune_mal.build_parser().parse_args(["--out", str(tmp_path), "--phase1-steps", "4", "--phase2-steps", "5"])
    assert "4+5 steps at most" in finetune_mal.finetune_line(fresh, 120.0, card)
    assert "unreadable" in finetune_mal.finetune_line(ev, 0.0, tmp_path / "missing.json")


def test_finetune_mal_flags_reach_the_launchpad_config_the_assets_accept():
    """``benchmarks.finetune_mal``'s command line becomes run config the project's own assets validate: the
    short-prompt flags (``--system-prompt '' --no-chat-template``) and ``--lr`` land in their launchpad fields,
    the defaults keep the chat template and the default system prompt, and a misspelt field would be refused."""
    import dagster as dg

    from animind_assets.benchmarks import finetune_mal
    from animind_assets.definitions import defs as project
    from animind_assets.lib.llm.data import LlmDataConfig
    from animind_assets.lib.llm.finetune_config import FinetuneConfig

    job = dg.Definitions.merge(project, dg.Definitions(jobs=[dg.define_asset_job(
        "bench_mal", selection=["llm_prep_dataset", "finetuned_model", "recommendation_eval"])])).resolve_job_def("bench_mal")
    short = finetune_mal.build_run_config(finetune_mal.build_parser().parse_args(
        ["--system-prompt", "", "--no-chat-template", "--lr", "2e-3", "--freeze-base-token-rows"]))
    ops = dg.validate_run_config(job, short)["ops"]
    assert ops["finetuned_model"]["config"]["train_base_token_rows"] is False
    assert ops["finetuned_model"]["config"]["row_sampling"] == "passes"
    assert ops["llm_prep_dataset"]["config"]["system_prompt"] == ""
    assert ops["finetuned_model"]["config"]["use_chat_template"] is False
    assert ops["finetuned_model"]["config"]["phase2_lr"] == 2e-3
    default = dg.validate_run_config(job, finetune_mal.build_run_config(finetune_mal.build_parser().parse_args([])))["ops"]
    assert default["llm_prep_dataset"]["config"]["system_prompt"] == LlmDataConfig().system_prompt != ""
    assert default["finetuned_model"]["config"]["use_chat_template"] is True
    assert default["finetuned_model"]["config"]["phase2_lr"] == FinetuneConfig().phase2_lr
    assert default["finetuned_model"]["config"]["train_base_token_rows"] is True
    short["ops"]["finetuned_model"]["config"]["phase2_lrr"] = 1.0
    with pytest.raises(dg.DagsterInvalidConfigError, match="phase2_lrr"):
        dg.validate_run_config(job, short)


@pytest.mark.parametrize("argv, field", [(["--lr", "2e-3"], "phase2_lr"), (["--batch-size", "32"], "batch_size"),
                                         (["--no-chat-template"], "use_chat_template"),
                                         (["--row-sampling", "replacement"], "row_sampling"),
                                         (["--freeze-base-token-rows"], "train_base_token_rows")])
def test_finetune_mal_lr_batch_and_template_flags_never_resume_the_old_work_folder(argv, field):
    """The shared-case kind "resume with a changed seed / lr / batch size: resumes silently", for the knobs
    ``benchmarks.finetune_mal`` passes: each flag changes its ``FinetuneConfig`` field and therefore the work
    fingerprint (``cfg.fingerprint_dict()`` is hashed into the work folder's name by ``run_finetune``), so a run
    with the new value starts a new folder instead of resuming the old one."""
    from animind_assets.benchmarks import finetune_mal
    from animind_assets.lib.llm.finetune_config import FinetuneConfig

    def config(args):
        given = finetune_mal.build_run_config(finetune_mal.build_parser().parse_args(args))["ops"]["finetuned_model"]["config"]
        return FinetuneConfig(**{k: v for k, v in given.items() if k in FinetuneConfig.__dataclass_fields__})

    before, after = config([]), config(argv)
    assert getattr(before, field) != getattr(after, field)
    assert before.fingerprint_dict()[field] != after.fingerprint_dict()[field]
    assert {k for k in before.fingerprint_dict() if before.fingerprint_dict()[k] != after.fingerprint_dict()[k]} == {field}


def test_a_changed_lr_decay_frac_never_resumes_the_old_work_folder(tmp_path):
    """The shared-case kind "resume with a changed lr: resumes silently": two runs that differ only by
    lr_decay_frac get different work folders (the knob is in the work fingerprint), so neither resumes the other."""
    from animind_assets.lib.llm.finetune import run_finetune
    from animind_assets_tests.llm_fixtures import tiny_finetune_config

    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, CFG).frame
    tok = smollm2_tokenizer()
    works = []
    for frac in (0.0, 0.25):
        cfg = tiny_finetune_config(phase1_max_steps=0, phase2_max_steps=1, english_ppl=False, linking_eval_items=0,
                                   max_train_seconds=600, lr_decay_frac=frac)
        res = run_finetune(df, item_lookup(items, sids), cfg, tmp_path, special_tokens=(), base=(tiny_llama(tok), tok))
        works.append(res.info["work_fingerprint"])
    assert works[0] != works[1]



def test_sharded_evaluation_merges_to_the_unsharded_one(tiny_lm):
    """Shards (evaluate_next_item_lm's shard/num_shards) are disjoint, cover the seeded users, and their ranks merged
    (merge_shard_ranks + results_from_ranks) give exactly the unsharded evaluation's means and intervals."""
    from types import SimpleNamespace

    from animind_assets.lib.llm.sequence_eval import ranks_frame
    from animind_assets.lib.llm.sequence_eval import SeqEvalConfig, evaluate_next_item_lm, merge_shard_ranks, results_from_ranks

    sm, items, inter, sids = tiny_lm
    df = build_next_item_dataset(items, inter, sids, CFG).frame
    split = SequenceSplit.from_sequences(_seqs(inter), n_items=items.height)
    base = dict(test_users=9, seed=3, num_beams=12, n_boot=50, unconstrained_users=0, linking_items=0)
    whole = evaluate_next_item_lm(sm, df, split, SeqEvalConfig(**base))
    parts = [evaluate_next_item_lm(sm, df, split, SeqEvalConfig(**base), shard=i, num_shards=2) for i in (0, 1)]
    assert [len(p.lm.users) for p in parts] == [5, 4] and parts[1].summary["shard"] == 1
    assert not set(parts[0].lm.users.tolist()) & set(parts[1].lm.users.tolist())
    frames = [ranks_frame(SimpleNamespace(lm=p.lm, popularity=p.popularity), split) for p in parts]
    merged = merge_shard_ranks(frames, len(split), 9, 3)
    lm, pop = results_from_ranks(merged, n_boot=50, seed=3)
    assert lm.users.tolist() == whole.lm.users.tolist()
    assert lm.metrics == whole.lm.metrics and lm.ci == whole.lm.ci and pop.metrics == whole.popularity.metrics
    with pytest.raises(ValueError, match="more than one shard"):
        merge_shard_ranks([frames[0], frames[0], frames[1]], len(split), 9, 3)
    with pytest.raises(ValueError, match="missing"):
        merge_shard_ranks(frames[:1], len(split), 9, 3)
    with pytest.raises(ValueError, match="not in it"):  # the shards of another seed's users
        merge_shard_ranks(frames, len(split), 9, 4)
    with pytest.raises(ValueError, match="0 <= shard < num_shards"):
        evaluate_next_item_lm(sm, df, split, SeqEvalConfig(**base), shard=2, num_shards=2)


def _shard_folder(path, shard, n, rows, model_dir="/m", lm=0):
    """A fake finished ``beauty_llm --shard`` folder: beauty_llm.json + ranks.parquet for ``rows`` of 10 users."""
    import json

    path.mkdir(parents=True)
    args = {"model_dir": model_dir, "test_users": 0, "seed": 0, "beams": 20, "masking": "filter", "eval_dtype": "bfloat16",
            "num_shards": n, "shard": shard, "data": "", "order": "inter_json", "sids": "sasrec", "next_id_format": "sequence"}
    meta = {"args": args, "protocol": {"users_total": 10, "users_evaluated": len(rows)}, "load_end": "load 1.0",
            "summary": {"generation_seconds": 60.0, "valid_id_rate": 1.0}, "rows": [{"steps": 1846}]}
    (path / "beauty_llm.json").write_text(json.dumps(meta))
    pl.DataFrame({"user_row": rows, "user_id": [100 + r for r in rows], "lm_masked": [lm] * len(rows),
                  "lm_unmasked": [lm + 1] * len(rows), "popularity_masked": [20] * len(rows),
                  "popularity_unmasked": [20] * len(rows)}).write_parquet(path / "ranks.parquet")
    return path


def test_benchmark_merge_ranks_checks_the_shards_and_prints_one_table(tmp_path, capsys):
    """beauty_llm --merge-ranks: the shards of one evaluation give one table over every user; a shard of another
    model, a missing or doubled shard, the folder of a run that fine-tuned, or a shard run without --model-dir is refused with exit code 2 / at parsing."""
    import json

    from animind_assets.benchmarks import beauty_llm

    a = _shard_folder(tmp_path / "a", 0, 2, [0, 2, 4, 6, 8])
    b = _shard_folder(tmp_path / "b", 1, 2, [1, 3, 5, 7, 9], lm=12)
    assert beauty_llm.main(["--merge-ranks", str(a), str(b), "--out", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    assert "2 shards of /m merged, 10 of 10 test users" in out and "LM / popularity R@10 (masked): " in out
    res = json.loads((tmp_path / "all" / "beauty_llm.json").read_text())
    lm_masked = [r for r in res["rows"] if r["model"].startswith("semantic-ID") and r["masking"] == "masked"][0]
    assert lm_masked["recall@10"] == 0.5 and lm_masked["users"] == 10  # shard a hits at rank 0, shard b misses
    assert pl.read_parquet(tmp_path / "all" / "ranks.parquet")["user_row"].to_list() == list(range(10))
    other = _shard_folder(tmp_path / "c", 1, 2, [1, 3, 5, 7, 9], model_dir="/other")
    assert beauty_llm.main(["--merge-ranks", str(a), str(other), "--out", str(tmp_path / "x")]) == 2
    assert "model_dir: '/other' vs '/m'" in capsys.readouterr().err
    assert beauty_llm.main(["--merge-ranks", str(a), "--out", str(tmp_path / "x")]) == 2
    assert "needs each of 0..1 once" in capsys.readouterr().err
    assert beauty_llm.main(["--merge-ranks", str(a), str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "not a finished beauty_llm --shard run" in capsys.readouterr().err
    trained = _shard_folder(tmp_path / "t", 0, 1, list(range(10)), model_dir=None)  # a run that fine-tuned, not a shard
    assert beauty_llm.main(["--merge-ranks", str(trained), "--out", str(tmp_path / "x")]) == 2
    assert "not a --model-dir --shard run" in capsys.readouterr().err
    recipe_shard = beauty_llm.parse_args(["--cpu-recipe", "--model-dir", "/m", "--sasrec-dir", "/s", "--shard", "1/2"])
    assert beauty_llm.parse_args(["--cpu-recipe", "--sasrec-dir", "/s"]).eval_processes == 2
    assert recipe_shard.eval_processes == 1 and (recipe_shard.shard, recipe_shard.num_shards) == (1, 2)
    for argv, says in ((["--shard", "0/2"], "add --model-dir"), (["--shard", "2/2", "--model-dir", "/m"], "0 <= I < N"),
                       (["--shard", "0/2", "--model-dir", "/m", "--eval-processes", "2"], "leave out --eval-processes"),
                       (["--merge-ranks", str(a), "--shard", "0/2"], "only reads the shards' folders")):
        with pytest.raises(SystemExit):
            beauty_llm.parse_args(argv)
        assert says in capsys.readouterr().err


def test_search_in_processes_gives_the_one_process_table(tmp_path):
    """evaluate_saved_model_in_processes (beauty_llm --eval-processes, beauty_llm_eval's `processes`): spawned
    processes over shards of the users give the users, ranks, means and intervals of one process, and predictions in
    the same user order; the linking and unconstrained checks run once (first shard)."""
    import torch

    from animind_assets.defs.beauty.beauty_llm_eval import BeautyLlmEvalConfig
    from animind_assets.lib.llm.infer import load_sid_model
    from animind_assets.lib.llm.sequence_eval import SeqEvalConfig, evaluate_next_item_lm, evaluate_saved_model_in_processes

    items, inter, sids, df, lookup = _saved_tiny_model(tmp_path)
    split = SequenceSplit.from_sequences(_seqs(inter), n_items=items.height)
    cfg = SeqEvalConfig(test_users=9, seed=3, num_beams=12, n_boot=50, unconstrained_users=2, linking_items=2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each spawned process: the same float sums, so the same near-tied beams
    try:
        one = evaluate_next_item_lm(load_sid_model(tmp_path / "model", num_threads=1), df, split, cfg)
    finally:
        torch.set_num_threads(before)
    two = evaluate_saved_model_in_processes(str(tmp_path / "model"), df, split, cfg, processes=2, threads=1)
    assert two.lm.users.tolist() == one.lm.users.tolist()
    for mode in ("masked", "unmasked"):
        assert two.lm.ranks[mode].tolist() == one.lm.ranks[mode].tolist()
    assert two.lm.metrics == one.lm.metrics and two.lm.ci == one.lm.ci and two.popularity.metrics == one.popularity.metrics
    assert two.predictions["user_id"].to_list() == one.predictions["user_id"].to_list()
    assert two.predictions["ranked_items"].to_list() == one.predictions["ranked_items"].to_list()
    assert two.summary["processes"] == 2 and two.summary["users"] == 9 and two.summary["valid_id_rate"] == 1.0
    assert "unconstrained_valid_id_rate" in two.summary and "sid_to_title_retrieval@1" in two.summary
    with pytest.raises(ValueError, match="processes must be >= 1"):
        evaluate_saved_model_in_processes(str(tmp_path / "model"), df, split, cfg, processes=0)
    fields = BeautyLlmEvalConfig.model_fields
    assert "processes" in fields and "shard" not in fields
