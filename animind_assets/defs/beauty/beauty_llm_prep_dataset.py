"""``beauty_llm_prep_dataset``: LC-Rec-style instruction rows for the semantic-ID LM on Amazon Beauty.

Thin layer over ``animind_assets.lib.llm.sequence_data.build_next_item_dataset`` (the dataset-agnostic
next-item entry point of the LM chain): text = the item words of ``beauty_items`` (``text``), IDs =
``beauty_semantic_ids``, order = ``beauty_interactions.seq``. Tasks: A = ID <-> item text, B = next ID
from the ID history, C = text history -> next ID. Split = the leave-one-out split of every other
Beauty model (``lib/retrieval/evaluation.py``): test = last item, validation = second-to-last,
training rows only from prefixes of ``seq[:-2]``. Table in DuckDB + Parquet export; chat JSONL per
split in ``<artifacts>/beauty_llm_prep_dataset/``.
"""

import json
import time

import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP
from animind_assets.launchpad import derive_config
from animind_assets.lib.llm.data import SPLITS, TASKS, approx_token_count, example_rows_md, summary_json, to_chat_records, token_length_stats
from animind_assets.lib.llm.sequence_data import SeqLlmDataConfig, build_next_item_dataset, loo_leakage_report
from animind_assets.meta import bar_plot, counts_md, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, ParquetExports

ASSET = "beauty_llm_prep_dataset"

BeautyLlmPrepDatasetConfig = derive_config(
    SeqLlmDataConfig,
    name="BeautyLlmPrepDatasetConfig",
    asset=ASSET,
    extra={"export_folder": (str, Field(ASSET, description="artifact-store folder of the JSONL export"))},
    descriptions={
        "a_templates": "task-A templates: sid_to_title (ID -> item text) | title_to_sid (item text -> ID)",
        "system_prompt": "system message of every row",
    },
)


@dg.asset(
    group_name=GROUP,
    kinds={"polars", "duckdb"},
    description="LC-Rec-style instruction rows (ID <-> item text, next ID from ID history, text history -> next ID) "
    "on the Beauty leave-one-out split; JSONL at <artifacts>/beauty_llm_prep_dataset/.",
)
def beauty_llm_prep_dataset(
    context: dg.AssetExecutionContext,
    config: BeautyLlmPrepDatasetConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    beauty_items: pl.DataFrame,
    beauty_interactions: pl.DataFrame,
    beauty_semantic_ids: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    result = build_next_item_dataset(beauty_items, beauty_interactions, beauty_semantic_ids, config.to_lib(),
                                     id_col="item_id", text_col="text", log=context.log.info)
    df, summary = result.frame, result.summary
    lens = approx_token_count([f"{s}\n{p}\n{c}" for s, p, c in df.select("system", "prompt", "completion").iter_rows()])
    summary["token_lengths"] = token_length_stats(df, lambda _t: lens)
    store = artifacts.store()
    with store.atomic_dir(config.export_folder) as tmp:  # nothing half-written is published
        records = to_chat_records(df)
        for split in SPLITS:
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for r in records:
                    if r["split"] == split:
                        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / "summary.json").write_text(summary_json(summary), encoding="utf-8")
    export = exports.write(df, ASSET)
    counts = summary["counts"]
    flat = {f"{t}/{s}": counts[t][s] for t in TASKS for s in SPLITS}
    md = {
        **table_metadata(df, preview_cols=["task", "template", "split", "user_id", "target_anime_id", "prompt", "completion"]),
        "counts_by_task_split": counts_md(flat, key="task/split", value="rows"),
        "example_rows": dg.MetadataValue.md(example_rows_md(df)),
        **bar_plot("rows_plot", flat, "rows per task/split", "rows"),
        "protocol": dg.MetadataValue.text(f"{summary['protocol']}: {summary['protocol_note']}"),
        "summary": dg.MetadataValue.json({k: v for k, v in summary.items() if k != "config"}),
        "jsonl_folder": dg.MetadataValue.path(str(store.path(config.export_folder))),
        "parquet_export": dg.MetadataValue.path(export),
        **scalar_metadata({
            "users_evaluated": summary["users_evaluated"], "users_skipped_lt3": summary["users_skipped_lt3"],
            "train_positions": summary["train_positions"], "items_with_sid": summary["items_with_sid"],
            "next_id_format": summary["next_id_format"], "sequence_windows": summary["sequence_windows"],
            "heldout_items_in_train": summary["leakage"]["heldout_items_in_train"],
            "rows_a": sum(counts["A"].values()), "rows_b": sum(counts["B"].values()), "rows_c": sum(counts["C"].values()),
            "token_length_method": "approximate (4 chars/token, SID tokens = 1)",
            "seconds": round(time.perf_counter() - t0, 2),
        }),
    }
    return dg.Output(df, metadata=md)


@dg.asset_check(asset=beauty_llm_prep_dataset, blocking=True,
                description="no user's validation/test item appears in that user's training rows (leave-one-out)")
def beauty_llm_prep_dataset_no_heldout_in_train(beauty_llm_prep_dataset: pl.DataFrame) -> dg.AssetCheckResult:
    leak = loo_leakage_report(beauty_llm_prep_dataset)
    return dg.AssetCheckResult(passed=leak["heldout_items_in_train"] == 0 and leak["heldout_examples"] > 0,
                               metadata={k: dg.MetadataValue.int(v) for k, v in leak.items()})
