"""Deduplication and reports of the LLM dataset: counts per split/task, leakage report, token-length
statistics, chat records and markdown examples. No Dagster."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import polars as pl

from animind_assets.lib.llm.dataset_schema import OUTPUT_SCHEMA, SEQUENCE_TEMPLATE, SPLITS, TASKS

def example_key(row: dict) -> tuple:
    """What makes two rows the same example: (task, prompt, completion) and, for the "sequence" form of task
    B, the history too (its held-out rows share one prompt; their history is the answer-turn prefix, so two
    users with the same held-out item are different examples)."""
    key = (row["task"], row["prompt"], row["completion"])
    if row.get("template") == SEQUENCE_TEMPLATE:
        key += (tuple(int(a) for a in (row.get("history_anime_ids") or ())),)
    return key


def _dedupe(rows: list[dict]) -> tuple[pl.DataFrame, dict[str, int]]:
    """Keep each example (``example_key``) once; priority test > validation > train so that an
    evaluation example never also sits in training. Returns the frame and drops per task."""
    if not rows:
        empty = {k: v for k, v in OUTPUT_SCHEMA.items() if k != "example_id"}
        return pl.DataFrame(schema=empty), {t: 0 for t in TASKS}
    prio = {"test": 0, "validation": 1, "train": 2}
    order = sorted(range(len(rows)), key=lambda i: (prio[rows[i]["split"]], i))
    seen: dict[tuple, int] = {}
    kept: list[int] = []
    counts: list[int] = []
    dropped: Counter = Counter()
    for i in order:
        r = rows[i]
        key = example_key(r)
        if key in seen:
            counts[seen[key]] += 1
            dropped[r["task"]] += 1
            continue
        seen[key] = len(kept)
        kept.append(i)
        counts.append(1)
    pos = sorted(range(len(kept)), key=lambda j: kept[j])  # back to generation order
    out_rows = []
    for j in pos:
        r = dict(rows[kept[j]])
        r["dup_count"] = counts[j]
        out_rows.append(r)
    schema = {k: v for k, v in OUTPUT_SCHEMA.items() if k != "example_id"}
    return pl.DataFrame(out_rows, schema=schema), {t: int(dropped.get(t, 0)) for t in TASKS}


def counts_by(frame: pl.DataFrame) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {t: {s: 0 for s in SPLITS} for t in TASKS}
    for task, split, n in frame.group_by("task", "split").len().iter_rows():
        out.setdefault(task, {})[split] = int(n)
    return out


def leakage_report(frame: pl.DataFrame) -> dict[str, int]:
    """Split-by-user guarantees: users in more than one split (B/C) and held-out (user, item) pairs
    of validation/test users that appear in any training row (as target or in a history)."""
    uc = frame.filter(pl.col("user_id").is_not_null() & pl.col("task").is_in(["B", "C"]))
    multi = uc.group_by("user_id").agg(pl.col("split").n_unique().alias("k")).filter(pl.col("k") > 1).height
    held = frame.filter(pl.col("is_heldout"))
    train = frame.filter(pl.col("split") == "train")
    train_pairs = set(
        (u, a) for u, a in train.select("user_id", "target_anime_id").iter_rows() if u is not None and a is not None
    )
    for u, hist in train.select("user_id", "history_anime_ids").iter_rows():
        if u is not None and hist:
            train_pairs.update((u, a) for a in hist)
    leaks = sum(1 for u, a in held.select("user_id", "target_anime_id").iter_rows() if (u, a) in train_pairs)
    return {"users_in_several_splits": int(multi), "heldout_items_in_train": int(leaks), "heldout_examples": held.height}


def token_length_stats(frame: pl.DataFrame, count_tokens: Callable[[list[str]], list[int]]) -> dict[str, dict[str, float]]:
    """Per-task token statistics of system+prompt+completion (``count_tokens`` maps texts to counts)."""
    texts = [f"{s}\n{p}\n{c}" for s, p, c in frame.select("system", "prompt", "completion").iter_rows()]
    lens = np.asarray(count_tokens(texts), dtype=np.int64) if texts else np.zeros(0, dtype=np.int64)
    out: dict[str, dict[str, float]] = {}
    tasks = frame["task"].to_list()
    for t in [*TASKS, "all"]:
        sel = lens if t == "all" else lens[[i for i, x in enumerate(tasks) if x == t]]
        if sel.size == 0:
            continue
        out[t] = {
            "n": int(sel.size),
            "mean": float(sel.mean()),
            "p50": float(np.percentile(sel, 50)),
            "p95": float(np.percentile(sel, 95)),
            "max": int(sel.max()),
        }
    return out


def approx_token_count(texts: list[str]) -> list[int]:
    """Fallback counter: semantic-ID/special tokens count 1, other text ~4 characters per token."""
    import re

    pat = re.compile(r"<[^<>\s]{1,24}>")
    out = []
    for t in texts:
        specials = pat.findall(t)
        rest = pat.sub("", t)
        out.append(len(specials) + math.ceil(len(rest) / 4))
    return out


def to_chat_records(frame: pl.DataFrame) -> list[dict]:
    """JSONL export rows: chat messages plus the bookkeeping columns. ``history_anime_ids`` is kept: a held-out
    row of the "sequence" form has its shown items there (their IDs are the answer-turn prefix at evaluation)."""
    recs = []
    for r in frame.iter_rows(named=True):
        recs.append(
            {
                "example_id": r["example_id"],
                "task": r["task"],
                "template": r["template"],
                "split": r["split"],
                "user_id": r["user_id"],
                "target_anime_id": r["target_anime_id"],
                "messages": [
                    {"role": "system", "content": r["system"]},
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["completion"]},
                ],
                "prompt": r["prompt"],
                "completion": r["completion"],
                "history_anime_ids": list(r.get("history_anime_ids") or []),
            }
        )
    return recs


def example_rows_md(frame: pl.DataFrame, per_task: int = 2, max_chars: int = 220) -> str:
    """Markdown with a few example rows per task (prompt -> completion)."""

    def esc(s: str) -> str:
        s = " ".join(str(s).split())
        s = s if len(s) <= max_chars else s[: max_chars - 1] + "…"
        return s.replace("|", "\\|")

    lines = ["| task | template | split | prompt | completion |", "|---|---|---|---|---|"]
    for t in TASKS:
        sub = frame.filter(pl.col("task") == t)
        for tmpl in sub["template"].unique(maintain_order=True).to_list()[:6]:
            for r in sub.filter(pl.col("template") == tmpl).head(max(1, per_task // 2)).iter_rows(named=True):
                lines.append(f"| {t} | {tmpl} | {r['split']} | {esc(r['prompt'])} | {esc(r['completion'])} |")
    return "\n".join(lines)


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, default=str, sort_keys=True)
