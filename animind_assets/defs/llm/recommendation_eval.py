"""``recommendation_eval``: held-out-item quality of ``finetuned_model`` on the test users.

Thin layer over ``animind_assets.lib.llm.evaluation``: constrained beam search over the trie of valid
semantic IDs (only real anime can come out), Hit@K / NDCG@K next to popularity, co-watch,
item-kNN and EASE baselines on the same users (protocol stated in the metadata: set completion
without timestamps), valid-ID rate, ID <-> title linking accuracy. The table (one row per method)
goes to DuckDB + a Parquet export; per-user predictions to
``<artifacts>/recommendation_eval/predictions.parquet``; metrics to MLflow.
"""

import time

import dagster as dg
import polars as pl
import torch
from pydantic import Field

from animind_assets.defs.llm.shared import MODEL_DIR
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.llm.evaluation import EvalConfig, evaluate_recommender, metrics_frame
from animind_assets.lib.llm.infer import INFERENCE_DTYPE_HELP, InferenceDtype, load_sid_model
from animind_assets.meta import bar_plot, markdown_table, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, MlflowResource, ParquetExports

from animind_assets.defs.llm.shared import GROUP
from animind_assets.launchpad import derive_config
EVAL_DIR = "recommendation_eval"


RecommendationEvalConfig = derive_config(
    EvalConfig,
    name="RecommendationEvalConfig",
    asset="recommendation_eval",
    extra={
        "engine": (str, Field("cached", description="'cached' (each prompt encoded once, its KV cache copied to its beams; batched) | 'hf' (generate)")),
        "model_dir": (str, Field("", description="model folder; '' = <artifacts>/finetuned_model")),
        "num_threads": (int, Field(2, description="torch CPU threads")),
        "dtype": (InferenceDtype, Field("float32", description=INFERENCE_DTYPE_HELP)),
    },
    descriptions={
        "ks": 'cut-offs K of Hit@K / NDCG@K',
        "num_beams": 'beams of the constrained search (>= max K)',
        "max_users": 'test users evaluated, a seeded sample (0 = all); demo-scale default',
        "exclude_seen": "leave the user's own list out of every ranking",
        "unconstrained_users": 'users for the unconstrained greedy valid-ID reference (0 = off)',
        "title_items": 'training task-A items per direction for ID <-> title accuracy (0 = off)',
        "split": "llm_prep_dataset split to evaluate ('test' | 'validation')",
        "seed": 'user sample seed',
    },
)


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    deps=["finetuned_model"],
    kinds={"pytorch", "polars", "mlflow"},
    description="Hit@K / NDCG@K of trie-constrained semantic-ID generation vs popularity, co-watch, item-kNN and "
    "EASE baselines on held-out test users; valid-ID rate; ID <-> title accuracy.",
)
def recommendation_eval(
    context: dg.AssetExecutionContext,
    config: RecommendationEvalConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    mlflow: MlflowResource,
    llm_prep_dataset: pl.DataFrame,
    user_interactions: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    if config.num_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(config.num_threads)
    store = artifacts.store()
    if config.model_dir:
        sm = load_sid_model(config.model_dir, dtype=config.dtype)
    else:
        if not store.exists(MODEL_DIR, "animind_llm.json"):
            raise FileNotFoundError(f"{store.path(MODEL_DIR)} has no finetuned model: materialize finetuned_model first")
        with store.local_copy(MODEL_DIR) as local:
            sm = load_sid_model(local, dtype=config.dtype)
    cfg = config.to_lib()
    res = evaluate_recommender(sm, llm_prep_dataset, user_interactions, cfg, log=context.log.info, engine=config.engine)
    table = metrics_frame(res.metrics, cfg.ks)
    store.write_parquet(res.predictions, EVAL_DIR, "predictions.parquet")
    export = exports.write(table, "recommendation_eval")
    lm, pop, cw = res.metrics["semantic_id_lm"], res.metrics["popularity"], res.metrics["cowatch"]
    kmax = max(cfg.ks)
    flat = {f"{m}_{k}": v for m, d in res.metrics.items() for k, v in d.items() if not k.startswith("recall")}
    s = res.summary
    with mlflow.start_run(context) as run:
        run.log_params({"num_beams": config.num_beams, "max_users": config.max_users, "exclude_seen": config.exclude_seen, "engine": config.engine})
        run.log_metrics({**flat, **{k: v for k, v in s.items() if isinstance(v, (int, float))}})
        run_id = run.run_id
        run_link = run.link
    bars = {f"{m} hit@{k}": res.metrics[m].get(f"hit@{k}", 0.0) for m in res.metrics for k in cfg.ks}
    md = {
        **table_metadata(table),
        "metrics": dg.MetadataValue.md(markdown_table(table)),
        **bar_plot("hit_plot", bars, "Hit@K per method", "hit rate"),
        **scalar_metadata(
            {
                f"lm_hit@{kmax}": lm.get(f"hit@{kmax}"),
                f"lm_ndcg@{kmax}": lm.get(f"ndcg@{kmax}"),
                f"popularity_hit@{kmax}": pop.get(f"hit@{kmax}"),
                f"cowatch_hit@{kmax}": cw.get(f"hit@{kmax}"),
                f"item_knn_hit@{kmax}": res.metrics["item_knn"].get(f"hit@{kmax}"),
                f"ease_hit@{kmax}": res.metrics["ease"].get(f"hit@{kmax}"),
                "lm_beats_item_knn": bool(lm.get(f"hit@{kmax}", 0) > res.metrics["item_knn"].get(f"hit@{kmax}", 0)),
                "lm_over_ease": (lm.get(f"hit@{kmax}", 0) / res.metrics["ease"][f"hit@{kmax}"]
                                 if res.metrics["ease"].get(f"hit@{kmax}") else None),
                "lm_beats_popularity": bool(lm.get(f"hit@{kmax}", 0) > pop.get(f"hit@{kmax}", 0)),
                "valid_id_rate": lm.get("valid_id_rate"),
                "unconstrained_valid_id_rate": s.get("unconstrained_valid_id_rate"),
                "sid_to_title_exact": s.get("sid_to_title_exact"),
                "sid_to_title_fuzzy_ge_0_8": s.get("sid_to_title_fuzzy_ge_0_8"),
                "sid_to_title_retrieval@1": s.get("sid_to_title_retrieval@1"),
                "title_to_sid_exact": s.get("title_to_sid_exact"),
                "title_to_sid_retrieval@1": s.get("title_to_sid_retrieval@1"),
                "users": s["users"],
                "next_id_format": s["next_id_format"],
                "catalog_size": s["catalog_size"],
                "users_per_s": s["users_per_s"],
                "inference_dtype": config.dtype,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        ),
        "protocol": dg.MetadataValue.text(
            f"{s['protocol']} ({s['protocol_note']}); split={config.split}, {s['users']} users; the prompt shows "
            f"{s['history_items_mean']:.1f} other items of the list on average; exclude_seen={config.exclude_seen} for "
            f"every method; ties: higher score, then smaller anime_id; {s['baselines_note']}; EASE lambda "
            f"{config.ease_lambda}, item-kNN {config.knn_neighbours} neighbours."
        ),
        "examples": dg.MetadataValue.json({k: s[k] for k in ("unconstrained_examples", "sid_to_title_examples") if k in s}),
        "predictions": dg.MetadataValue.path(str(store.path(EVAL_DIR, "predictions.parquet"))),
        "parquet_export": dg.MetadataValue.path(export),
    }
    if run_id:
        md["mlflow_run_id"] = dg.MetadataValue.text(run_id)
        md["mlflow_run"] = dg.MetadataValue.url(run_link)
    return dg.Output(table, metadata=md)


@dg.asset_check(asset=recommendation_eval, description="constrained generation only produced real anime (valid-ID rate 1.0)")
def recommendation_eval_valid_ids(recommendation_eval: pl.DataFrame) -> dg.AssetCheckResult:
    row = recommendation_eval.filter(pl.col("method") == "semantic_id_lm")
    rate = float(row["valid_id_rate"][0]) if row.height and row["valid_id_rate"][0] is not None else 0.0
    return dg.AssetCheckResult(passed=rate == 1.0, metadata={"valid_id_rate": dg.MetadataValue.float(rate)})
