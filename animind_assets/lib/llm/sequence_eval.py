"""The semantic-ID LM on the leave-one-out next-item evaluation of ``lib/retrieval/evaluation.py``.

Same split, users, metrics and exclusions as every other next-item model (SASRec, RPG, TIGER,
popularity on Amazon Beauty): the ``SequenceSplit`` of the interactions, a seeded user subset
(``SequenceSplit.subset(test_users, seed)``, the one ``beauty_eval --test-users`` draws), Recall@K /
NDCG@K for K = 5, 10 with ties by ascending item id, masked and unmasked, 95% percentile bootstrap
intervals over users (``evaluate_rankings``).

The LM ranks by **beam search constrained to the trie of valid semantic IDs** (``lib/llm/infer.py``),
so only real items can come out; the valid-ID rate of the returned sequences is reported (1.0 by
construction), plus the unconstrained greedy valid-ID rate for reference. Masking
(``SeqEvalConfig.masking``):

* ``filter`` (default, TIGER's rule in ``lib/retrieval/tiger.py``): one search over every ID with
  ``num_beams`` beams; *unmasked* = its top 10, *masked* = the same list with history items removed.
* ``trie``: the *masked* list comes from a search whose trie leaves the user's history out (exact
  masking inside the search, a second search gives the *unmasked* list).

The prompts are the dataset's held-out test rows (``lib/llm/sequence_data.py``); each is checked
against the split (same user, same target, history = the tail of ``seq[:-1]``), so a dataset built
from other interactions fails loudly instead of being scored on another protocol.

This module never imports Dagster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from animind_assets.lib.common.progress import Progress
from animind_assets.lib.llm.infer import SidModel, generate_text, parse_sid, rank_items
from animind_assets.lib.llm.sequence_data import SEQUENCE_TEMPLATE, sequence_prefix
from animind_assets.lib.retrieval.evaluation import (
    EvalResult,
    SequenceSplit,
    evaluate_rankings,
    evaluate_scorer,
    popularity_scorer,
    result_from_ranks,
    shard_rows,
    subset_rows,
)

LogFn = Callable[[str], None]
LM_LABEL = "semantic-ID LM (LC-Rec-style SFT)"
POPULARITY_LABEL = "popularity (train+valid counts)"


@dataclass
class SeqEvalConfig:
    test_users: int = 500  # test users (0 = all), the seeded subset SequenceSplit.subset draws for every model
    seed: int = 0  # seed of the user subset and the bootstrap
    num_beams: int = 20  # beams of the constrained search (>= 10; items returned per user)
    masking: str = "filter"  # 'filter' (one search, masked = list minus history items, as TIGER) | 'trie' (history left out of the trie)
    n_boot: int = 1000  # bootstrap resamples of the 95% intervals (0 = none)
    batch_size: int = 8  # prompts per batched beam search (lib/llm/infer.trie_beam_search_batch; of 1, 8 and 32, 8 was fastest on a CPU)
    engine: str = "cached"  # 'cached' (each prompt encoded once, its KV cache copied to its beams; batched) | 'hf' (generate)
    unconstrained_users: int = 20  # users for the unconstrained greedy valid-ID reference (0 = off)
    linking_items: int = 30  # training items per direction for ID <-> text accuracy (0 = off)

    def validate(self) -> SeqEvalConfig:
        if self.num_beams < 10:
            raise ValueError(f"num_beams ({self.num_beams}) must be >= 10 for Recall@10")
        if self.masking not in ("filter", "trie"):
            raise ValueError(f"masking must be 'filter' or 'trie', got {self.masking!r}")
        return self


@dataclass
class SeqEvalOutput:
    lm: EvalResult  # masked + unmasked ranks/metrics/CIs of the LM
    popularity: EvalResult  # the same users, the same rules
    predictions: pl.DataFrame  # user_id, target, ranked item list (unmasked search), hit flags
    summary: dict


def heldout_prompts(dataset: pl.DataFrame, split: SequenceSplit, rows: np.ndarray, stage: str = "test",
                    sids: dict[int, str] | None = None) -> tuple[list[str], list[str] | None]:
    """The dataset's held-out ``stage`` prompt of each user row of ``split`` and, for rows of the "sequence"
    form (``SEQUENCE_TEMPLATE``; needs ``sids``, item id -> semantic ID), the answer-turn prefixes (the
    history's IDs; None for the "question" form). ValueError naming the user when a row is missing or its
    target/history differ from the split (other interactions), or when the dataset mixes both forms."""
    held = dataset.filter(pl.col("is_heldout") & (pl.col("split") == stage) & (pl.col("task") == "B"))
    forms = set(held["template"].to_list()) if "template" in held.columns else set()
    if SEQUENCE_TEMPLATE in forms and len(forms) > 1:
        raise ValueError(f"held-out {stage} rows mix task-B forms {sorted(forms)}: rebuild the dataset with one next_id_format")
    seq_form = SEQUENCE_TEMPLATE in forms
    if seq_form and sids is None:
        raise ValueError("held-out rows of the 'sequence' form need the model's semantic IDs (sids) to write the history")
    by_user = {int(u): (t, h, p) for u, t, h, p in held.select("user_id", "target_anime_id", "history_anime_ids", "prompt").iter_rows()}
    hists = split.histories(stage)
    targets = split.targets(stage)
    out: list[str] = []
    prefixes: list[str] = []
    for i in rows.tolist():
        u = int(split.users[i])
        if u not in by_user:
            raise ValueError(f"dataset has no held-out {stage} row for user {u}: it was built from other interactions")
        t, h, p = by_user[u]
        want_h = hists[i].tolist()[-len(h):] if h else []
        if int(t) != int(targets[i]) or list(h) != want_h:
            raise ValueError(
                f"user {u}: the dataset's held-out {stage} row (target {t}, history tail {list(h)[-3:]}) differs from the "
                f"split (target {int(targets[i])}, history tail {want_h[-3:]}): rebuild the dataset from these interactions"
            )
        out.append(p)
        if seq_form:
            prefixes.append(sequence_prefix(h or [], sids))
    return out, (prefixes if seq_form else None)


def evaluate_next_item_lm(
    sm: SidModel,
    dataset: pl.DataFrame,
    split: SequenceSplit,
    cfg: SeqEvalConfig | None = None,
    log: LogFn | None = None,
    shard: int = 0,
    num_shards: int = 1,
) -> SeqEvalOutput:
    """LM and popularity on the same user rows of ``split`` (see module docstring). ``sm`` must be
    able to name every item of the split (the lookup covers ``0..n_items-1`` items with IDs); a
    target without an ID counts as a miss and is counted in ``targets_without_sid``.

    ``num_shards > 1``: only shard ``shard`` (0-based) of the seeded users, ``shard_rows`` (every ``num_shards``-th
    from position ``shard``), for one evaluation split over processes or machines; merge the shards' ranks with
    ``merge_shard_ranks``. ValueError for a shard outside ``0..num_shards-1``."""
    cfg = (cfg or SeqEvalConfig()).validate()
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    rows = shard_rows(split.subset(cfg.test_users, seed=cfg.seed), shard, num_shards)
    prompts, prefixes = heldout_prompts(dataset, split, rows, sids=sm.sids)
    if prefixes is not None and cfg.engine != "cached":
        raise ValueError(f"engine {cfg.engine!r} cannot evaluate the 'sequence' form of task B: use engine 'cached'")
    hists = split.histories("test")
    known = set(sm.sid_ids)
    targets = split.targets("test")[rows]
    missing = int(sum(int(t) not in known for t in targets.tolist()))
    if missing:
        log(f"{missing} test targets have no semantic ID in the model's lookup; they count as misses")
    progress = Progress("LM constrained beam search", total=len(prompts), unit="users", log=log, every_s=30)
    unmasked: list[list[int]] = []
    masked: list[list[int]] = []
    seqs = valid = 0
    for s in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[s : s + cfg.batch_size]
        pre = prefixes[s : s + cfg.batch_size] if prefixes is not None else None
        out = rank_items(sm, chunk, k=cfg.num_beams, num_beams=cfg.num_beams, batch_size=cfg.batch_size, engine=cfg.engine,
                         prefixes=pre)
        seqs += out.sequences
        valid += out.valid_sequences
        unmasked += [[a for a, _ in items] for items in out.items]
        if cfg.masking == "trie":
            ex = [set(hists[i].tolist()) for i in rows[s : s + cfg.batch_size].tolist()]
            out_m = rank_items(sm, chunk, k=cfg.num_beams, num_beams=cfg.num_beams, exclude=ex, batch_size=cfg.batch_size,
                               engine=cfg.engine, prefixes=pre)
            seqs += out_m.sequences
            valid += out_m.valid_sequences
            masked += [[a for a, _ in items] for items in out_m.items]
        progress.update(len(chunk))
    gen_seconds = time.perf_counter() - t0
    rankings = {"unmasked": [r[:10] for r in unmasked], "masked": masked if cfg.masking == "trie" else unmasked}
    extra = {"invalid_id_rate": 1.0 - valid / max(seqs, 1), "valid_id_rate": valid / max(seqs, 1), "beams": cfg.num_beams,
             "users_per_s": len(rows) / max(gen_seconds, 1e-9), "targets_without_sid": missing}
    lm = evaluate_rankings(rankings, split, "test", LM_LABEL, rows=rows, n_boot=cfg.n_boot, seed=cfg.seed, extra=extra)
    lm.seconds += gen_seconds
    pop = evaluate_scorer(popularity_scorer(split), split, "test", POPULARITY_LABEL, rows=rows, n_boot=cfg.n_boot, seed=cfg.seed)
    summary: dict = {
        "users": int(len(rows)),
        "users_total": int(len(split)),
        "items_ranked": int(split.n_items),
        "catalog_in_model": len(known),
        "masking_rule": cfg.masking,
        "num_beams": cfg.num_beams,
        "shard": shard,
        "num_shards": num_shards,
        "generation_seconds": gen_seconds,
        "users_per_s": extra["users_per_s"],
        "valid_id_rate": extra["valid_id_rate"],
    }
    if cfg.unconstrained_users:
        levels = int(sm.info.get("sid_levels", 4) or 4)
        # the sequence form's answer goes on with the next ID: read exactly one ID's worth of tokens
        free = generate_text(sm, prompts[: cfg.unconstrained_users], max_new_tokens=levels if prefixes is not None else levels + 2,
                             prefixes=prefixes[: cfg.unconstrained_users] if prefixes is not None else None)
        summary["unconstrained_valid_id_rate"] = sum(parse_sid(t) in sm.by_sid for t in free) / max(len(free), 1)
        summary["unconstrained_examples"] = free[:5]
    if cfg.linking_items:
        from animind_assets.lib.llm.evaluation import linking_accuracy

        summary.update({k: v for k, v in linking_accuracy(sm, dataset, cfg.linking_items, seed=cfg.seed + 1, log=log).items()
                        if isinstance(v, (int, float))})
    preds = pl.DataFrame(
        {"user_id": split.users[rows].tolist(), "target_item_id": targets.tolist(), "ranked_items": unmasked,
         "hit@10_unmasked": [float(int(t) in r[:10]) for t, r in zip(targets.tolist(), unmasked)]},
        schema={"user_id": pl.Int64, "target_item_id": pl.Int64, "ranked_items": pl.List(pl.Int64), "hit@10_unmasked": pl.Float64},
    )
    log(f"LM R@10 masked {lm.metrics['masked']['recall@10']:.4f} vs popularity {pop.metrics['masked']['recall@10']:.4f} "
        f"on {len(rows)} users; valid-ID rate {extra['valid_id_rate']:.4f}; {extra['users_per_s']:.2f} users/s")
    return SeqEvalOutput(lm=lm, popularity=pop, predictions=preds, summary=summary)


RANK_COLUMNS = ("lm_masked", "lm_unmasked", "popularity_masked", "popularity_unmasked")


def ranks_frame(ev, split):
    """Per-user 0-based target ranks of an evaluation (``SeqEvalOutput`` ``ev`` on ``SequenceSplit`` ``split``), one row
    per evaluated user: ``user_row`` (int64, the row in ``split``; ``split.subset(n, seed)`` selects the seeded
    subsets), ``user_id``, ``lm_masked``, ``lm_unmasked``, ``popularity_masked``, ``popularity_unmasked`` (int64; a
    hit at K is rank < K; the LM's ranks come from its beam list, where a target outside the list has rank 10,
    the largest K reported; popularity's are exact full-catalog ranks). ``benchmarks.beauty_llm`` saves it as ``<out>/ranks.parquet`` so two runs can be compared user by user, or on a
    subset of the users evaluated."""
    row_of = {int(u): i for i, u in enumerate(split.users.tolist())}
    ids = [int(u) for u in ev.lm.users.tolist()]
    return pl.DataFrame({
        "user_row": [row_of[u] for u in ids], "user_id": ids,
        **{f"lm_{m}": ev.lm.ranks[m].astype("int64") for m in ("masked", "unmasked")},
        **{f"popularity_{m}": ev.popularity.ranks[m].astype("int64") for m in ("masked", "unmasked")},
    })


def merge_shard_ranks(frames: list[pl.DataFrame], total_users: int, test_users: int, seed: int) -> pl.DataFrame:
    """One frame of per-user ranks from the shards of one evaluation (each a ``ranks.parquet`` of
    ``benchmarks.beauty_llm``: ``user_row``, ``user_id`` and the int64 ``RANK_COLUMNS``), sorted by ``user_row``.

    The union must be exactly the seeded users ``subset_rows(total_users, test_users, seed)``, each once: ValueError
    naming the first duplicate, missing or foreign user rows otherwise (so a lost or doubled shard cannot pass as a
    smaller or weighted evaluation)."""
    if not frames:
        raise ValueError("no shard ranks to merge")
    need = {"user_row", "user_id", *RANK_COLUMNS}
    for i, f in enumerate(frames):
        if need - set(f.columns):
            raise ValueError(f"shard frame {i}: missing columns {sorted(need - set(f.columns))}")
    merged = pl.concat([f.select(["user_row", "user_id", *RANK_COLUMNS]) for f in frames], how="vertical").sort("user_row")
    rows = merged["user_row"].to_numpy()
    dup = np.unique(rows[1:][rows[1:] == rows[:-1]])
    if len(dup):
        raise ValueError(f"{len(dup)} user rows appear in more than one shard (first: {dup[:5].tolist()})")
    want = subset_rows(total_users, test_users, seed)
    missing, foreign = np.setdiff1d(want, rows), np.setdiff1d(rows, want)
    if len(missing) or len(foreign):
        raise ValueError(f"the shards cover {len(rows):,} user rows, the seeded subset has {len(want):,} "
                         f"(test_users {test_users}, seed {seed}, of {total_users:,}): {len(missing):,} missing "
                         f"(first: {missing[:5].tolist()}), {len(foreign):,} not in it (first: {foreign[:5].tolist()})")
    return merged


def results_from_ranks(merged: pl.DataFrame, n_boot: int = 1000, seed: int = 0) -> tuple[EvalResult, EvalResult]:
    """(LM, popularity) ``EvalResult`` of a frame of per-user ranks (``merge_shard_ranks``), with the same means and
    seeded bootstrap intervals an unsharded evaluation of those users reports."""
    users = merged["user_id"].to_numpy()
    lm = result_from_ranks(LM_LABEL, "test", users, {m: merged[f"lm_{m}"].to_numpy() for m in ("masked", "unmasked")},
                           n_boot=n_boot, seed=seed)
    pop = result_from_ranks(POPULARITY_LABEL, "test", users,
                            {m: merged[f"popularity_{m}"].to_numpy() for m in ("masked", "unmasked")}, n_boot=n_boot, seed=seed)
    return lm, pop


def _shard_worker(job: dict) -> dict:
    """One shard of ``evaluate_saved_model_in_processes`` in a spawned process: load the folder with ``threads`` torch
    threads, evaluate shard ``shard`` of ``num_shards``, return what the parent merges (picklable)."""
    import torch

    from animind_assets.lib.llm.infer import load_sid_model

    tag = f"shard {job['shard'] + 1}/{job['num_shards']}"

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {tag}: {msg}", flush=True)

    if job["quiet"]:  # the parent's quiet command holds warnings back; a spawned process starts with the defaults
        import warnings

        warnings.simplefilter("ignore")
    torch.set_num_threads(job["threads"])
    sm = load_sid_model(job["model_dir"], num_threads=job["threads"], device="cpu", dtype=job["dtype"])
    out = evaluate_next_item_lm(sm, job["dataset"], job["split"], job["cfg"], log=log, shard=job["shard"],
                                num_shards=job["num_shards"])
    return {"ranks": ranks_frame(out, job["split"]), "extra": out.lm.extra, "predictions": out.predictions,
            "summary": out.summary}


def evaluate_saved_model_in_processes(model_dir: str, dataset: pl.DataFrame, split: SequenceSplit, cfg: SeqEvalConfig,
                                      processes: int, threads: int = 1, dtype: str = "float32",
                                      log: LogFn | None = None, quiet: bool = False) -> SeqEvalOutput:
    """``evaluate_next_item_lm`` of the saved ``finetuned_model`` folder ``model_dir`` on CPU, split over
    ``processes`` spawned processes of ``threads`` torch threads each (shard k = every ``processes``-th seeded user
    from position k, ``shard_rows``), merged with ``merge_shard_ranks``: the same users, means and bootstrap
    intervals as one process would report (a one-thread matmul can round differently from a two-thread one, so a few
    near-tied beams may change places). On a 2-core CPU two 1-thread processes searched 2.7 users/s each against
    2.6-2.8 users/s for one 2-thread process (``docs/beauty.md``). The unconstrained check and the linking accuracy
    run in the first shard only. ``summary['users_per_s']`` is users over the wall time of the search. Each process
    prints its progress lines ("shard k/N: ...") to stdout; ``quiet`` ignores Python warnings there (the libraries'
    bars and log levels follow the environment the parent set, e.g. ``quiet_command``'s).
    ValueError for ``processes < 1``; a failed shard raises its error here. The workers end with this process, even
    when it is killed mid-search (``lib/common/workers.process_pool``)."""
    from dataclasses import replace

    from animind_assets.lib.common.workers import process_pool

    cfg = cfg.validate()
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    jobs = [{"model_dir": str(model_dir), "dataset": dataset, "split": split, "threads": threads, "dtype": dtype,
             "quiet": quiet, "shard": k, "num_shards": processes, "cfg": replace(cfg,
                                         unconstrained_users=cfg.unconstrained_users if k == 0 else 0,
                                         linking_items=cfg.linking_items if k == 0 else 0)} for k in range(processes)]
    log(f"LM constrained beam search in {processes} processes x {threads} thread(s)")
    with process_pool(processes) as pool:  # workers that exit when this process does, however it ends
        parts = list(pool.map(_shard_worker, jobs))
    wall = time.perf_counter() - t0
    merged = merge_shard_ranks([p["ranks"] for p in parts], len(split), cfg.test_users, cfg.seed)
    lm, pop = results_from_ranks(merged, n_boot=cfg.n_boot, seed=cfg.seed)
    seqs = [p["summary"]["users"] for p in parts]
    valid = sum(p["extra"]["valid_id_rate"] * n for p, n in zip(parts, seqs)) / max(sum(seqs), 1)
    lm.extra = {"invalid_id_rate": 1.0 - valid, "valid_id_rate": valid, "beams": cfg.num_beams,
                "users_per_s": len(merged) / max(wall, 1e-9),
                "targets_without_sid": sum(int(p["extra"]["targets_without_sid"]) for p in parts)}
    lm.seconds = pop.seconds = wall
    order = {int(u): j for j, u in enumerate(merged["user_id"].to_list())}
    preds = pl.concat([p["predictions"] for p in parts]).sort(pl.col("user_id").replace_strict(order))
    summary = {**parts[0]["summary"], "users": len(merged), "shard": 0, "num_shards": 1, "processes": processes,
               "threads_per_process": threads, "generation_seconds": wall, "users_per_s": lm.extra["users_per_s"],
               "valid_id_rate": valid}
    log(f"LM R@10 masked {lm.metrics['masked']['recall@10']:.4f} vs popularity {pop.metrics['masked']['recall@10']:.4f} "
        f"on {len(merged)} users ({processes} processes); {lm.extra['users_per_s']:.2f} users/s")
    return SeqEvalOutput(lm=lm, popularity=pop, predictions=preds, summary=summary)
