"""Instruction data that teaches a causal LM to speak semantic IDs (``llm_prep_dataset``).

Three tasks, mixed by configurable ratios (default 0.5 / 0.25 / 0.25):

* **A — linking** semantic ID <-> metadata, both directions: SID->title, title->SID, SID->genres,
  title+studio->SID, SID->year, title+year->SID, SID->synopsis, SID->type, SID->studio, SID->source,
  SID->themes (only when the catalog has a ``themes`` column). The display title is ``title``
  (English name, else the original name), never "Unknown".
* **B — masked list-item prediction**: a user's list as
  ``<anime_start>{SID}<anime_end>{sentiment}`` items with one item replaced by
  ``<anime_start>[MASK]<anime_end>``; the answer is the masked item's SID. Sentiment: ``<dropped>``
  (status 4, takes precedence), ``<liked>`` (score >= 7), ``<disliked>`` (score 1..3), ``<watch>``
  otherwise (unscored or 4..6).
  With ``next_id_format="sequence"`` (set completion only) task B is written as the list itself: the
  answer turn is a random subset of a training user's list as IDs in random order (template
  ``seq_id_sequence``), so one row trains every item after the first given the items before it; a
  held-out row's shown items become the answer-turn prefix at evaluation (``sequence_prefix``).
* **C — preference reasoning** from the overlaps (shared genres, studios, era, type) of a user's
  liked anime: a profile summary, or a summary followed by one more of the user's liked anime.

Splits: task B/C examples are split **by user** (no user in two splits). Validation/test users
get exactly one B example each, with one held-out item masked at the end of the prompt
(``holdout``):

* ``random`` (the default when the order is not temporal, e.g. MAL 2020): **set completion, no
  time order**. The held-out item is a seeded random item of the user's list (seed, user id); the
  prompt shows a random subset (``max_history``) of the other items in random order, stated as
  "in no particular order". Training B rows likewise mask a random item of a random subset shown in
  random order, so list position carries no information.
* ``last``: the last item of the list (by timestamp when the source has one: leave-one-out
  next-item prediction). On data without timestamps this is an **order artefact** (the last row
  is whatever the source sorted by; for MAL 2020 the highest MAL id) and is labelled as such.

Their C examples are built from the list *without* that held-out item, so a test user's held-out
item never appears in any training row. Task A examples are item-level (split ``train``, plus a
small ``validation`` sample).

Identical examples are generated at most once: duplicates are dropped and counted
(``dup_count`` column, ``duplicates_dropped`` in the summary), never silently repeated.
Everything is deterministic for a fixed seed.

This module never imports Dagster.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from animind_assets.lib.llm.model_folder import (
    SEQUENCE_TEMPLATE,
    b_prompt,
    list_sequence_prompt,
    recommend_prompt,
    sequence_prefix,
    watch_item,
)
from animind_assets.lib.common.progress import Progress
from animind_assets.lib.semantic_ids.tokens import DISLIKED, DROPPED, LIKED, SID_PATTERN, WATCH
from animind_assets.lib.semantic_ids.tokens import SPECIAL_TOKENS as _SPECIAL_TOKENS
from animind_assets.lib.llm.dataset_schema import OUTPUT_SCHEMA, SPLITS, TASKS  # noqa: F401  (public API)
from animind_assets.lib.llm.dataset_report import (  # noqa: F401  (public API)
    _dedupe,
    example_key,
    approx_token_count,
    counts_by,
    example_rows_md,
    leakage_report,
    summary_json,
    to_chat_records,
    token_length_stats,
)
from animind_assets.lib.llm.tasks import _overlap_score, a_examples_for, c_example, era_of, overlap_summary  # noqa: F401

SPECIAL_TOKENS = list(_SPECIAL_TOKENS)
DEFAULT_SYSTEM_PROMPT = (
    "You are AniMind. Anime are written as semantic IDs."
)
A_TEMPLATES = (
    "sid_to_title",
    "title_to_sid",
    "sid_to_genres",
    "title_studio_to_sid",
    "sid_to_year",
    "title_year_to_sid",
    "sid_to_synopsis",
    "sid_to_type",
    "sid_to_studio",
    "sid_to_source",
    "sid_to_themes",
)
C_TEMPLATES = ("c_profile", "c_recommend")
TIMESTAMP_COLUMNS = ("timestamp", "watched_at", "updated_at", "ts", "event_time")
HOLDOUTS = ("auto", "random", "last")
PROTOCOL_NOTES = {
    "set_completion": "set completion, no time order: the held-out item of each validation/test user is a seeded "
    "random item of the list; the other items are shown as a random subset in random order",
    "next_item": "leave-one-out next item: the held-out item is the last of the list by timestamp",
    "next_item_order_artefact": "ORDER ARTEFACT: the held-out item is the last row of the list, but the source has "
    "no timestamps, so 'last' is the source's row order (MAL 2020: the highest MAL id), not watch time",
}


def resolve_protocol(holdout: str, temporal: bool) -> str:
    """``set_completion`` | ``next_item`` | ``next_item_order_artefact`` for a ``holdout`` setting
    (``HOLDOUTS``) and whether the list order is temporal. ValueError for an unknown setting."""
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")
    if holdout == "random" or (holdout == "auto" and not temporal):
        return "set_completion"
    return "next_item" if temporal else "next_item_order_artefact"


# ------------------------------------------------------------------------------------------ helpers
def sentiment_token(score: int | None, status: int | None, like_min: int = 7, dislike_max: int = 3) -> str:
    """Sentiment token of one list entry. ``<dropped>`` (status 4) wins over the score."""
    if status is not None and int(status) == 4:
        return DROPPED
    s = int(score or 0)
    if s >= like_min:
        return LIKED
    if 1 <= s <= dislike_max:
        return DISLIKED
    return WATCH



def _hash_id(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:16]


def _stable_seed(seed: int, *parts: Any) -> int:
    return int(_hash_id(seed, *parts)[:12], 16)


@dataclass
class LlmDataConfig:
    seed: int = 42
    n_examples: int = 20000
    mix_a: float = 0.5
    mix_b: float = 0.25
    mix_c: float = 0.25
    validation_user_frac: float = 0.1
    test_user_frac: float = 0.1
    max_eval_users: int = 0  # cap on validation and on test users each (0 = no cap)
    min_user_items: int = 4  # users with fewer list entries get no B/C examples
    max_history: int = 10  # list items shown in a B prompt (a window around the masked item)
    mask_last_prob: float = 0.7  # training B examples that mask the last item of their window
    # training B examples whose window ends at the END of the user's list, i.e. the position that is
    # held out for validation/test users (next-item prediction as evaluated); the rest use windows
    # at random positions (mask_last_prob applies to those)
    list_end_prob: float = 0.5
    like_min_score: int = 7
    dislike_max_score: int = 3
    c_max_liked: int = 6
    c_min_liked: int = 3
    c_titles_prob: float = 0.5  # C prompts that show titles next to the SIDs
    synopsis_chars: int = 240
    a_templates: list[str] = field(default_factory=lambda: list(A_TEMPLATES))
    a_catalog: str = "interacted"  # "interacted" (anime with user rows) | "all"
    a_validation_frac: float = 0.02
    timestamps: str = "auto"  # is the list order temporal? "auto" (a timestamp column exists) | "yes" | "no"
    # held-out item of a validation/test user: "random" = a seeded random item of the list (set
    # completion, no time order); "last" = the last item of the list (leave-one-out next item when the
    # order is temporal; on data without timestamps an ORDER ARTEFACT); "auto" = last when temporal,
    # else random
    holdout: str = "auto"
    # task B: "question" (the list's IDs in the prompt, one masked item the answer) | "sequence" (set completion
    # only: the answer turn is a random subset of the list's IDs in random order, so every item after the first
    # is a target given the ones before it; held-out rows carry the shown items as the answer-turn prefix)
    next_id_format: str = "question"
    # "sequence" only: list items per training row (0 = max_history + 1, the context the evaluation shows); a
    # longer row trains more next-item targets per token (the fixed prompt is paid once per row)
    sequence_window: int = 0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def validate(self) -> LlmDataConfig:
        mix = [self.mix_a, self.mix_b, self.mix_c]
        if any(m < 0 for m in mix) or sum(mix) <= 0:
            raise ValueError(f"mix ratios must be >= 0 and not all 0, got A/B/C = {mix}")
        if not 0 <= self.validation_user_frac < 1 or not 0 <= self.test_user_frac < 1:
            raise ValueError("validation_user_frac and test_user_frac must be in [0, 1)")
        if self.validation_user_frac + self.test_user_frac >= 1:
            raise ValueError("validation_user_frac + test_user_frac must leave some training users")
        unknown = set(self.a_templates) - set(A_TEMPLATES)
        if unknown:
            raise ValueError(f"unknown task-A templates {sorted(unknown)}; known: {list(A_TEMPLATES)}")
        if self.a_catalog not in ("interacted", "all"):
            raise ValueError(f"a_catalog must be 'interacted' or 'all', got {self.a_catalog!r}")
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"holdout must be one of {HOLDOUTS}, got {self.holdout!r}")
        if self.timestamps not in ("auto", "yes", "no"):
            raise ValueError(f"timestamps must be 'auto', 'yes' or 'no', got {self.timestamps!r}")
        for name in ("mask_last_prob", "list_end_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.n_examples < 1:
            raise ValueError("n_examples must be >= 1")
        if self.next_id_format not in ("question", "sequence"):
            raise ValueError(f"next_id_format must be 'question' or 'sequence', got {self.next_id_format!r}")
        if self.sequence_window < 0 or self.sequence_window == 1:
            raise ValueError(f"sequence_window must be 0 (max_history + 1) or >= 2, got {self.sequence_window}")
        if self.sequence_window and self.next_id_format != "sequence":
            raise ValueError(f"sequence_window ({self.sequence_window}) only applies to next_id_format 'sequence'")
        return self


@dataclass
class LlmDataResult:
    frame: pl.DataFrame
    summary: dict[str, Any]
    user_splits: pl.DataFrame  # user_id, split, n_items


# ------------------------------------------------------------------------------------------ inputs
def _require(df: pl.DataFrame, cols: Sequence[str], table: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"table {table!r} lacks column(s) {missing}; it has {df.columns}")


def sid_lookup_frame(anime_prep: pl.DataFrame, semantic_ids: pl.DataFrame) -> pl.DataFrame:
    """anime_id, semantic_id, codes, title, name, english_name, genres, ... for anime with an ID."""
    _require(semantic_ids, ["anime_id", "semantic_id"], "semantic_ids")
    _require(anime_prep, ["anime_id", "name"], "anime_prep")
    dup = semantic_ids.filter(pl.col("semantic_id").is_duplicated())
    if dup.height:
        raise ValueError(
            f"table 'semantic_ids' column 'semantic_id' is not unique: {dup.height} rows share IDs, "
            f"e.g. anime_id {dup['anime_id'][0]} -> {dup['semantic_id'][0]}"
        )
    prep = anime_prep
    if "title" not in prep.columns:
        en = pl.col("english_name") if "english_name" in prep.columns else pl.lit(None, pl.Utf8)
        prep = prep.with_columns(pl.coalesce(en, pl.col("name")).alias("title"))
    sid_cols = ["anime_id", "semantic_id"] + (["codes"] if "codes" in semantic_ids.columns else [])
    drop = [c for c in prep.columns if c in sid_cols and c != "anime_id"]
    return semantic_ids.select(sid_cols).join(prep.drop(drop), on="anime_id", how="inner").sort("anime_id")


def model_lookup(anime_prep: pl.DataFrame, semantic_ids: pl.DataFrame, dataset: pl.DataFrame | None, scope: str = "dataset") -> pl.DataFrame:
    """The anime the model can name (its lookup, so the evaluation's trie): every anime with an ID (``scope='all'``)
    or those the dataset shows it (``'dataset'``): the targets and completions of the training rows, and the items
    of every row's prompt/history (a held-out user's history is input the model is given).

    The targets of the held-out rows (``is_heldout``: validation/test labels) add nothing: an anime that only
    appears as a held-out label would otherwise become nameable because it is the answer, a candidate set no
    baseline gets. ValueError for another ``scope``."""
    lookup = sid_lookup_frame(anime_prep, semantic_ids)
    if scope == "all" or dataset is None:
        return lookup
    if scope != "dataset":
        raise ValueError(f"lookup_scope must be 'dataset' or 'all', got {scope!r}")
    train = dataset.filter(~pl.col("is_heldout")) if "is_heldout" in dataset.columns else dataset
    used = set(train["target_anime_id"].drop_nulls().to_list())
    used |= set(dataset["history_anime_ids"].explode().drop_nulls().to_list())
    sids = set(train["completion"].str.extract_all(SID_PATTERN).explode().drop_nulls().to_list())
    sids |= set(dataset["prompt"].str.extract_all(SID_PATTERN).explode().drop_nulls().to_list())
    return lookup.filter(pl.col("anime_id").is_in(list(used)) | pl.col("semantic_id").is_in(list(sids)))


def _order_interactions(inter: pl.DataFrame, temporal: bool) -> pl.DataFrame:
    """Per-user order: a timestamp column when there is one, else ``seq`` (source order, which is
    temporal only when the upstream source had timestamps: ``timestamps='yes'``)."""
    ts = next((c for c in TIMESTAMP_COLUMNS if c in inter.columns), None)
    if temporal and ts is not None:
        keys = ["user_id", ts] + (["seq"] if "seq" in inter.columns else [])
    else:
        keys = ["user_id", "seq"] if "seq" in inter.columns else ["user_id"]
    return inter.sort(keys, maintain_order=True)


def _b_targets_per_row(frame: pl.DataFrame) -> float:
    """Mean next-item targets with a non-empty history per training task-B row: 1 in the question form,
    window - 1 in the sequence form (the first ID of a sequence has no history). 0.0 without B rows."""
    b = frame.filter((pl.col("task") == "B") & (pl.col("split") == "train"))
    if b.height == 0:
        return 0.0
    seq = b["template"] == SEQUENCE_TEMPLATE
    per_row = pl.Series(np.where(seq.to_numpy(), b["history_anime_ids"].list.len().to_numpy(), 1))
    return round(float(per_row.mean()), 3)


def split_users(user_ids: Sequence[int], cfg: LlmDataConfig) -> dict[int, str]:
    """Deterministic user -> split assignment (a seeded permutation of the sorted user ids)."""
    users = np.array(sorted(set(int(u) for u in user_ids)), dtype=np.int64)
    rng = np.random.default_rng(cfg.seed)
    perm = users[rng.permutation(len(users))]
    n_test = int(round(len(users) * cfg.test_user_frac))
    n_val = int(round(len(users) * cfg.validation_user_frac))
    if cfg.max_eval_users > 0:
        n_test = min(n_test, cfg.max_eval_users)
        n_val = min(n_val, cfg.max_eval_users)
    out = {}
    for i, u in enumerate(perm.tolist()):
        out[u] = "test" if i < n_test else ("validation" if i < n_test + n_val else "train")
    return out


# ------------------------------------------------------------------------------------------ builder
def build_llm_dataset(
    anime_prep: pl.DataFrame,
    user_interactions: pl.DataFrame,
    semantic_ids: pl.DataFrame,
    cfg: LlmDataConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> LlmDataResult:
    cfg = (cfg or LlmDataConfig()).validate()
    log = log or (lambda _m: None)
    _require(user_interactions, ["user_id", "anime_id", "score", "status"], "user_interactions")
    lookup = sid_lookup_frame(anime_prep, semantic_ids)
    meta = {r["anime_id"]: r for r in lookup.iter_rows(named=True)}
    sid_of = {a: r["semantic_id"] for a, r in meta.items()}
    has_ts_col = any(c in user_interactions.columns for c in TIMESTAMP_COLUMNS)
    temporal = has_ts_col if cfg.timestamps == "auto" else cfg.timestamps == "yes"
    protocol = resolve_protocol(cfg.holdout, temporal)
    list_order = "set" if protocol == "set_completion" else ("watch" if temporal else "list")
    seq_form = cfg.next_id_format == "sequence"
    if seq_form and protocol != "set_completion":
        raise ValueError(f"next_id_format 'sequence' is built for set completion (holdout 'random'); this dataset's "
                         f"protocol is {protocol!r} (holdout {cfg.holdout!r}, timestamps {temporal})")

    inter = user_interactions.filter(pl.col("anime_id").is_in(list(meta)))
    unknown_rows = user_interactions.height - inter.height
    dup_pairs = inter.height - inter.unique(["user_id", "anime_id"]).height
    inter = _order_interactions(inter, temporal).unique(["user_id", "anime_id"], keep="first", maintain_order=True)
    per_user: dict[int, list[tuple[int, str]]] = {}
    for uid, aid, score, status in inter.select("user_id", "anime_id", "score", "status").iter_rows():
        per_user.setdefault(int(uid), []).append(
            (int(aid), sentiment_token(score, status, cfg.like_min_score, cfg.dislike_max_score))
        )
    eligible = {u: items for u, items in per_user.items() if len(items) >= cfg.min_user_items}
    splits = split_users(eligible.keys(), cfg)
    n_total = cfg.n_examples
    mix_sum = cfg.mix_a + cfg.mix_b + cfg.mix_c
    budget = {
        "A": int(round(n_total * cfg.mix_a / mix_sum)),
        "B": int(round(n_total * cfg.mix_b / mix_sum)),
        "C": int(round(n_total * cfg.mix_c / mix_sum)),
    }
    rows: list[dict] = []
    sys_prompt = cfg.system_prompt

    def add(task, template, split, user_id, target, prompt, completion, history=None, heldout=False):
        rows.append(
            {
                "task": task,
                "template": template,
                "split": split,
                "user_id": user_id,
                "target_anime_id": target,
                "system": sys_prompt,
                "prompt": prompt,
                "completion": completion,
                "history_anime_ids": list(history or []),
                "is_heldout": heldout,
            }
        )

    # --- A: item-level linking ------------------------------------------------------------------
    if cfg.a_catalog == "interacted":
        a_ids = sorted(set(inter["anime_id"].to_list()))
    else:
        a_ids = sorted(meta)
    rng_a = np.random.default_rng(_stable_seed(cfg.seed, "A"))
    candidates: list[tuple[int, str, str, str]] = []
    a_skipped: Counter = Counter()
    for aid in a_ids:
        exs, skipped = a_examples_for(meta[aid], cfg.a_templates, cfg.synopsis_chars, rng_a)
        a_skipped.update(skipped)
        candidates.extend((aid, t, p, c) for t, p, c in exs)
    n_a = min(budget["A"], len(candidates))
    if budget["A"] > len(candidates):
        log(f"task A: budget {budget['A']} > {len(candidates)} distinct examples; using each once (not repeating)")
    chosen = rng_a.choice(len(candidates), size=n_a, replace=False) if n_a else np.array([], dtype=int)
    for i in sorted(chosen.tolist()):
        aid, t, p, c = candidates[i]
        split = "validation" if rng_a.random() < cfg.a_validation_frac else "train"
        add("A", t, split, None, aid, p, c)

    # --- B + C: user-level, split by user --------------------------------------------------------
    users_by_split = {s: sorted(u for u, sp in splits.items() if sp == s) for s in SPLITS}
    eval_users = users_by_split["validation"] + users_by_split["test"]
    progress = Progress("llm_prep users", total=len(eligible), unit="users", log=log, every_s=10)
    heldout_of: dict[int, int] = {}
    for u in eval_users:
        items = eligible[u]
        if protocol == "set_completion":
            # a seeded random item of the list; the rest shown as a random subset in random order
            rng_u = np.random.default_rng(_stable_seed(cfg.seed, "holdout", u))
            h = int(rng_u.integers(0, len(items)))
            target = items[h]
            hist = items[:h] + items[h + 1 :]
            keep = rng_u.permutation(len(hist))[: cfg.max_history]
            window = [hist[i] for i in keep.tolist()]
        else:  # the last item of the list (by timestamp, or by row order: the order artefact)
            hist, target = items[:-1], items[-1]
            window = hist[-cfg.max_history :]
        heldout_of[u] = target[0]
        if seq_form:  # the shown items go into the answer turn at evaluation (sequence_prefix)
            add("B", SEQUENCE_TEMPLATE, splits[u], u, target[0], list_sequence_prompt(list_order),
                meta[target[0]]["semantic_id"], [a for a, _ in window], True)
        else:
            prompt = recommend_prompt([meta[a]["semantic_id"] for a, _ in window], [s for _, s in window], list_order)
            add("B", "b_next", splits[u], u, target[0], prompt, meta[target[0]]["semantic_id"], [a for a, _ in window], True)
        progress.update(1)
    n_b_train = max(0, budget["B"] - len(eval_users))
    train_users = users_by_split["train"]
    rng_b = np.random.default_rng(_stable_seed(cfg.seed, "B"))
    if n_b_train and train_users:
        picks = rng_b.choice(len(train_users), size=n_b_train, replace=True)
        for ui in picks.tolist():
            u = train_users[ui]
            items = eligible[u]
            n = len(items)
            w = min(cfg.max_history + 1, n)
            if seq_form:
                w = min(cfg.sequence_window or cfg.max_history + 1, n)
                # a random subset of the list in random order, written as its IDs: every item after the first
                # is a next-item target given the items before it (completion-only loss)
                window = [items[i][0] for i in rng_b.choice(n, size=w, replace=False).tolist()]
                add("B", SEQUENCE_TEMPLATE, "train", u, window[-1], list_sequence_prompt(list_order),
                    sequence_prefix(window, sid_of), window[:-1])
                continue
            if protocol == "set_completion":
                # a random subset of the list in random order; a random one of them is masked and,
                # with mask_last_prob, moved to the end (the form of the evaluation prompt)
                window = [items[i] for i in rng_b.choice(n, size=w, replace=False).tolist()]
                pos = w - 1 if rng_b.random() < cfg.mask_last_prob else int(rng_b.integers(0, w))
                target = window[pos][0]
                shown = [watch_item(meta[a]["semantic_id"], s) for a, s in window]
                if pos == w - 1:
                    tmpl, prompt = "b_next", b_prompt(shown[:-1], w - 1, list_order)
                else:
                    tmpl, prompt = "b_masked", b_prompt(shown, pos, list_order)
                hist_ids = [a for i, (a, _) in enumerate(window) if i != pos]
                add("B", tmpl, "train", u, target, prompt, meta[target]["semantic_id"], hist_ids)
                continue
            if rng_b.random() < cfg.list_end_prob:
                start, pos = n - w, w - 1  # the user's last item, as held out for eval users
            elif rng_b.random() < cfg.mask_last_prob:
                end = int(rng_b.integers(w, n + 1))  # window items[end-w:end], mask its last item
                start, pos = end - w, w - 1
            else:
                start = int(rng_b.integers(0, n - w + 1))
                pos = int(rng_b.integers(0, w))
            window = items[start : start + w]
            target = window[pos][0]
            shown = [watch_item(meta[a]["semantic_id"], s) for a, s in window]
            tmpl = "b_next" if pos == w - 1 else "b_masked"
            if tmpl == "b_next":
                prompt = b_prompt(shown[:-1], w - 1, list_order)
            else:
                prompt = b_prompt(shown, pos, list_order)
            hist_ids = [a for i, (a, _) in enumerate(window) if i != pos]
            add("B", tmpl, "train", u, target, prompt, meta[target]["semantic_id"], hist_ids)
    progress.update(max(0, len(eligible) - len(eval_users)))

    rng_c = np.random.default_rng(_stable_seed(cfg.seed, "C"))
    c_no_likes = 0

    def liked_rows(u: int) -> list[dict]:
        items = eligible[u]
        if u in heldout_of:  # never reveal a validation/test user's held-out item
            items = [it for it in items if it[0] != heldout_of[u]]
        return [meta[a] for a, s in items if s == LIKED]

    c_eval = 0
    for u in eval_users:
        liked = liked_rows(u)
        if len(liked) < cfg.c_min_liked:
            c_no_likes += 1
            continue
        k = min(cfg.c_max_liked, len(liked))
        sel = [liked[i] for i in sorted(rng_c.choice(len(liked), size=k, replace=False).tolist())]
        t, p, c = c_example(sel, None, rng_c.random() < cfg.c_titles_prob)
        add("C", t, splits[u], u, None, p, c, [r["anime_id"] for r in sel])
        c_eval += 1
    n_c_train = max(0, budget["C"] - c_eval)
    c_train_users = [u for u in train_users if len(liked_rows(u)) >= cfg.c_min_liked]
    if n_c_train and c_train_users:
        picks = rng_c.choice(len(c_train_users), size=n_c_train, replace=True)
        for ui in picks.tolist():
            u = c_train_users[ui]
            liked = liked_rows(u)
            k = min(cfg.c_max_liked, len(liked))
            sel = [liked[i] for i in sorted(rng_c.choice(len(liked), size=k, replace=False).tolist())]
            rest = [r for r in liked if r["anime_id"] not in {x["anime_id"] for x in sel}]
            pick = None
            if rest and rng_c.random() < 0.5:
                profile = {
                    "genres": Counter(g for r in sel for g in set(r.get("genres") or [])),
                    "studios": Counter(s for r in sel for s in set(r.get("studios") or [])),
                    "era": Counter(e for r in sel if (e := era_of(r.get("year")))),
                    "type": Counter(r["type"] for r in sel if r.get("type")),
                }
                pick = max(rest, key=lambda r: (_overlap_score(r, profile), -r["anime_id"]))
            t, p, c = c_example(sel, pick, rng_c.random() < cfg.c_titles_prob)
            add("C", t, "train", u, pick["anime_id"] if pick else None, p, c, [r["anime_id"] for r in sel])

    frame, dup_counts = _dedupe(rows)
    frame = frame.with_columns(
        pl.struct("task", "template", "prompt", "completion", "history_anime_ids")
        .map_elements(lambda s: _hash_id(*example_key(s)), return_dtype=pl.Utf8)
        .alias("example_id")
    ).select(list(OUTPUT_SCHEMA))
    frame = frame.cast(OUTPUT_SCHEMA)  # type: ignore[arg-type]
    user_split_df = pl.DataFrame(
        {
            "user_id": list(splits.keys()),
            "split": list(splits.values()),
            "n_items": [len(eligible[u]) for u in splits],
        },
        schema={"user_id": pl.Int64, "split": pl.Utf8, "n_items": pl.Int64},
    ).sort("user_id")
    leak = leakage_report(frame)
    if leak["users_in_several_splits"] or leak["heldout_items_in_train"]:
        raise AssertionError(f"split leakage: {leak}")  # construction guarantees this never happens
    summary = {
        "config": asdict(cfg),
        "rows": frame.height,
        "budget": budget,
        "counts": counts_by(frame),
        "users_total": len(per_user),
        "users_eligible": len(eligible),
        "users_too_short": len(per_user) - len(eligible),
        "users_by_split": {s: len(v) for s, v in users_by_split.items()},
        "anime_with_sid": len(meta),
        "anime_in_task_a": len(a_ids),
        "interaction_rows_without_sid": unknown_rows,
        "duplicate_user_anime_pairs_dropped": dup_pairs,
        "duplicates_dropped": dup_counts,
        "task_a_skipped_missing_field": dict(sorted(a_skipped.items())),
        "task_a_distinct_candidates": len(candidates),
        "task_c_eval_users_without_enough_likes": c_no_likes,
        "order_is_temporal": temporal,
        "protocol": protocol,
        "protocol_note": PROTOCOL_NOTES[protocol],
        "next_id_format": cfg.next_id_format,
        "b_targets_per_row": _b_targets_per_row(frame),
        "list_order": list_order,
        "order_note": (
            "list order follows timestamps"
            if temporal
            else "the source has no timestamps: list order is the source's row order (seq), NOT watch time; "
            "'last item' means the last row of the user's list"
        ),
        "sentiment_counts": dict(Counter(s for items in per_user.values() for _, s in items)),
        "leakage": leak,
    }
    return LlmDataResult(frame=frame, summary=summary, user_splits=user_split_df)
