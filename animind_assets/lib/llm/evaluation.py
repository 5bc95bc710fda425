"""Offline evaluation of the semantic-ID recommender (``recommendation_eval``).

For each test user of ``llm_prep_dataset`` (the held-out task-B rows: the list without its last
item, the last item masked) the model ranks anime by beam search constrained to the trie of valid
semantic IDs; the user's own list is excluded from the trie. Baselines on the same users with the
same exclusions: popularity (training users' list counts), co-watch (sum of co-occurrence
counts with the items the model saw in the prompt, from training users' lists) and last-item
popularity (how often an anime is the last entry of a training user's list). Metrics:
Hit@K / NDCG@K (``lib/common/metrics.py``), valid-ID rate of the constrained beams, valid-ID rate of
unconstrained greedy decoding (for reference), and SID->title accuracy on task-A items.

This module never imports Dagster.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from animind_assets.lib.llm.infer import SidModel, generate_text, parse_sid, rank_items
from animind_assets.lib.common.metrics import ranking_metrics
from animind_assets.lib.common.progress import Progress

LogFn = Callable[[str], None]


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    num_beams: int = 10
    max_users: int = 100  # test users evaluated (0 = all), a seeded sample
    batch_size: int = 4
    exclude_seen: bool = True
    unconstrained_users: int = 20  # users for the unconstrained valid-ID reference (0 = off)
    title_items: int = 30  # task-A items for SID->title accuracy (0 = off)
    seed: int = 42
    split: str = "test"


def _norm(s: str) -> str:
    return " ".join(str(s).casefold().split())


def popularity_counts(interactions: pl.DataFrame, users: set[int]) -> dict[int, int]:
    sub = interactions.filter(pl.col("user_id").is_in(list(users)))
    return dict(sub.group_by("anime_id").len().iter_rows())


def popularity_ranking(counts: dict[int, int], exclude: set[int], k: int, allowed: set[int] | None = None) -> list[int]:
    order = sorted(counts.items(), key=lambda x: (-x[1], x[0]))
    out = []
    for a, _ in order:
        if a in exclude or (allowed is not None and a not in allowed):
            continue
        out.append(a)
        if len(out) >= k:
            break
    return out


def last_item_counts(interactions: pl.DataFrame, users: set[int]) -> dict[int, int]:
    """How often each anime is the LAST entry (by ``seq``) of a training user's list: the
    position-aware popularity a next-item model can learn. Without timestamps (MAL 2020) the last
    row is the highest anime_id of the list, i.e. recency by MAL id, which this baseline exposes."""
    sub = interactions.filter(pl.col("user_id").is_in(list(users)))
    order = ["user_id", "seq"] if "seq" in sub.columns else ["user_id"]
    last = sub.sort(order, maintain_order=True).group_by("user_id", maintain_order=True).agg(pl.col("anime_id").last())
    return dict(last.group_by("anime_id").len().iter_rows())


class CoWatch:
    """Item co-occurrence over training users' lists: score(j) = sum_{h in history} #users(h, j)."""

    def __init__(self, interactions: pl.DataFrame, users: set[int]) -> None:
        from scipy import sparse

        sub = interactions.filter(pl.col("user_id").is_in(list(users))).select("user_id", "anime_id").unique()
        self.items = np.array(sorted(set(sub["anime_id"].to_list())), dtype=np.int64)
        self.index = {int(a): i for i, a in enumerate(self.items)}
        uids = {u: i for i, u in enumerate(sorted(set(sub["user_id"].to_list())))}
        rows = np.array([uids[u] for u in sub["user_id"].to_list()], dtype=np.int64)
        cols = np.array([self.index[a] for a in sub["anime_id"].to_list()], dtype=np.int64)
        self.X = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(uids), len(self.items)))
        self.XT = self.X.T.tocsr()

    def scores(self, history: Sequence[int]) -> np.ndarray:
        idx = [self.index[a] for a in history if a in self.index]
        if not idx:
            return np.zeros(len(self.items), dtype=np.float32)
        q = np.zeros(len(self.items), dtype=np.float32)
        q[idx] = 1.0
        user_overlap = self.X @ q  # users x 1: how many of the history items each user has
        return np.asarray(self.XT @ user_overlap).ravel()

    def ranking(self, history: Sequence[int], exclude: set[int], k: int, fallback: list[int], allowed: set[int] | None = None) -> list[int]:
        sc = self.scores(history)
        order = np.lexsort((self.items, -sc))
        out = []
        for i in order.tolist():
            if sc[i] <= 0:
                break
            a = int(self.items[i])
            if a in exclude or (allowed is not None and a not in allowed):
                continue
            out.append(a)
            if len(out) >= k:
                return out
        for a in fallback:  # pad with popularity when co-occurrence runs out
            if a not in exclude and a not in out:
                out.append(a)
                if len(out) >= k:
                    break
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
    if cfg.max_users and test.height > cfg.max_users:
        rng = np.random.default_rng(cfg.seed)
        test = test[sorted(rng.choice(test.height, size=cfg.max_users, replace=False).tolist())]
    known = set(sm.sid_ids)
    missing = test.filter(~pl.col("target_anime_id").is_in(list(known))).height
    if missing:
        log(f"{missing} test targets have no semantic ID in the model's lookup; they count as misses")
    train_users = set(dataset.filter(pl.col("split") == "train")["user_id"].drop_nulls().to_list())
    pop = popularity_counts(interactions, train_users)
    last_pop = last_item_counts(interactions, train_users)
    cowatch = CoWatch(interactions, train_users)
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
    progress = Progress("constrained beam search", total=len(prompts), unit="users", log=log, every_s=15)
    model_rank: list[list[int]] = []
    model_scores: list[list[float]] = []
    seqs = valid = 0
    for s in range(0, len(prompts), cfg.batch_size):
        out = rank_items(sm, prompts[s : s + cfg.batch_size], k=kmax, num_beams=max(cfg.num_beams, kmax),
                         exclude=excludes[s : s + cfg.batch_size], batch_size=cfg.batch_size, engine=engine)
        for items in out.items:
            model_rank.append([a for a, _ in items])
            model_scores.append([sc for _, sc in items])
        seqs += out.sequences
        valid += out.valid_sequences
        progress.update(len(out.items))
    gen_secs = time.perf_counter() - t0
    pop_rank = [popularity_ranking(pop, ex, kmax, known) for ex in excludes]
    cw_rank = [cowatch.ranking(w, ex, kmax, pop_list, known) for w, ex in zip(windows, excludes)]
    last_rank = [popularity_ranking(last_pop, ex, kmax, known) for ex in excludes]
    metrics = {
        "semantic_id_lm": ranking_metrics(model_rank, targets, cfg.ks),
        "popularity": ranking_metrics(pop_rank, targets, cfg.ks),
        "cowatch": ranking_metrics(cw_rank, targets, cfg.ks),
        "last_item_popularity": ranking_metrics(last_rank, targets, cfg.ks),
    }
    metrics["semantic_id_lm"]["valid_id_rate"] = valid / max(seqs, 1)
    metrics["semantic_id_lm"]["beam_sequences"] = float(seqs)
    metrics["semantic_id_lm"]["mean_returned"] = float(np.mean([len(r) for r in model_rank])) if model_rank else 0.0
    summary: dict = {
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
        free = generate_text(sm, prompts[: cfg.unconstrained_users], max_new_tokens=int(sm.info.get("sid_levels", 4)) + 2)
        ok = sum(1 for t in free if parse_sid(t) in sm.by_sid)
        summary["unconstrained_valid_id_rate"] = ok / max(len(free), 1)
        summary["unconstrained_examples"] = free[:5]
    # SID -> title accuracy on task-A items (training linking examples)
    if cfg.title_items:
        a_rows = dataset.filter((pl.col("task") == "A") & (pl.col("template") == "sid_to_title"))
        if a_rows.height:
            rng = np.random.default_rng(cfg.seed + 1)
            n = min(cfg.title_items, a_rows.height)
            a_rows = a_rows[sorted(rng.choice(a_rows.height, size=n, replace=False).tolist())]
            answers = generate_text(sm, a_rows["prompt"].to_list(), max_new_tokens=24)
            gold = a_rows["completion"].to_list()
            exact = [float(_norm(a) == _norm(g)) for a, g in zip(answers, gold)]
            fuzzy = [difflib.SequenceMatcher(None, _norm(a), _norm(g)).ratio() for a, g in zip(answers, gold)]
            summary["sid_to_title_exact"] = float(np.mean(exact))
            summary["sid_to_title_fuzzy_ge_0_8"] = float(np.mean([f >= 0.8 for f in fuzzy]))
            summary["sid_to_title_mean_similarity"] = float(np.mean(fuzzy))
            summary["sid_to_title_items"] = n
            summary["sid_to_title_examples"] = [
                {"gold": g, "answer": a} for g, a in list(zip(gold, answers))[:5]
            ]
    preds = pl.DataFrame(
        {
            "user_id": users,
            "target_anime_id": targets,
            "model_top": model_rank,
            "model_scores": model_scores,
            "popularity_top": pop_rank,
            "cowatch_top": cw_rank,
            "model_hit@10": [float(t in r[:10]) for t, r in zip(targets, model_rank)],
        },
        schema={
            "user_id": pl.Int64, "target_anime_id": pl.Int64, "model_top": pl.List(pl.Int64),
            "model_scores": pl.List(pl.Float64), "popularity_top": pl.List(pl.Int64),
            "cowatch_top": pl.List(pl.Int64), "model_hit@10": pl.Float64,
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
