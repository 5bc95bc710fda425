"""``semantic_id_report``: are the semantic IDs meaningful?

* Cluster inspection: mean pairwise genre Jaccard inside first-level buckets vs random buckets of
  the same sizes (the original tokenizer's procedure plus an all-buckets version).
* Co-watch recall@K as computed by the original tokenizer (positives = completed with score >= 7,
  500 query anime with >= 10 positive users drawn with a fixed seed, proxy neighbours = top-K by
  co-occurrence Jaccard), for three rankings: longest shared semantic-ID prefix (ties by embedding
  cosine), plain embedding cosine (the ceiling for content-only IDs) and random.

Table (DuckDB + Parquet): one row per ranking method. Files under
``<artifacts>/semantic_id_report/``: ``recall_report.json``, ``cluster_summary.json``,
``cluster_inspection.jsonl``.
"""


import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from animind_assets.defs.semantic_ids.quantizer_fit import GROUP
from animind_assets.lib.semantic_ids.evaluation import bucket_genre_coherence, cowatch_recall, positive_graph
from animind_assets.lib.semantic_ids.assign import frame_vectors
from animind_assets.lib.semantic_ids.tokens import level_token
from animind_assets.meta import bar_plot, hist_plot, markdown_table, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, ParquetExports
from animind_assets.launchpad import settings_defaults

REPORT_DIR = "semantic_id_report"


@settings_defaults("semantic_id_report")
class SemanticIdReportConfig(dg.Config):
    recall_k: int = Field(20, description="K of co-watch recall@K")
    recall_max_queries: int = Field(500, description="query anime drawn with recall_seed (0 = all eligible)")
    recall_min_support: int = Field(10, description="min positive users of a query anime")
    recall_seed: int = Field(42, description="seed of the query draw and the random ranking")
    positive_status: int = Field(2, description="status counted as positive (2 = completed)")
    positive_min_score: int = Field(7, description="minimum score of a positive")
    cluster_sample_size: int = Field(10, description="anime sampled per inspected bucket")
    cluster_min_bucket: int = Field(20, description="min bucket size to be inspected")
    cluster_top_buckets: int = Field(20, description="largest buckets inspected")
    cluster_seed: int = Field(42, description="seed of the bucket samples")


def _genre_sets(anime_ids: np.ndarray, anime_prep: pl.DataFrame) -> list[set]:
    if "genres" not in anime_prep.columns:
        return [set() for _ in anime_ids]
    lookup = {}
    for aid, genres in anime_prep.select("anime_id", "genres").iter_rows():
        if isinstance(genres, str):
            genres = genres.split(",")
        lookup[aid] = {g.strip().lower() for g in (genres or []) if g and g.strip()}
    return [lookup.get(int(a), set()) for a in anime_ids]


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb", "polars"},
    description="Genre coherence of first-level buckets and co-watch recall@K of semantic-ID prefixes "
    "vs embedding cosine and random.",
)
def semantic_id_report(
    context: dg.AssetExecutionContext,
    config: SemanticIdReportConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    semantic_ids: pl.DataFrame,
    anime_embeddings: pl.DataFrame,
    anime_prep: pl.DataFrame,
    user_interactions: pl.DataFrame,
) -> dg.Output:
    sid = semantic_ids.sort("anime_id")
    emb = anime_embeddings.filter(pl.col("anime_id").is_in(sid["anime_id"].implode()))
    ids, x = frame_vectors(emb, "anime_id", "embedding", table="anime_embeddings")
    if not np.array_equal(ids, sid["anime_id"].to_numpy()):
        missing = sorted(set(sid["anime_id"].to_list()) - set(ids.tolist()))[:5]
        raise ValueError(f"semantic_ids has anime without an embedding in anime_embeddings, e.g. {missing}")
    full = np.asarray(sid["codes"].to_list(), dtype=np.int64)

    for col in ("user_id", "anime_id", "status", "score"):
        if col not in user_interactions.columns:
            raise ValueError(f"user_interactions: missing column {col!r}")
    ui = user_interactions
    graph = positive_graph(
        ui["user_id"].to_numpy(), ui["anime_id"].to_numpy(), ui["status"].to_numpy(), ui["score"].to_numpy(),
        item_universe=ids, completed_status=config.positive_status, min_score=config.positive_min_score,
    )
    context.log.info(f"co-watch graph: {graph.n_positive_rows} positive rows, {int((graph.support >= config.recall_min_support).sum())} eligible query anime")
    rep = cowatch_recall(
        ids, full, x, graph, k=config.recall_k, min_support=config.recall_min_support,
        max_queries=config.recall_max_queries, seed=config.recall_seed,
    )
    genres = _genre_sets(ids, anime_prep)
    coh = bucket_genre_coherence(
        full[:, 0], genres, sample_size=config.cluster_sample_size, min_bucket=config.cluster_min_bucket,
        top_buckets=config.cluster_top_buckets, seed=config.cluster_seed,
    )

    titles = dict(anime_prep.select("anime_id", "title").iter_rows()) if "title" in anime_prep.columns else {}
    sid_by_id = dict(zip(sid["anime_id"].to_list(), sid["semantic_id"].to_list()))
    inspection = []
    for b in coh["inspected"]:
        members = [int(ids[i]) for i in b["sample_rows"]]
        inspection.append(
            {
                "first_token": level_token(1, int(full[b['sample_rows'][0], 0])) if members else "",
                "bucket_size": b["bucket_size"],
                "avg_genre_jaccard": b["avg_genre_jaccard"],
                "samples": [
                    {"anime_id": a, "title": titles.get(a, ""), "semantic_id": sid_by_id.get(a, ""),
                     "genres": sorted(genres[i])}
                    for a, i in zip(members, b["sample_rows"])
                ],
            }
        )
    cluster_summary = {k: v for k, v in coh.items() if k != "inspected"}
    store = artifacts.store()
    store.write_json(rep, REPORT_DIR, "recall_report.json")
    store.write_json(cluster_summary, REPORT_DIR, "cluster_summary.json")
    store.write_jsonl(inspection, REPORT_DIR, "cluster_inspection.jsonl")

    k = config.recall_k
    ceiling = rep["methods"]["embedding_cosine"]["mean_recall"]
    df = pl.DataFrame(
        [
            {
                "method": name,
                "k": k,
                "mean_recall": vals["mean_recall"],
                "median_recall": vals["median_recall"],
                "ratio_to_embedding_cosine": (vals["mean_recall"] / ceiling) if ceiling > 0 else None,
                "queries": rep["evaluated_queries"],
            }
            for name, vals in rep["methods"].items()
        ],
        schema={"method": pl.Utf8, "k": pl.Int64, "mean_recall": pl.Float64, "median_recall": pl.Float64,
                "ratio_to_embedding_cosine": pl.Float64, "queries": pl.Int64},
    )
    parquet = exports.write(df, "semantic_id_report")
    bucket_sizes = np.bincount(full[:, 0])
    bucket_sizes = bucket_sizes[bucket_sizes > 0]
    insp_md = pl.DataFrame(
        [
            {"first_token": r["first_token"], "bucket_size": r["bucket_size"], "avg_genre_jaccard": r["avg_genre_jaccard"],
             "examples": "; ".join(s["title"] or str(s["anime_id"]) for s in r["samples"][:4])}
            for r in inspection[:10]
        ]
    ) if inspection else pl.DataFrame({"first_token": []})
    md = {
        **table_metadata(df),
        **scalar_metadata(
            {
                f"recall@{k}_semantic_id": rep["methods"]["semantic_id"]["mean_recall"],
                f"recall@{k}_embedding_cosine": ceiling,
                f"recall@{k}_random": rep["methods"]["random"]["mean_recall"],
                f"recall@{k}_random_expected": rep["random_expected"],
                "semantic_vs_cosine": rep["semantic_vs_cosine"] if ceiling > 0 else None,
                "recall_queries": rep["evaluated_queries"],
                "recall_status": rep["status"],
                "genre_jaccard_inspected_buckets": coh["inspected_genre_jaccard"],
                "genre_jaccard_inspected_random": coh["inspected_genre_jaccard_random"],
                "genre_jaccard_all_buckets": coh["all_buckets_genre_jaccard"],
                "genre_jaccard_all_random": coh["all_buckets_genre_jaccard_random"],
                "first_level_buckets": coh["buckets"],
                "bucket_size_mean": coh["bucket_size_mean"],
                "bucket_size_max": coh["bucket_size_max"],
                "report_folder": str(store.path(REPORT_DIR)),
                "parquet_export": parquet,
            }
        ),
        **bar_plot("recall_plot", {m: v["mean_recall"] for m, v in rep["methods"].items()}, f"co-watch recall@{k}", "mean recall"),
        **hist_plot("bucket_size_plot", bucket_sizes, "first-level bucket sizes", "anime per bucket"),
        "inspected_buckets": dg.MetadataValue.md(markdown_table(insp_md, max_rows=10)),
        "top_k_prefix_depths": dg.MetadataValue.json({str(a): b for a, b in rep["semantic_topk_prefix_depth_counts"].items()}),
    }
    context.log.info(
        f"recall@{k}: semantic_id {rep['methods']['semantic_id']['mean_recall']:.4f}, "
        f"cosine {ceiling:.4f}, random {rep['methods']['random']['mean_recall']:.4f} over {rep['evaluated_queries']} queries"
    )
    return dg.Output(df, metadata=md)
