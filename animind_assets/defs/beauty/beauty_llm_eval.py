"""``beauty_llm_eval``: the Beauty semantic-ID LM on the leave-one-out evaluation of every Beauty model.

Thin layer over ``animind_assets.lib.llm.sequence_eval.evaluate_next_item_lm``: the same
``SequenceSplit`` (``beauty_interactions``), the same seeded user subset (``test_users``, ``seed``: the
rule ``beauty_eval`` uses), full-catalog beam search constrained to the trie of valid Beauty IDs,
Recall/NDCG@5/10 masked and unmasked with 95% bootstrap intervals, popularity on the same users.
The rows use ``beauty_eval``'s columns; they are also written to
``<artifacts>/beauty_llm_eval/rows.parquet`` with the user ids (``users.json``), from which
``beauty_eval`` adds the LM rows to its table when its users are the same.
"""

import time
from contextlib import nullcontext

import dagster as dg
import polars as pl
import torch
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP, split_from_interactions
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.launchpad import derive_config
from animind_assets.lib.llm.infer import INFERENCE_DTYPE_HELP, InferenceDtype, load_sid_model
from animind_assets.lib.llm.sequence_eval import SeqEvalConfig, evaluate_next_item_lm, evaluate_saved_model_in_processes
from animind_assets.lib.retrieval.evaluation import METRICS, protocol
from animind_assets.meta import markdown_table, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, ParquetExports

ASSET = "beauty_llm_eval"
MODEL_DIR = "beauty_finetuned_model"
#: the columns of ``beauty_eval``'s table
ROW_SCHEMA = {
    "model": pl.Utf8, "kind": pl.Utf8, "masking": pl.Utf8,
    **{m: pl.Float64 for m in METRICS},
    **{f"{m}_{b}": pl.Float64 for m in METRICS for b in ("lo", "hi")},
    "users": pl.Int64, "eval_seconds": pl.Float64, "invalid_id_rate": pl.Float64,
}

BeautyLlmEvalConfig = derive_config(
    SeqEvalConfig,
    name="BeautyLlmEvalConfig",
    asset=ASSET,
    extra={
        "model_dir": (str, Field("", description="model folder; '' = <artifacts>/beauty_finetuned_model")),
        "num_threads": (int, Field(2, description="torch CPU threads (0 = leave as is)")),
        "processes": (int, Field(1, ge=1, description="on CPU: split the users over this many spawned processes of "
                                 "num_threads // processes threads each, merged into one table (same users, means and "
                                 "intervals; lib/llm/sequence_eval.evaluate_saved_model_in_processes). On a 2-core CPU "
                                 "2 processes of 1 thread searched about twice as fast as 1 of 2 threads; 1 = in this process")),
        "device": (str, Field("auto", description="auto | cpu | cuda")),
        "dtype": (InferenceDtype, Field("float32", description=INFERENCE_DTYPE_HELP)),
    },
)


def eval_rows(res, kind: str = "measured") -> list[dict]:
    """``EvalResult`` -> rows in ``ROW_SCHEMA`` (masked, unmasked)."""
    out = []
    for mode in ("masked", "unmasked"):
        r = {k: None for k in ROW_SCHEMA}
        r.update({k: v for k, v in res.row(mode).items() if k in ROW_SCHEMA})
        r["kind"] = kind
        out.append(r)
    return out


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    deps=[MODEL_DIR],
    kinds={"pytorch", "polars", "duckdb"},
    description="Beauty semantic-ID LM on the leave-one-out protocol of beauty_eval (R@5/10, N@5/10, masked and "
    "unmasked, bootstrap CIs; valid-ID rate) next to popularity on the same users.",
)
def beauty_llm_eval(
    context: dg.AssetExecutionContext,
    config: BeautyLlmEvalConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    beauty_llm_prep_dataset: pl.DataFrame,
    beauty_interactions: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    from animind_assets.lib.common.device import resolve_device

    t0 = time.perf_counter()
    if config.num_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(config.num_threads)
    store = artifacts.store()
    device = resolve_device(config.device)
    if not config.model_dir and not store.exists(MODEL_DIR, "animind_llm.json"):
        raise FileNotFoundError(f"{store.path(MODEL_DIR)} has no model: materialize {MODEL_DIR} first")
    split, data_fp = split_from_interactions(beauty_interactions)
    cfg = config.to_lib()
    with nullcontext(config.model_dir) if config.model_dir else store.local_copy(MODEL_DIR) as folder:
        if config.processes > 1 and device.type == "cpu":
            threads = max(1, (config.num_threads or torch.get_num_threads()) // config.processes)
            out = evaluate_saved_model_in_processes(str(folder), beauty_llm_prep_dataset, split, cfg, config.processes,
                                                    threads=threads, dtype=config.dtype, log=context.log.info)
        else:
            sm = load_sid_model(folder, device=str(device), dtype=config.dtype)
            out = evaluate_next_item_lm(sm, beauty_llm_prep_dataset, split, cfg, log=context.log.info)
    rows = eval_rows(out.lm) + eval_rows(out.popularity, "baseline")
    df = pl.DataFrame(rows, schema=ROW_SCHEMA)
    users = [int(u) for u in out.lm.users.tolist()]
    store.write_parquet(df, ASSET, "rows.parquet")
    store.write_json({"users": users, "data_fingerprint": data_fp, "test_users": cfg.test_users, "seed": cfg.seed}, ASSET, "users.json")
    store.write_parquet(out.predictions, ASSET, "predictions.parquet")
    export = exports.write(df, ASSET)
    s = out.summary
    lm_m, pop_m = out.lm.metrics["masked"], out.popularity.metrics["masked"]
    md = {
        **table_metadata(df, preview_cols=["model", "kind", "masking", *METRICS, "users"]),
        "comparison": dg.MetadataValue.md(markdown_table(df.select(["model", "kind", "masking", *METRICS, "recall@10_lo", "recall@10_hi", "users"]))),
        "protocol": dg.MetadataValue.json({**protocol(split, "test", split.subset(cfg.test_users, seed=cfg.seed)),
                                           "generative_masking": cfg.masking, "beams": cfg.num_beams,
                                           "inference_dtype": config.dtype}),
        **scalar_metadata({
            "lm_recall@10_masked": lm_m["recall@10"], "lm_ndcg@10_masked": lm_m["ndcg@10"],
            "popularity_recall@10_masked": pop_m["recall@10"],
            "lm_over_popularity_recall@10": lm_m["recall@10"] / pop_m["recall@10"] if pop_m["recall@10"] else None,
            "valid_id_rate": s["valid_id_rate"], "unconstrained_valid_id_rate": s.get("unconstrained_valid_id_rate"),
            "sid_to_title_retrieval@1": s.get("sid_to_title_retrieval@1"), "title_to_sid_retrieval@1": s.get("title_to_sid_retrieval@1"),
            "users": s["users"], "users_per_s": s["users_per_s"], "search_processes": s.get("processes", 1),
            "data_fingerprint": data_fp,
            "seconds": round(time.perf_counter() - t0, 1), "parquet_export": export,
        }),
    }
    return dg.Output(df, metadata=md)


@dg.asset_check(asset=beauty_llm_eval, description="constrained generation only produced real Beauty items (valid-ID rate 1.0)")
def beauty_llm_eval_valid_ids(beauty_llm_eval: pl.DataFrame) -> dg.AssetCheckResult:
    lm = beauty_llm_eval.filter(pl.col("kind") == "measured")
    rate = 1.0 - float(lm["invalid_id_rate"][0]) if lm.height and lm["invalid_id_rate"][0] is not None else 0.0
    return dg.AssetCheckResult(passed=rate == 1.0, metadata={"valid_id_rate": dg.MetadataValue.float(rate)})
