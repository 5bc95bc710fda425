"""``tiger_eval``: test-set Recall@5/10 and NDCG@5/10 of every ``tiger_model`` partition on Amazon Beauty,
next to the TIGER paper's numbers, the tiger-cf re-implementation's, and a popularity baseline.

Each model decodes the test users' next item with beam search constrained to the trie of valid IDs
(``lib/semantic_ids/trie.py``, ``beams >= 10``); ranking = the returned IDs in beam-score order. The invalid-ID
rate is reported for the constrained search (0 by construction) and for an unconstrained beam search on
``unconstrained_users`` users (how often the bare model invents IDs). Same split and users for every row:
last item = test target, history = everything before it (the last ``max_history`` items).
"""

import time

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP
from animind_assets.defs.beauty.shared import ID_SOURCES
from animind_assets.defs.beauty.shared import TIGER_MODEL_ASSET as MODEL_ASSET
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.data.amazon import sequences_from_interactions
from animind_assets.lib.common.fingerprint import frame_fingerprint
from animind_assets.lib.retrieval.tiger import (
    REPORT_METRICS,
    TIGER_CF_BEAUTY,
    TIGER_PAPER_BEAUTY,
    check_coverage,
    comparison_bar_png,
    evaluate,
    leave_one_out,
    load_model,
    popularity_metrics,
    resolve_device,
)
from animind_assets.meta import bar_plot, image_md, markdown_table, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, MlflowResource, ParquetExports
from animind_assets.launchpad import settings_defaults

ASSET = "tiger_eval"
SCHEMA = {
    "model": pl.Utf8,
    "kind": pl.Utf8,
    "id_source": pl.Utf8,
    "recall@5": pl.Float64,
    "ndcg@5": pl.Float64,
    "recall@10": pl.Float64,
    "ndcg@10": pl.Float64,
    "invalid_id_rate": pl.Float64,
    "unconstrained_invalid_id_rate": pl.Float64,
    "test_users": pl.Int64,
    "beams": pl.Int64,
    "eval_seconds": pl.Float64,
    "train_steps": pl.Int64,
    "train_seconds": pl.Float64,
    "parameters": pl.Int64,
    "best_val_recall@10": pl.Float64,
}
LABELS = {"own": "TIGER, own IDs (beauty_semantic_ids)", "reference": "TIGER, reference IDs (index_rqvae.json)",
          "collaborative": "TIGER, collaborative IDs (RQ-KMeans of the sasrec_model item embeddings)"}


@settings_defaults("tiger_eval")
class TigerEvalConfig(dg.Config):
    id_sources: list[str] = Field(default_factory=lambda: list(ID_SOURCES), description="tiger_model partitions to evaluate (missing ones are skipped with a warning)")
    beams: int = Field(20, description="beam width of the constrained search (>= 10)")
    batch_size: int = Field(128, description="test users per generate call")
    test_users: int = Field(0, description="0 = every test user; >0 = a fixed random subset (same for every row)")
    unconstrained_users: int = Field(500, description="users decoded without the trie to measure the invalid-ID rate (0 = skip)")
    exclude_history: bool = Field(True, description="never recommend items already in the user's history (model and popularity alike)")
    seed: int = Field(0, description="seed of the test-user subset")
    num_threads: int = Field(2, description="torch CPU threads (0 = leave as is)")
    device: str = Field("auto", description="auto | cpu | cuda")


def _row(model: str, kind: str, id_source: str | None, metrics: dict, **extra) -> dict:
    row = {k: None for k in SCHEMA}
    row.update({"model": model, "kind": kind, "id_source": id_source})
    for m in REPORT_METRICS:
        row[m] = metrics.get(m)
    row.update(extra)
    return row


@dg.asset(
    group_name=GROUP,
    deps=[MODEL_ASSET],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "polars", "duckdb"},
    description="Beauty test Recall/NDCG@5/10 of TIGER on own, reference and collaborative IDs, vs the paper and popularity.",
)
def tiger_eval(
    context: dg.AssetExecutionContext,
    config: TigerEvalConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    mlflow: MlflowResource,
    beauty_interactions: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    import torch

    t0 = time.perf_counter()
    if config.beams < 10:
        raise ValueError(f"beams must be >= 10 (Recall@10 needs 10 beams), got {config.beams}")
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    store = artifacts.store()
    data_fp = frame_fingerprint(beauty_interactions.select(["user_id", "item_id", "seq"]), sort_by=["user_id", "seq"])
    sequences = sequences_from_interactions(beauty_interactions)
    rows = [
        _row("TIGER paper (Rajput et al. 2023)", "published", None, TIGER_PAPER_BEAUTY),
        _row("tiger-cf re-implementation", "published", None, TIGER_CF_BEAUTY),
    ]
    found = []
    for src in config.id_sources:
        if src not in ID_SOURCES:
            raise ValueError(f"unknown id source {src!r}; expected one of {ID_SOURCES}")
        if store.exists(MODEL_ASSET, src, "model", "codec.json"):
            found.append(src)
        else:
            context.log.warning(f"{ASSET}: no {MODEL_ASSET}[{src}] at {store.path(MODEL_ASSET, src, 'model')}: skipped")
    if not found:
        raise ValueError(f"no tiger_model partition found under {store.path(MODEL_ASSET)}; materialize tiger_model first")

    splits: dict[int, object] = {}
    subset = None
    md_extra: dict = {}
    for src in found:
        model, codec, cfg, extra = load_model(str(store.path(MODEL_ASSET, src, "model")))
        model.to(device)
        if extra.get("data_fingerprint") and extra["data_fingerprint"] != data_fp:
            context.log.warning(f"{ASSET}: {MODEL_ASSET}[{src}] was trained on other interactions (fingerprint differs): retrain it")
        if cfg.max_history not in splits:
            splits[cfg.max_history] = leave_one_out(sequences, max_history=cfg.max_history)
        split = splits[cfg.max_history]
        if subset is None:
            n = len(split.test)
            subset = np.arange(n) if not config.test_users or config.test_users >= n else np.sort(
                np.random.default_rng(config.seed).choice(n, config.test_users, replace=False)
            )
            context.log.info(f"{ASSET}: {len(subset)} of {n} test users")
        check_coverage(split, codec)
        test = split.test.subset(subset)
        m = evaluate(model, codec, test, ks=(5, 10), beams=config.beams, batch_size=config.batch_size, log=context.log.info,
                     label=f"test[{src}]", exclude_history=config.exclude_history)
        unc = None
        if config.unconstrained_users:
            sample = test.subset(np.arange(min(config.unconstrained_users, len(test))))
            um = evaluate(model, codec, sample, ks=(10,), beams=config.beams, batch_size=config.batch_size, constrained=False)
            unc = um["invalid_id_rate"]
            md_extra[f"{src}_unconstrained_recall@10"] = um["recall@10"]
        best = extra.get("best", {})
        rows.append(
            _row(
                LABELS[src], "measured", src, m,
                invalid_id_rate=m["invalid_id_rate"],
                unconstrained_invalid_id_rate=unc,
                test_users=len(test),
                beams=config.beams,
                eval_seconds=round(m["eval_seconds"], 1),
                train_steps=int(extra.get("steps", 0)),
                train_seconds=float(extra.get("train_seconds", 0.0)),
                parameters=int(extra.get("n_parameters", 0)),
                **{"best_val_recall@10": best.get("val_recall@10")},
            )
        )
        context.log.info(
            f"{ASSET}[{src}]: R@5 {m['recall@5']:.4f} N@5 {m['ndcg@5']:.4f} R@10 {m['recall@10']:.4f} N@10 {m['ndcg@10']:.4f}, "
            f"invalid {m['invalid_id_rate']:.4f} (unconstrained {unc if unc is not None else float('nan'):.4f}), {m['users_per_s']:.1f} users/s"
        )

    test = split.test.subset(subset)
    pop = popularity_metrics(split, ks=(5, 10), exclude_history=config.exclude_history, test=test)
    rows.insert(2, _row("popularity (train + valid counts)", "baseline", None, pop, invalid_id_rate=0.0, test_users=len(test)))
    df = pl.DataFrame(rows, schema=SCHEMA)
    export = exports.write(df, ASSET)

    with mlflow.start_run(context) as run:
        run.log_params({"beams": config.beams, "test_users": len(test), "id_sources": ",".join(found), "data_fingerprint": data_fp})
        for r in rows:
            if r["kind"] != "published":
                tag = r["id_source"] or "popularity"
                run.log_metrics({f"{tag}_{k}": r[k] for k in (*REPORT_METRICS, "invalid_id_rate") if r[k] is not None})
        run_link = run.link

    plot_rows = {r["model"]: r for r in rows}
    headline = {}
    for r in rows:
        if r["kind"] == "measured":
            for k in (*REPORT_METRICS, "invalid_id_rate", "unconstrained_invalid_id_rate"):
                headline[f"{r['id_source']}_{k}"] = r[k]
    headline.update({"popularity_recall@10": pop["recall@10"], "test_users": len(test), "beams": config.beams,
                     "exclude_history": config.exclude_history,
                     "sequence_order_note": "seq order of beauty_interactions (prepared split default: inter.json)",
                     "eval_seconds": round(time.perf_counter() - t0, 1), "mlflow_run": run_link, "parquet_export": export,
                     **md_extra})
    md = {
        **table_metadata(df, preview_rows=10, preview_cols=["model", "recall@5", "ndcg@5", "recall@10", "ndcg@10", "invalid_id_rate", "unconstrained_invalid_id_rate", "test_users"]),
        **scalar_metadata(headline),
        "comparison": dg.MetadataValue.md(markdown_table(df.select(["model", *REPORT_METRICS, "invalid_id_rate", "test_users"]), max_rows=10)),
        "comparison_plot": image_md(comparison_bar_png(plot_rows), "TIGER on Amazon Beauty"),
        **{k: v for k, v in bar_plot("comparison_plot", {m: float(r.get("recall@10") or 0.0) for m, r in plot_rows.items()},
                                     "Recall@10 per model", "Recall@10").items() if k.endswith("_inline")},
    }
    return dg.Output(df, metadata=md)
