"""Instruction rows for a semantic-ID LM on **next-item data** (leave-one-out), dataset-agnostic.

The MAL builder (``lib/llm/data.py``) splits users and completes sets; this one follows the
sequential-recommendation protocol of ``lib/retrieval/evaluation.py`` (``SequenceSplit``) so the LM
is evaluated on exactly the split, users and targets of the other next-item models (SASRec, RPG,
TIGER, popularity on Amazon Beauty):

* per user, in the given order: the last item is the **test** target (history ``seq[:-1]``), the
  second-to-last the **validation** target (history ``seq[:-2]``); training rows come only from
  ``seq[:-2]``, every prefix of it being a (history -> next item) position, exactly as the
  sequence models train. Users with fewer than 3 items are skipped (counted).

Tasks (LC-Rec-style, Zheng et al., "Adapting Large Language Models by Integrating Collaborative
Semantics for Recommendation", ICDE 2024), keyed by the task letters the fine-tune weights
(``FinetuneConfig.phase1_weights`` / ``phase2_weights``):

* **A: linking**, item-level: ``sid_to_title`` (ID -> item text) and ``title_to_sid`` (item text ->
  ID). Items without text are skipped (counted). Item-level rows carry no user and no position.
* **B: next ID from ID history** (``seq_next_id``): the last ``max_history`` items of the history
  as semantic IDs, oldest first; the answer is the next item's ID. The validation/test rows
  (``is_heldout``) are of this form, one per user and stage.
  With ``next_id_format="sequence"`` task B is written as the ID sequence itself (template
  ``seq_id_sequence``): the prompt is one fixed sentence and the answer turn is the IDs of a window of
  ``seq[:-2]`` (consecutive windows share one item), so every item after the sequence's first is a target
  given its prefix exactly once (the all-positions training of SASRec/TIGER); held-out rows keep the sentence as prompt, and the evaluation writes the
  history's IDs (``sequence_prefix``) in the answer turn before decoding.
* **C: title history -> next ID** (``title_seq_next_id``): the last ``title_history`` items as
  their text (quoted); the answer is the next item's ID.

Output: the table contract of ``lib/llm/dataset_schema.py`` (``OUTPUT_SCHEMA``); its
``target_anime_id`` / ``history_anime_ids`` columns hold the dataset's item ids (the LM chain
names items "anime_id" throughout). Training rows are deduplicated (identical task, prompt and
completion kept once; ``dup_count``); validation/test rows are always kept, one per user, and a
training row identical to one of them is dropped. Deterministic for a seed. A user's validation
and test targets never appear in that user's training rows (``loo_leakage_report``).

This module never imports Dagster.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from animind_assets.lib.llm.data import LlmDataResult, _hash_id, _stable_seed
from animind_assets.lib.llm.dataset_report import counts_by, example_key
from animind_assets.lib.llm.dataset_schema import OUTPUT_SCHEMA, TASKS
from animind_assets.lib.llm.model_folder import SEQUENCE_TEMPLATE, sequence_prefix  # noqa: F401  (public API here too)

SEQ_A_TEMPLATES = ("sid_to_title", "title_to_sid")
NEXT_ID_FORMATS = ("question", "sequence")
DEFAULT_SEQ_SYSTEM_PROMPT = "You are a recommender. Items are written as semantic IDs."
PROTOCOL = "leave_one_out_next_item"
PROTOCOL_NOTE = (
    "leave-one-out next item (lib/retrieval/evaluation.py SequenceSplit): test target = last item, history "
    "seq[:-1]; validation target = second-to-last, history seq[:-2]; training rows only from prefixes of seq[:-2]"
)


@dataclass
class SeqLlmDataConfig:
    seed: int = 42
    n_examples: int = 40000  # rows requested for training (A + B + C) before deduplication
    mix_a: float = 0.2  # share of task A (ID <-> item text linking)
    mix_b: float = 0.6  # share of task B (next ID from ID history)
    mix_c: float = 0.2  # share of task C (text history -> next ID)
    max_history: int = 20  # most recent items shown as IDs in a task-B prompt (TIGER uses 20)
    title_history: int = 10  # most recent items shown as text in a task-C prompt
    title_chars: int = 80  # item text is clipped to this many characters in prompts/answers
    a_templates: list[str] = field(default_factory=lambda: list(SEQ_A_TEMPLATES))
    a_validation_frac: float = 0.02  # task-A rows held out for the validation loss
    validation_users: int = 2000  # validation rows (one per user, a seeded sample; 0 = every user)
    item_noun: str = "item"  # what an item is called in prompts
    history_noun: str = "purchase history"  # what a user's sequence is called in prompts
    next_question: str = "Which item will the user buy next?"  # question of the B/C prompts
    system_prompt: str = DEFAULT_SEQ_SYSTEM_PROMPT
    next_id_format: str = "question"  # task B: "question" (history IDs in the prompt, 1 target per row) | "sequence" (the ID sequence is the answer, every item a target given its prefix)
    sequence_instruction: str = ""  # "sequence" only: the fixed task-B prompt ("" = "Write a user's {history_noun} as semantic IDs, oldest first."); a short one (with a short system prompt and no chat template) leaves more of each row to the IDs
    sequence_window: int = 0  # "sequence" only: items per training row (0 = max_history + 1, the context the evaluation shows); consecutive rows of a user share one item

    def validate(self) -> SeqLlmDataConfig:
        mix = [self.mix_a, self.mix_b, self.mix_c]
        if any(m < 0 for m in mix) or sum(mix) <= 0:
            raise ValueError(f"mix ratios must be >= 0 and not all 0, got A/B/C = {mix}")
        unknown = set(self.a_templates) - set(SEQ_A_TEMPLATES)
        if unknown:
            raise ValueError(f"unknown task-A templates {sorted(unknown)}; known: {list(SEQ_A_TEMPLATES)}")
        if self.max_history < 1 or self.title_history < 1:
            raise ValueError("max_history and title_history must be >= 1")
        if not 0 <= self.a_validation_frac < 1:
            raise ValueError("a_validation_frac must be in [0, 1)")
        if self.next_id_format not in NEXT_ID_FORMATS:
            raise ValueError(f"next_id_format must be one of {list(NEXT_ID_FORMATS)}, got {self.next_id_format!r}")
        if self.sequence_window < 0 or self.sequence_window == 1:
            raise ValueError(f"sequence_window must be 0 (max_history + 1) or >= 2, got {self.sequence_window}")
        if self.sequence_instruction and self.next_id_format != "sequence":
            raise ValueError("sequence_instruction only applies to next_id_format 'sequence'")
        if self.sequence_window and self.next_id_format != "sequence":
            raise ValueError(f"sequence_window ({self.sequence_window}) only applies to next_id_format 'sequence'")
        return self

    @property
    def window(self) -> int:
        """Items per training row of the "sequence" form."""
        return self.sequence_window or self.max_history + 1


# ------------------------------------------------------------------------------------------ prompts
def _clip(text: str, n: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


def next_id_prompt(sids: Sequence[str], cfg: SeqLlmDataConfig) -> str:
    """Task-B prompt: the history's semantic IDs, oldest first (at most ``cfg.max_history``, the most
    recent kept). The same text is used for training rows and for the evaluation."""
    shown = list(sids)[-cfg.max_history :]
    return (
        f"A user's {cfg.history_noun} (oldest first): {', '.join(shown)}. "
        f"{cfg.next_question} Answer with its semantic ID."
    )


def title_next_id_prompt(titles: Sequence[str], cfg: SeqLlmDataConfig) -> str:
    """Task-C prompt: the history as item texts, oldest first (at most ``cfg.title_history``)."""
    shown = [f'"{t}"' for t in list(titles)[-cfg.title_history :]]
    return (
        f"A user's {cfg.history_noun} (oldest first): {', '.join(shown)}. "
        f"{cfg.next_question} Answer with its semantic ID."
    )


def sequence_prompt(cfg: SeqLlmDataConfig) -> str:
    """Task-B prompt of the "sequence" form: the same text for every row (``cfg.sequence_instruction``, or the
    default sentence when it is empty); the IDs follow in the answer turn."""
    return cfg.sequence_instruction or f"Write a user's {cfg.history_noun} as semantic IDs, oldest first."


# ------------------------------------------------------------------------------------------ inputs
def item_lookup(items: pl.DataFrame, semantic_ids: pl.DataFrame, id_col: str = "item_id", text_col: str = "text") -> pl.DataFrame:
    """The model-folder lookup (``lib/llm/model_folder.py``: anime_id, semantic_id, title) of a
    next-item dataset: ``anime_id`` = the item id, ``title`` = the item text ('' when missing).

    ``items``: ``id_col`` Int64 and ``text_col`` Utf8; ``semantic_ids``: ``id_col`` and ``semantic_id``
    (unique). Items without an ID are left out. ValueError naming the table and column otherwise."""
    for df, cols, name in ((items, [id_col, text_col], "items"), (semantic_ids, [id_col, "semantic_id"], "semantic_ids")):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"table {name!r} lacks column(s) {missing}; it has {df.columns}")
    dup = semantic_ids.filter(pl.col("semantic_id").is_duplicated())
    if dup.height:
        raise ValueError(
            f"table 'semantic_ids' column 'semantic_id' is not unique: {dup.height} rows share IDs, "
            f"e.g. {id_col} {dup[id_col][0]} -> {dup['semantic_id'][0]}"
        )
    return (
        semantic_ids.select(pl.col(id_col).cast(pl.Int64).alias("anime_id"), pl.col("semantic_id"))
        .join(items.select(pl.col(id_col).cast(pl.Int64).alias("anime_id"), pl.col(text_col).fill_null("").alias("title")),
              on="anime_id", how="inner")
        .sort("anime_id")
    )


def sequences_of(interactions: pl.DataFrame, id_col: str = "item_id") -> dict[int, list[int]]:
    """``{user_id: [item, ...]}`` ordered by ``seq`` (the order the sequence models use)."""
    missing = [c for c in ("user_id", id_col, "seq") if c not in interactions.columns]
    if missing:
        raise ValueError(f"table 'interactions' lacks column(s) {missing}; it has {interactions.columns}")
    grouped = interactions.sort(["user_id", "seq"]).group_by("user_id", maintain_order=True).agg(pl.col(id_col))
    return {int(u): [int(x) for x in its] for u, its in grouped.iter_rows()}


# ------------------------------------------------------------------------------------------ builder
def build_next_item_dataset(
    items: pl.DataFrame,
    interactions: pl.DataFrame,
    semantic_ids: pl.DataFrame,
    cfg: SeqLlmDataConfig | None = None,
    id_col: str = "item_id",
    text_col: str = "text",
    log: Callable[[str], None] | None = None,
) -> LlmDataResult:
    """LC-Rec-style rows (tasks A/B/C of the module docstring) for a next-item dataset.

    ``items`` (``id_col``, ``text_col``), ``interactions`` (user_id, ``id_col``, seq: the per-user
    order), ``semantic_ids`` (``id_col``, semantic_id). Every user with >= 3 items gets one test row
    (history ``seq[:-1]``); ``cfg.validation_users`` of them one validation row (history
    ``seq[:-2]``). Returns ``LlmDataResult`` (frame in ``OUTPUT_SCHEMA``, summary, per-user table).
    ValueError when an interaction names an item without a semantic ID (the split would differ from
    the other models') or when no user has 3 items."""
    cfg = (cfg or SeqLlmDataConfig()).validate()
    log = log or (lambda _m: None)
    lookup = item_lookup(items, semantic_ids, id_col, text_col)
    sid = dict(zip(lookup["anime_id"].to_list(), lookup["semantic_id"].to_list()))
    text = {a: _clip(t, cfg.title_chars) for a, t in zip(lookup["anime_id"].to_list(), lookup["title"].to_list())}
    seqs = sequences_of(interactions, id_col)
    no_id = sorted({a for s in seqs.values() for a in s} - set(sid))
    if no_id:
        raise ValueError(
            f"table 'interactions' column {id_col!r}: {len(no_id)} items have no semantic ID (e.g. {no_id[:5]}); "
            "every item of the leave-one-out split needs one"
        )
    users = sorted(u for u, s in seqs.items() if len(s) >= 3)
    if not users:
        raise ValueError("no user has >= 3 items: nothing to split (leave-one-out needs test, validation and training items)")
    skipped_users = len(seqs) - len(users)

    def label(a: int) -> str:
        return text[a] or sid[a]  # an item without text is shown by its ID

    eval_rows: list[dict] = []
    train_rows: list[dict] = []

    def row(task, template, split, user, target, prompt, completion, history=(), heldout=False) -> dict:
        return {"task": task, "template": template, "split": split, "user_id": user, "target_anime_id": target,
                "system": cfg.system_prompt, "prompt": prompt, "completion": completion,
                "history_anime_ids": list(history), "is_heldout": heldout}

    # --- validation / test rows: one per user and stage (the evaluation prompts) -------------------
    val_users = users
    if cfg.validation_users and len(users) > cfg.validation_users:
        rng_v = np.random.default_rng(_stable_seed(cfg.seed, "validation"))
        val_users = sorted(np.asarray(users)[rng_v.choice(len(users), cfg.validation_users, replace=False)].tolist())
    seq_form = cfg.next_id_format == "sequence"
    b_template = SEQUENCE_TEMPLATE if seq_form else "seq_next_id"

    def b_prompt(hist: Sequence[int]) -> str:
        return sequence_prompt(cfg) if seq_form else next_id_prompt([sid[a] for a in hist], cfg)

    for u in users:
        s = seqs[u]
        hist, target = s[:-1][-cfg.max_history :], s[-1]
        eval_rows.append(row("B", b_template, "test", u, target, b_prompt(hist), sid[target], hist, True))
    for u in val_users:
        s = seqs[u]
        hist, target = s[:-2][-cfg.max_history :], s[-2]
        eval_rows.append(row("B", b_template, "validation", u, target, b_prompt(hist), sid[target], hist, True))

    # --- training positions: every prefix of seq[:-2] with >= 1 history item -----------------------
    positions = [(u, j) for u in users for j in range(1, len(seqs[u]) - 2)]
    mix_sum = cfg.mix_a + cfg.mix_b + cfg.mix_c
    budget = {t: int(round(cfg.n_examples * m / mix_sum)) for t, m in zip(TASKS, (cfg.mix_a, cfg.mix_b, cfg.mix_c))}

    def pick_positions(n: int, tag: str) -> list[tuple[int, int]]:
        if n <= 0 or not positions:
            return []
        rng = np.random.default_rng(_stable_seed(cfg.seed, tag))
        if n >= len(positions):  # every position once, then seeded repeats are not generated (dedup would drop them)
            log(f"task {tag}: budget {n} >= {len(positions)} training positions; using each once")
            return list(positions)
        return [positions[i] for i in sorted(rng.choice(len(positions), n, replace=False).tolist())]

    b_windows = 0
    if seq_form:  # every training sequence, cut from its end into windows of cfg.window items sharing one item, so
        for u in users:  # every item after the sequence's first is a target exactly once
            t = seqs[u][:-2]
            for e in range(len(t), 1, -(cfg.window - 1)):
                w = t[max(0, e - cfg.window) : e]
                b_windows += 1
                train_rows.append(row("B", SEQUENCE_TEMPLATE, "train", u, w[-1], sequence_prompt(cfg),
                                      sequence_prefix(w, sid), w[:-1]))
        log(f"task B (sequence form): {b_windows} windows of <= {cfg.window} items cover the training sequences "
            f"(every item after the sequence's first is a target once); the B budget ({budget['B']}) does not apply")
    for u, j in ([] if seq_form else pick_positions(budget["B"], "B")):
        s = seqs[u]
        hist = s[:j][-cfg.max_history :]
        train_rows.append(row("B", "seq_next_id", "train", u, s[j], next_id_prompt([sid[a] for a in hist], cfg), sid[s[j]], hist))
    for u, j in pick_positions(budget["C"], "C"):
        s = seqs[u]
        hist = s[:j][-cfg.title_history :]
        train_rows.append(row("C", "title_seq_next_id", "train", u, s[j], title_next_id_prompt([label(a) for a in hist], cfg),
                              sid[s[j]], hist))

    # --- A: item-level linking ----------------------------------------------------------------------
    rng_a = np.random.default_rng(_stable_seed(cfg.seed, "A"))
    a_items = sorted(sid)
    candidates: list[tuple[int, str, str, str]] = []
    a_skipped: Counter = Counter()
    noun = cfg.item_noun
    for a in a_items:
        if not text[a]:
            a_skipped["no_text"] += 1
            continue
        for t in cfg.a_templates:
            if t == "sid_to_title":
                candidates.append((a, t, f"What is the title of the {noun} {sid[a]}?", text[a]))
            else:
                candidates.append((a, t, f'What is the semantic ID of the {noun} "{text[a]}"?', sid[a]))
    n_a = min(budget["A"], len(candidates))
    if budget["A"] > len(candidates):
        log(f"task A: budget {budget['A']} > {len(candidates)} distinct rows; using each once")
    for i in sorted(rng_a.choice(len(candidates), n_a, replace=False).tolist()) if n_a else []:
        a, t, p, c = candidates[i]
        split = "validation" if rng_a.random() < cfg.a_validation_frac else "train"
        train_rows.append(row("A", t, split, None, a, p, c))

    frame, dups = _dedupe_keep_eval(eval_rows, train_rows)
    frame = frame.with_columns(
        pl.struct("task", "template", "prompt", "completion", "history_anime_ids")
        .map_elements(lambda r: _hash_id(*example_key(r)), return_dtype=pl.Utf8)
        .alias("example_id")
    ).select(list(OUTPUT_SCHEMA)).cast(OUTPUT_SCHEMA)  # type: ignore[arg-type]
    leak = loo_leakage_report(frame, seqs)
    if leak["heldout_items_in_train"]:
        raise AssertionError(f"leave-one-out leakage: {leak}")  # construction guarantees this never happens
    per_user = pl.DataFrame(
        {"user_id": users, "split": ["leave_one_out"] * len(users), "n_items": [len(seqs[u]) for u in users]},
        schema={"user_id": pl.Int64, "split": pl.Utf8, "n_items": pl.Int64},
    )
    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "rows": frame.height,
        "budget": budget,
        "counts": counts_by(frame),
        "users_total": len(seqs),
        "users_evaluated": len(users),
        "users_skipped_lt3": skipped_users,
        "validation_users": len(val_users),
        "train_positions": len(positions),
        "next_id_format": cfg.next_id_format,
        "sequence_windows": b_windows,
        # next-item targets with >= 1 history item that one training row of task B trains (question form: 1)
        "b_targets_per_row": round(float(frame.filter((pl.col("task") == "B") & (pl.col("split") == "train"))["history_anime_ids"]
                                         .list.len().mean() or 0.0), 3) if seq_form else 1.0,
        "items_with_sid": len(sid),
        "task_a_skipped": dict(a_skipped),
        "task_a_distinct_candidates": len(candidates),
        "duplicates_dropped": dups,
        "protocol": PROTOCOL,
        "protocol_note": PROTOCOL_NOTE,
        "order_is_temporal": True,
        "list_order": "watch",
        "order_note": "per-user order = the interactions' seq column (the order the sequence models use)",
        "leakage": leak,
    }
    log(f"next-item LM dataset: {frame.height} rows, {len(users)} users, {len(positions)} training positions; "
        f"counts {summary['counts']}; duplicates dropped {dups}")
    return LlmDataResult(frame=frame, summary=summary, user_splits=per_user)


def _dedupe_keep_eval(eval_rows: list[dict], train_rows: list[dict]) -> tuple[pl.DataFrame, dict[str, int]]:
    """Evaluation rows all kept (one per user and stage); training/validation-A rows kept once per
    (task, prompt, completion) and dropped when identical to an evaluation row."""
    seen: dict[tuple, int] = {}
    rows: list[dict] = []
    dropped: Counter = Counter()
    for r in eval_rows:
        rows.append({**r, "dup_count": 1})
        seen.setdefault((r["task"], r["prompt"], r["completion"]), len(rows) - 1)
    for r in train_rows:
        key = (r["task"], r["prompt"], r["completion"])
        if key in seen:
            rows[seen[key]]["dup_count"] += 1
            dropped[r["task"]] += 1
            continue
        seen[key] = len(rows)
        rows.append({**r, "dup_count": 1})
    schema = {k: v for k, v in OUTPUT_SCHEMA.items() if k != "example_id"}
    return pl.DataFrame(rows, schema=schema), {t: int(dropped.get(t, 0)) for t in TASKS}


def loo_leakage_report(frame: pl.DataFrame, sequences: Mapping[int, Sequence[int]] | None = None) -> dict[str, int]:
    """Leave-one-out guarantees of a next-item dataset.

    ``heldout_items_in_train``: validation/test (user, item) pairs found in a training row of the
    same user (as target or in the history), not counting items that also occur in that user's
    training part ``seq[:-2]`` (repeat purchases, when ``sequences`` is given; counted as
    ``heldout_repeats``). ``heldout_examples``: validation/test rows. Item-level rows (task A, no
    user) carry no user information and are not counted."""
    held = frame.filter(pl.col("is_heldout"))
    train = frame.filter((pl.col("split") == "train") & pl.col("user_id").is_not_null())
    pairs: set[tuple[int, int]] = set()
    for u, a, hist in train.select("user_id", "target_anime_id", "history_anime_ids").iter_rows():
        if a is not None:
            pairs.add((u, a))
        pairs.update((u, x) for x in hist or [])
    leaks = repeats = 0
    for u, a in held.select("user_id", "target_anime_id").iter_rows():
        if (u, a) in pairs:
            if sequences is not None and a in set(sequences.get(u, [])[:-2]):
                repeats += 1
            else:
                leaks += 1
    return {"heldout_items_in_train": leaks, "heldout_repeats": repeats, "heldout_examples": held.height}
