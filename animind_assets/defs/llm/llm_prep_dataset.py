"""``llm_prep_dataset``: instruction rows that teach a causal LM to speak semantic IDs.

Thin layer over ``animind_assets.lib.llm.data`` (tasks A linking / B masked watch-sequence /
C preference reasoning, split by user, deduplicated, deterministic for a seed). The table goes to
DuckDB and a Parquet export; chat-style JSONL files per split go to ``<artifacts>/llm_prep_dataset/``
(one atomic folder: ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``, ``summary.json``,
``user_splits.parquet``).
"""

import json
import time

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.lib.llm.data import (
    SPLITS,
    TASKS,
    LlmDataConfig,
    approx_token_count,
    build_llm_dataset,
    example_rows_md,
    leakage_report,
    summary_json,
    to_chat_records,
    token_length_stats,
)
from animind_assets.meta import bar_plot, counts_md, hist_plot, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, ParquetExports

from animind_assets.defs.llm.shared import GROUP, semantic_ids_provenance
from animind_assets.launchpad import derive_config
EXPORT_DIR = "llm_prep_dataset"


LlmPrepDatasetConfig = derive_config(
    LlmDataConfig,
    name="LlmPrepDatasetConfig",
    asset="llm_prep_dataset",
    extra={
        "tokenizer_model": (str, Field(
        "embedded:smollm2-135m-instruct",
        description="tokenizer for token-length statistics (the fine-tune's base model); '' = approximate",
    )),
        "export_folder": (str, Field(EXPORT_DIR, description="artifact-store folder of the JSONL export")),
    },
    descriptions={
        "seed": 'seed of every random choice (same seed + inputs = same rows)',
        "n_examples": 'total rows to generate before deduplication',
        "mix_a": 'share of task A (semantic ID <-> metadata linking)',
        "mix_b": 'share of task B (masked watch-sequence prediction)',
        "mix_c": 'share of task C (preference reasoning)',
        "validation_user_frac": 'fraction of users in the validation split',
        "test_user_frac": 'fraction of users in the test split',
        "max_eval_users": 'cap on validation and test users each (0 = no cap)',
        "min_user_items": 'users with fewer list entries get no B/C rows',
        "max_history": 'list items shown in a task-B prompt',
        "like_min_score": 'score >= this is <liked>',
        "dislike_max_score": 'score 1..this is <disliked>',
        "c_max_liked": 'liked anime listed in a task-C prompt',
        "c_min_liked": 'users with fewer liked anime get no C rows',
        "c_titles_prob": 'share of C prompts that show titles next to SIDs',
        "synopsis_chars": 'synopsis length in SID->synopsis rows',
        "a_catalog": "anime covered by task A: 'interacted' | 'all'",
        "a_validation_frac": 'task-A rows held out for validation loss',
        "timestamps": "is list order temporal? 'auto' = user_interactions' has_timestamps metadata or a timestamp column; 'yes' | 'no'",
        "system_prompt": 'system message of every row',
        "holdout": "held-out item of validation/test users: 'random' (seeded random item: set completion, no time "
        "order) | 'last' (last item; an ORDER ARTEFACT without timestamps) | 'auto' (last when temporal, else random)",
        "mask_last_prob": "training B rows that put the masked item last (set completion: a random item of a random "
        "subset; last-item protocol: the window's last item)",
        "list_end_prob": "last-item protocol only: training B rows whose window ends at the end of the user's list "
        "(the position held out for test users); the rest take random windows",
        "next_id_format": "task B: 'question' (list IDs in the prompt, one masked item answered) | 'sequence' (set "
        "completion only: the answer is a random subset of the list as IDs, every item a target given the ones before)",
    },
)


def _upstream_has_timestamps(context: dg.AssetExecutionContext) -> bool | None:
    try:
        ev = context.instance.get_latest_materialization_event(dg.AssetKey("user_interactions"))
        md = ev.asset_materialization.metadata if ev and ev.asset_materialization else {}
        v = md.get("has_timestamps")
        return bool(v.value) if v is not None else None
    except Exception:  # noqa: BLE001 - metadata is advisory
        return None


def _token_counter(model: str, frame: pl.DataFrame, log):
    if not model:
        return approx_token_count, "approximate (4 chars/token, SID tokens = 1)"
    try:
        from animind_assets.lib.llm.finetune import add_tokens, load_tokenizer
        from animind_assets.lib.llm.model_folder import render_prompt
        from animind_assets.lib.semantic_ids.tokens import SID_PATTERN, SPECIAL_TOKENS, sid_tokens_used

        tok = load_tokenizer(model)
        sids = frame["completion"].str.extract_all(SID_PATTERN).explode().drop_nulls().unique().to_list()
        sids += frame["prompt"].str.extract_all(SID_PATTERN).explode().drop_nulls().unique().to_list()
        add_tokens(tok, sid_tokens_used(sids) + list(SPECIAL_TOKENS))

        def count(texts: list[str]) -> list[int]:
            return [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]

        def count_rows(df: pl.DataFrame) -> list[int]:
            rendered = [render_prompt(tok, s, p) + c for s, p, c in df.select("system", "prompt", "completion").iter_rows()]
            return [n + 1 for n in count(rendered)]  # + EOS

        return count_rows, f"{model} tokenizer + semantic-ID tokens, chat template applied, + EOS"
    except Exception as exc:  # noqa: BLE001 - statistics only; fall back to an estimate
        log(f"token statistics: tokenizer {model!r} unavailable ({type(exc).__name__}: {exc}); using an estimate")
        return approx_token_count, "approximate (tokenizer unavailable)"


@dg.asset(
    group_name=GROUP,
    kinds={"polars", "duckdb"},
    description="Instruction rows (tasks A linking, B masked watch-sequence, C preference reasoning) for "
    "fine-tuning a causal LM on semantic IDs; split by user; JSONL at <artifacts>/llm_prep_dataset/.",
)
def llm_prep_dataset(
    context: dg.AssetExecutionContext,
    config: LlmPrepDatasetConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    anime_prep: pl.DataFrame,
    user_interactions: pl.DataFrame,
    semantic_ids: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    timestamps = config.timestamps
    if timestamps == "auto":
        upstream = _upstream_has_timestamps(context)
        if upstream is not None:
            timestamps = "yes" if upstream else "no"
            context.log.info(f"user_interactions metadata has_timestamps={upstream}: list order temporal = {upstream}")
    cfg = config.to_lib(timestamps=timestamps)
    result = build_llm_dataset(anime_prep, user_interactions, semantic_ids, cfg, log=context.log.info)
    df = result.frame
    summary = result.summary
    counter, counter_note = _token_counter(config.tokenizer_model, df, context.log.info)
    if counter is approx_token_count:
        lens_all = approx_token_count([f"{s}\n{p}\n{c}" for s, p, c in df.select("system", "prompt", "completion").iter_rows()])
    else:
        lens_all = counter(df)
    tok_stats = token_length_stats(df, lambda _texts: lens_all)
    summary["token_lengths"] = tok_stats
    summary["token_length_method"] = counter_note

    store = artifacts.store()
    with store.atomic_dir(config.export_folder) as tmp:
        records = to_chat_records(df)
        for split in SPLITS:
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for r in records:
                    if r["split"] == split:
                        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / "summary.json").write_text(summary_json(summary), encoding="utf-8")
        result.user_splits.write_parquet(tmp / "user_splits.parquet")
    export = exports.write(df, "llm_prep_dataset")
    elapsed = time.perf_counter() - t0

    counts = summary["counts"]
    flat_counts = {f"{t}/{s}": counts[t][s] for t in TASKS for s in SPLITS}
    tok_md = ["| task | rows | mean | p50 | p95 | max |", "|---|---|---|---|---|---|"]
    for t, st in tok_stats.items():
        tok_md.append(f"| {t} | {st['n']} | {st['mean']:.1f} | {st['p50']:.0f} | {st['p95']:.0f} | {st['max']} |")
    leak = leakage_report(df)
    md = {
        **table_metadata(df, preview_cols=["task", "template", "split", "user_id", "target_anime_id", "prompt", "completion"]),
        "counts_by_task_split": counts_md(flat_counts, key="task/split", value="rows"),
        "example_rows": dg.MetadataValue.md(example_rows_md(df)),
        "token_lengths": dg.MetadataValue.md("\n".join(tok_md) + f"\n\n{counter_note}"),
        **hist_plot("token_length_plot", lens_all, "tokens per example", "tokens"),
        **bar_plot("rows_plot", flat_counts, "rows per task/split", "rows"),
        **semantic_ids_provenance(context, "llm_prep_dataset"),
        "duplicates_dropped": counts_md(summary["duplicates_dropped"], key="task", value="duplicates dropped"),
        "task_a_skipped_missing_field": counts_md(summary["task_a_skipped_missing_field"], key="template:field", value="anime"),
        "sentiment_counts": counts_md(summary["sentiment_counts"], key="sentiment", value="list entries"),
        "order_note": dg.MetadataValue.text(summary["order_note"]),
        "protocol": dg.MetadataValue.text(f"{summary['protocol']}: {summary['protocol_note']}"),
        "jsonl_folder": dg.MetadataValue.path(str(store.path(config.export_folder))),
        "parquet_export": dg.MetadataValue.path(export),
        "summary": dg.MetadataValue.json({k: v for k, v in summary.items() if k != "config"}),
        **scalar_metadata(
            {
                "order_is_temporal": bool(summary["order_is_temporal"]),
                "next_id_format": summary["next_id_format"],
                "b_targets_per_row": summary["b_targets_per_row"],
                "users_train": summary["users_by_split"]["train"],
                "users_validation": summary["users_by_split"]["validation"],
                "users_test": summary["users_by_split"]["test"],
                "users_too_short": summary["users_too_short"],
                "anime_in_task_a": summary["anime_in_task_a"],
                "users_in_several_splits": leak["users_in_several_splits"],
                "heldout_items_in_train": leak["heldout_items_in_train"],
                "rows_a": sum(counts["A"].values()),
                "rows_b": sum(counts["B"].values()),
                "rows_c": sum(counts["C"].values()),
                "seconds": round(elapsed, 2),
            }
        ),
    }
    context.log.info(
        f"llm_prep_dataset: {df.height} rows ({flat_counts}) in {elapsed:.1f}s; duplicates dropped "
        f"{summary['duplicates_dropped']}; {summary['order_note']}"
    )
    return dg.Output(df, metadata=md)


@dg.asset_check(asset=llm_prep_dataset, blocking=True, description="no user in two splits; no held-out item in training rows")
def llm_prep_dataset_split_by_user(llm_prep_dataset: pl.DataFrame) -> dg.AssetCheckResult:
    leak = leakage_report(llm_prep_dataset)
    ok = leak["users_in_several_splits"] == 0 and leak["heldout_items_in_train"] == 0
    return dg.AssetCheckResult(passed=ok, metadata={k: dg.MetadataValue.int(v) for k, v in leak.items()})
