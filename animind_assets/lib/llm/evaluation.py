"""Offline evaluation of the semantic-ID recommender (``recommendation_eval``).

For each test user of ``llm_prep_dataset`` (its held-out task-B row: one item of the list masked,
some of the others shown) the model ranks anime by beam search constrained to the trie of valid
semantic IDs; the user's own list is excluded from the trie. The protocol is read from the
dataset's prompts and stated in the summary:

* ``set_completion`` (``holdout='random'``, the default without timestamps): **set completion,
  no time order**; the held-out item is a seeded random item of the list;
* ``next_item``: the last item by timestamp (leave-one-out);
* ``next_item_order_artefact``: the last *row* of a list without timestamps (MAL 2020: the
  highest MAL id); kept only to reproduce older figures.

Baselines on the same users with the same exclusions, fitted on training users' lists only
(``lib/retrieval/item_baselines.py``), all given the items the model saw in the prompt: popularity,
co-watch (raw co-occurrence item-kNN), cosine item-kNN, EASE (Steck 2019); plus
``ease_full_history`` (EASE given every other item of the user's list: what a production model with
the whole list would see; a reference, not the same input as the LM) and, only for the
next-item protocols, last-item popularity (how often an anime is the last entry of a training
user's list: the order artefact itself). Metrics: Hit@K / NDCG@K (``lib/metrics.py``), valid-ID
rate of the constrained beams, valid-ID rate of unconstrained greedy decoding (for reference), and
linking accuracy on training items (``linking_accuracy``).

This module never imports Dagster.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from animind_assets.lib.retrieval.item_baselines import EASE, CoWatch, ItemKNN, popularity_counts, popularity_ranking
from animind_assets.lib.retrieval.item_baselines import rank_scores as rank_scores
from animind_assets.lib.llm.infer import SidModel, generate_text, parse_sid, rank_items, trie_beam_search_batch
from animind_assets.lib.llm.model_folder import SEQUENCE_TEMPLATE, list_order_of, sequence_prefix
from animind_assets.lib.common.metrics import ranking_metrics
from animind_assets.lib.common.progress import Progress
from animind_assets.lib.semantic_ids.trie import SidTrie

LogFn = Callable[[str], None]
LINKING_BATCH = 8  # prompts per batched beam search of the linking check (as EvalConfig.batch_size)


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    num_beams: int = 10
    max_users: int = 100  # test users evaluated (0 = all), a seeded sample
    batch_size: int = 8  # prompts per batched beam search (lib/llm/infer.trie_beam_search_batch; of 1, 8 and 32 on Beauty, 8 was fastest on a CPU)
    exclude_seen: bool = True
    unconstrained_users: int = 20  # users for the unconstrained valid-ID reference (0 = off)
    title_items: int = 30  # task-A items for SID->title accuracy (0 = off)
    seed: int = 42
    split: str = "test"
    ease_lambda: float = 500.0  # L2 weight of EASE (Steck 2019 used 200-1000 on ML-20M / Netflix / MSD)
    knn_neighbours: int = 100  # cosine item-kNN: neighbours kept per item (0 = all)
    full_history_baseline: bool = True  # also EASE given every other item of the user's list


PROTOCOLS = {
    "set": ("set_completion", "set completion, no time order: the held-out item is a seeded random item of the "
            "user's list; the prompt shows a random subset of the other items in random order"),
    "watch": ("next_item", "leave-one-out next item: the held-out item is the user's last item by timestamp"),
    "list": ("next_item_order_artefact", "ORDER ARTEFACT: the held-out item is the last row of a list without "
             "timestamps (MAL 2020: the highest MAL id), not the last watched"),
}


def _norm(s: str) -> str:
    return " ".join(str(s).casefold().split())


def last_item_counts(interactions: pl.DataFrame, users: set[int]) -> dict[int, int]:
    """How often each anime is the LAST entry (by ``seq``) of a training user's list: the
    position-aware popularity a next-item model can learn. Without timestamps (MAL 2020) the last
    row is the highest anime_id of the list, i.e. recency by MAL id, which this baseline exposes."""
    sub = interactions.filter(pl.col("user_id").is_in(list(users)))
    order = ["user_id", "seq"] if "seq" in sub.columns else ["user_id"]
    last = sub.sort(order, maintain_order=True).group_by("user_id", maintain_order=True).agg(pl.col("anime_id").last())
    return dict(last.group_by("anime_id").len().iter_rows())


def baseline_training_users(dataset: pl.DataFrame, interactions: pl.DataFrame) -> set[int]:
    """Users whose lists the baselines are fitted on: every user of ``interactions`` that is not a
    validation/test user of ``dataset`` (including users too short for LM rows)."""
    held = set(dataset.filter(pl.col("split").is_in(["validation", "test"]) & pl.col("user_id").is_not_null())["user_id"].to_list())
    return set(interactions["user_id"].unique().to_list()) - held


def title_trie(sm: SidModel) -> SidTrie:
    """Trie over the token ids of every catalog title (``sm.titles``, tokenized as a completion:
    no special tokens) followed by EOS; leaves carry the normalized title."""
    trie = SidTrie(end_token_id=sm.eos_id)
    titles = sorted(set(sm.titles.values()))
    enc = sm.tokenizer(titles, add_special_tokens=False)["input_ids"]
    for t, ids in zip(titles, enc):
        if ids:
            trie.add(ids, item=_norm(t))
    return trie


def linking_accuracy(
    sm: SidModel,
    dataset: pl.DataFrame,
    n_items: int = 30,
    seed: int = 0,
    split: str = "train",
    num_beams: int = 5,
    log: LogFn | None = None,
) -> dict:
    """ID <-> title accuracy on ``n_items`` seeded task-A rows of ``split`` (training items: does
    the model remember what it was taught?).

    * ``sid_to_title_exact``: greedy free text == the gold title (case/space-normalized);
      ``sid_to_title_fuzzy_ge_0_8``: difflib ratio >= 0.8.
    * ``sid_to_title_retrieval@1``: beam search constrained to the trie of catalog titles
      (``title_trie``): the best complete title is the gold one (retrieval among catalog titles).
    * ``title_to_sid_exact``: greedy free text starts with the gold semantic ID;
      ``title_to_sid_retrieval@1``: the best ID of the constrained search over the ID trie is the gold
      item (``title_to_sid`` rows).

    Returns a flat dict of floats (fractions in [0, 1]) plus ``*_items`` counts and a few examples;
    keys are missing when the dataset has no rows for a direction."""
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    out: dict = {}
    rng = np.random.default_rng(seed)

    def sample(template: str) -> pl.DataFrame:
        rows = dataset.filter((pl.col("task") == "A") & (pl.col("template") == template) & (pl.col("split") == split))
        rows = rows.filter(pl.col("target_anime_id").is_in(list(sm.sid_ids)))
        if rows.height > n_items:
            rows = rows[sorted(rng.choice(rows.height, size=n_items, replace=False).tolist())]
        return rows

    to_title = sample("sid_to_title")
    if to_title.height:
        prompts = to_title["prompt"].to_list()
        gold = to_title["completion"].to_list()
        answers = generate_text(sm, prompts, max_new_tokens=24)
        fuzzy = [difflib.SequenceMatcher(None, _norm(a), _norm(g)).ratio() for a, g in zip(answers, gold)]
        trie = title_trie(sm)
        best = []
        for s in range(0, len(prompts), LINKING_BATCH):
            chunk = [sm.render(p) for p in prompts[s : s + LINKING_BATCH]]
            for res in trie_beam_search_batch(sm, chunk, [trie] * len(chunk), max(1, min(num_beams, len(trie)))):
                best.append(trie.item(res[0][0]) if res else None)
        out["sid_to_title_exact"] = float(np.mean([_norm(a) == _norm(g) for a, g in zip(answers, gold)]))
        out["sid_to_title_fuzzy_ge_0_8"] = float(np.mean([f >= 0.8 for f in fuzzy]))
        out["sid_to_title_mean_similarity"] = float(np.mean(fuzzy))
        out["sid_to_title_retrieval@1"] = float(np.mean([b == _norm(g) for b, g in zip(best, gold)]))
        out["sid_to_title_items"] = len(gold)
        out["sid_to_title_catalog_titles"] = len(trie)
        out["sid_to_title_examples"] = [{"gold": g, "answer": a} for g, a in list(zip(gold, answers))[:5]]
    to_sid = sample("title_to_sid")
    if to_sid.height:
        prompts = to_sid["prompt"].to_list()
        gold_ids = [int(a) for a in to_sid["target_anime_id"].to_list()]
        answers = generate_text(sm, prompts, max_new_tokens=int(sm.info.get("sid_levels", 4) or 4) + 2)
        ranked = rank_items(sm, prompts, k=1, num_beams=num_beams, batch_size=LINKING_BATCH)
        out["title_to_sid_exact"] = float(np.mean([parse_sid(a) == sm.sids[g] for a, g in zip(answers, gold_ids)]))
        out["title_to_sid_retrieval@1"] = float(np.mean([bool(r) and r[0][0] == g for r, g in zip(ranked.items, gold_ids)]))
        out["title_to_sid_items"] = len(gold_ids)
    out["linking_seconds"] = time.perf_counter() - t0
    if out:
        log("linking accuracy on training items: " + ", ".join(
            f"{k} {v:.3f}" for k, v in out.items() if isinstance(v, float) and not k.endswith("seconds")))
    return out


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # method -> metric -> value
    predictions: pl.DataFrame
    summary: dict


def evaluate_recommender(
    sm: SidModel,
    dataset: pl.DataFrame,
    interactions: pl.DataFrame,
    cfg: EvalConfig | None = None,
    log: LogFn | None = None,
    engine: str = "cached",
) -> EvalResult:
    cfg = cfg or EvalConfig()
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    kmax = max(cfg.ks)
    test = dataset.filter((pl.col("task") == "B") & pl.col("is_heldout") & (pl.col("split") == cfg.split)).sort("user_id")
    if test.height == 0:
        raise ValueError(f"llm_prep_dataset has no held-out task-B rows in split {cfg.split!r}")
    forms = set(test["template"].to_list()) if "template" in test.columns else set()
    if SEQUENCE_TEMPLATE in forms and len(forms) > 1:
        raise ValueError(f"held-out {cfg.split} rows mix task-B forms {sorted(forms)}: rebuild llm_prep_dataset with one next_id_format")
    data_form = "sequence" if SEQUENCE_TEMPLATE in forms else "question"
    if sm.info.get("next_id_format", "question") != data_form:
        raise ValueError(f"the model was trained on the {sm.info.get('next_id_format', 'question')!r} form of task B, the "
                         f"dataset's held-out rows are {data_form!r}: re-materialize finetuned_model on this llm_prep_dataset")
    if data_form == "sequence" and engine != "cached":
        raise ValueError(f"the 'sequence' form needs engine 'cached' (answer-turn prefixes), got {engine!r}")
    if cfg.max_users and test.height > cfg.max_users:
        rng = np.random.default_rng(cfg.seed)
        test = test[sorted(rng.choice(test.height, size=cfg.max_users, replace=False).tolist())]
    known = set(sm.sid_ids)
    missing = test.filter(~pl.col("target_anime_id").is_in(list(known))).height
    if missing:
        log(f"{missing} test targets have no semantic ID in the model's lookup; they count as misses")
    protocol, protocol_note = PROTOCOLS[list_order_of(test["prompt"].to_list())]
    train_users = baseline_training_users(dataset, interactions)
    tb = time.perf_counter()
    pop = popularity_counts(interactions, train_users)
    cowatch = CoWatch(interactions, train_users)
    knn = ItemKNN(interactions, train_users, cfg.knn_neighbours)
    ease = EASE(interactions, train_users, cfg.ease_lambda)
    log(f"baselines fitted on {len(train_users)} training users, {len(ease.items)} items in {time.perf_counter() - tb:.1f}s")
    pop_list = popularity_ranking(pop, set(), 5000)
    users = test["user_id"].to_list()
    targets = test["target_anime_id"].to_list()
    windows = test["history_anime_ids"].to_list()
    full_lists: dict[int, set[int]] = {}
    if cfg.exclude_seen:
        sub = interactions.filter(pl.col("user_id").is_in(users)).select("user_id", "anime_id")
        for u, a in sub.iter_rows():
            full_lists.setdefault(int(u), set()).add(int(a))
    excludes = [(full_lists.get(u, set()) - {t}) | set(w) if cfg.exclude_seen else set() for u, t, w in zip(users, targets, windows)]
    # model: constrained beam search over the trie minus the user's list
    prompts = test["prompt"].to_list()
    # "sequence" form: the shown items' IDs are the answer-turn prefix, the ID is decoded after them (no EOS)
    prefixes = [sequence_prefix(w or [], sm.sids) for w in windows] if SEQUENCE_TEMPLATE in forms else None
    progress = Progress("constrained beam search", total=len(prompts), unit="users", log=log, every_s=15)
    model_rank: list[list[int]] = []
    model_scores: list[list[float]] = []
    seqs = valid = 0
    for s in range(0, len(prompts), cfg.batch_size):
        out = rank_items(sm, prompts[s : s + cfg.batch_size], k=kmax, num_beams=max(cfg.num_beams, kmax),
                         exclude=excludes[s : s + cfg.batch_size], batch_size=cfg.batch_size, engine=engine,
                         prefixes=prefixes[s : s + cfg.batch_size] if prefixes is not None else None)
        for items in out.items:
            model_rank.append([a for a, _ in items])
            model_scores.append([sc for _, sc in items])
        seqs += out.sequences
        valid += out.valid_sequences
        progress.update(len(out.items))
    gen_secs = time.perf_counter() - t0
    pop_rank = [popularity_ranking(pop, ex, kmax, known) for ex in excludes]
    cw_rank = [cowatch.ranking(w, ex, kmax, pop_list, known) for w, ex in zip(windows, excludes)]
    knn_rank = [knn.ranking(w, ex, kmax, pop_list, known) for w, ex in zip(windows, excludes)]
    ease_rank = [ease.ranking(w, ex, kmax, pop_list, known) for w, ex in zip(windows, excludes)]
    metrics = {
        "semantic_id_lm": ranking_metrics(model_rank, targets, cfg.ks),
        "popularity": ranking_metrics(pop_rank, targets, cfg.ks),
        "cowatch": ranking_metrics(cw_rank, targets, cfg.ks),
        "item_knn": ranking_metrics(knn_rank, targets, cfg.ks),
        "ease": ranking_metrics(ease_rank, targets, cfg.ks),
    }
    if cfg.full_history_baseline:
        lists: dict[int, list[int]] = {}
        for u, a in interactions.filter(pl.col("user_id").is_in(users)).select("user_id", "anime_id").iter_rows():
            lists.setdefault(int(u), []).append(int(a))
        full_rank = [ease.ranking([a for a in lists.get(u, []) if a != t], ex, kmax, pop_list, known)
                     for u, t, ex in zip(users, targets, excludes)]
        metrics["ease_full_history"] = ranking_metrics(full_rank, targets, cfg.ks)
    if protocol != "set_completion":
        last_pop = last_item_counts(interactions, train_users)
        last_rank = [popularity_ranking(last_pop, ex, kmax, known) for ex in excludes]
        metrics["last_item_popularity"] = ranking_metrics(last_rank, targets, cfg.ks)
    metrics["semantic_id_lm"]["valid_id_rate"] = valid / max(seqs, 1)
    metrics["semantic_id_lm"]["beam_sequences"] = float(seqs)
    metrics["semantic_id_lm"]["mean_returned"] = float(np.mean([len(r) for r in model_rank])) if model_rank else 0.0
    summary: dict = {
        "protocol": protocol,
        "protocol_note": protocol_note,
        "next_id_format": "sequence" if prefixes is not None else "question",
        "baselines_note": (
            f"fitted on the full lists of the {len(train_users)} users outside validation/test; popularity, cowatch, item_knn and ease see the items shown in the "
            "LM prompt; ease_full_history sees every other item of the user's list (reference)"
        ),
        "ease_lambda": cfg.ease_lambda,
        "knn_neighbours": cfg.knn_neighbours,
        "users": len(users),
        "targets_without_sid": missing,
        "generation_seconds": gen_secs,
        "users_per_s": len(users) / max(gen_secs, 1e-9),
        "num_beams": max(cfg.num_beams, kmax),
        "exclude_seen": cfg.exclude_seen,
        "history_items_mean": float(np.mean([len(w) for w in windows])),
        "catalog_size": len(known),
    }
    # unconstrained greedy decoding: how often does free text form a real ID?
    if cfg.unconstrained_users:
        levels = int(sm.info.get("sid_levels", 4))  # the sequence form reads one ID after the prefix
        free = generate_text(sm, prompts[: cfg.unconstrained_users], max_new_tokens=levels if prefixes is not None else levels + 2,
                             prefixes=prefixes[: cfg.unconstrained_users] if prefixes is not None else None)
        ok = sum(1 for t in free if parse_sid(t) in sm.by_sid)
        summary["unconstrained_valid_id_rate"] = ok / max(len(free), 1)
        summary["unconstrained_examples"] = free[:5]
    # linking accuracy (ID <-> title) on training task-A items
    if cfg.title_items:
        summary.update(linking_accuracy(sm, dataset, cfg.title_items, seed=cfg.seed + 1, log=log))
    preds = pl.DataFrame(
        {
            "user_id": users,
            "target_anime_id": targets,
            "model_top": model_rank,
            "model_scores": model_scores,
            "popularity_top": pop_rank,
            "cowatch_top": cw_rank,
            "ease_top": ease_rank,
            "model_hit@10": [float(t in r[:10]) for t, r in zip(targets, model_rank)],
        },
        schema={
            "user_id": pl.Int64, "target_anime_id": pl.Int64, "model_top": pl.List(pl.Int64),
            "model_scores": pl.List(pl.Float64), "popularity_top": pl.List(pl.Int64),
            "cowatch_top": pl.List(pl.Int64), "ease_top": pl.List(pl.Int64), "model_hit@10": pl.Float64,
        },
    )
    summary["seconds"] = time.perf_counter() - t0
    log(
        "eval: "
        + ", ".join(f"{m} hit@10 {v.get('hit@10', 0):.4f}" for m, v in metrics.items())
        + f"; valid-ID rate {metrics['semantic_id_lm']['valid_id_rate']:.4f}"
    )
    return EvalResult(metrics=metrics, predictions=preds, summary=summary)


def metrics_frame(metrics: dict[str, dict[str, float]], ks: Sequence[int] = (1, 5, 10)) -> pl.DataFrame:
    rows = []
    for method, m in metrics.items():
        row = {"method": method, "n_users": int(m.get("n_queries", 0))}
        for k in ks:
            row[f"hit@{k}"] = float(m.get(f"hit@{k}", 0.0))
            row[f"ndcg@{k}"] = float(m.get(f"ndcg@{k}", 0.0))
        row["valid_id_rate"] = m.get("valid_id_rate")
        rows.append(row)
    schema = {"method": pl.Utf8, "n_users": pl.Int64, **{f"{p}@{k}": pl.Float64 for k in ks for p in ("hit", "ndcg")}, "valid_id_rate": pl.Float64}
    return pl.DataFrame(rows, schema=schema)
